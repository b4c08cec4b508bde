"""Backends, imported as ``portopt.backends.<name>``; each registers itself on import."""
