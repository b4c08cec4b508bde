"""The conformance suite, imported as ``portopt.conformance``."""
