"""``portopt show ALGORITHM``: an algorithm's equations as text, LaTeX or JSON."""

from __future__ import annotations

import argparse
import sys

from portopt.cli import Subcommand, UsageError
from portopt.cli_options import build_spec, load_user_spec, parse_option
from portopt.spec.definition import OptionValue, Spec
from portopt.spec.render import render_latex, render_text
from portopt.spec.serialize import spec_to_json


def add_spec_source(parser: argparse.ArgumentParser) -> None:
    """The positional algorithm name, or ``--spec module:factory`` for a spec of one's own (exactly one)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("algorithm", nargs="?", help="algorithm name (see `portopt list`)")
    source.add_argument(
        "--spec",
        metavar="MODULE:FACTORY",
        help="a spec of your own instead: FACTORY(**options) in MODULE (the current directory is searched)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_source(parser)
    parser.add_argument(
        "-o",
        "--option",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="structural options, e.g. amsgrad=true maximize=true (values: true/false, int, float, string)",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--latex", action="store_true", help="print LaTeX (an aligned block) instead of text")
    form.add_argument("--json", action="store_true", help="print the spec's JSON form (see portopt.spec.serialize)")


def spec_from_args(algorithm: str | None, option_texts: list[str], user_spec: str | None = None) -> Spec:
    """Build the spec named on the command line (an algorithm, or ``--spec module:factory``); bad input
    becomes a :class:`UsageError`."""
    if (algorithm is None) == (user_spec is None):
        raise UsageError("name an algorithm or give --spec MODULE:FACTORY (one of the two)")
    try:
        options: dict[str, OptionValue] = dict(parse_option(text) for text in option_texts)
        if user_spec is not None:
            return load_user_spec(user_spec, options)
        assert algorithm is not None
        return build_spec(algorithm, options)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def spec_of(args: argparse.Namespace) -> Spec:
    """The spec of a subcommand that took :func:`add_spec_source`'s arguments and ``-o`` options."""
    return spec_from_args(args.algorithm, args.option, getattr(args, "spec", None))


def run(args: argparse.Namespace) -> int:
    spec = spec_of(args)
    if args.json:
        sys.stdout.write(spec_to_json(spec))
    else:
        print(render_latex(spec) if args.latex else render_text(spec))
    return 0


COMMAND = Subcommand("show", "print an algorithm's equations (text, LaTeX or JSON)", add_arguments, run)
