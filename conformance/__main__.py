"""``python -m portopt.conformance``: the ``portopt conformance`` command."""

from portopt.conformance.cli import main

raise SystemExit(main())
