"""``python -m portopt``: the same as the ``portopt`` console script."""

from portopt.cli import main

raise SystemExit(main())
