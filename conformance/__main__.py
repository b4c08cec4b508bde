"""``python -m portopt.conformance``: the ``portopt conformance`` command."""

from portopt.conformance.cli import main

if __name__ == "__main__":  # not when a worker process (spawn) imports this module as its main
    raise SystemExit(main())
