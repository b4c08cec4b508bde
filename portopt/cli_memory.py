"""``portopt memory ALGORITHM``: bytes per parameter under one or more precision policies."""

from __future__ import annotations

import argparse
import math

from portopt.cli import Subcommand, UsageError
from portopt.cli_show import add_spec_source, spec_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_source(parser)
    parser.add_argument(
        "-o", "--option", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="structural options"
    )
    parser.add_argument(
        "-p",
        "--policy",
        action="append",
        metavar="POLICY",
        help=(
            "precision policy, repeat to compare: a preset (torch, fp32, bf16-states, q8-states, mixed-bf16, ...; "
            "a wrong name lists them all) and/or key=value items, e.g. 'mixed-bf16,exp_avg_sq=q8' or "
            "'master=fp32,states=q8,exp_avg=bf16' (default: torch)"
        ),
    )
    parser.add_argument(
        "--param-dtype",
        choices=("fp32", "fp64", "bf16", "fp16"),
        help="parameter dtype (default: the policy's params=..., else fp32)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--params", type=float, metavar="N", help="also give totals for a model of N parameters")
    size.add_argument(
        "--model-shapes",
        metavar="SHAPES",
        help="exact accounting for parameters of these shapes, e.g. '4096x4096,4096,10x4096'",
    )


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"4096x4096,4096"`` -> ``[(4096, 4096), (4096,)]``; ``"scalar"`` or ``"()"`` is a 0-d shape."""
    shapes: list[tuple[int, ...]] = []
    for item in text.split(","):
        item = item.strip()
        if item in ("()", "scalar"):
            shapes.append(())
            continue
        try:
            dims = tuple(int(d) for d in item.split("x"))
        except ValueError:
            dims = (-1,)
        if not item or any(d < 0 for d in dims):
            raise UsageError(f"--model-shapes: bad shape {item!r} (dims joined by 'x', shapes by ',': 4096x4096,4096)")
        shapes.append(dims)
    return shapes


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _number(x: float) -> str:
    return f"{x:g}" if x != int(x) else str(int(x))


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from portopt.precision.memory import MemoryBreakdown, bytes_per_parameter, memory_for_params
    from portopt.precision.policy import DTYPE_NAMES, PolicyError, parse_policy

    spec = spec_of(args)
    texts: list[str] = args.policy or ["torch"]
    if args.params is not None and not (math.isfinite(args.params) and args.params >= 0):
        raise UsageError(f"--params: {args.params} is not a non-negative number")
    shapes = parse_shapes(args.model_shapes) if args.model_shapes else None
    columns: list[tuple[str, MemoryBreakdown, float]] = []  # (policy text, breakdown, parameter count)
    notes: list[str] = []
    for text in texts:
        try:
            policy = parse_policy(text)
            dtype = DTYPE_NAMES[args.param_dtype] if args.param_dtype else policy.param_dtype or torch.float32
            if shapes is None:
                breakdown = bytes_per_parameter(spec, policy, dtype)
                notes.extend(n for n in breakdown.notes if n not in notes)
                count = 1.0
            else:
                params = [torch.empty(shape, dtype=dtype, device="meta") for shape in shapes]
                breakdown = memory_for_params(spec, policy, params)
                count = float(sum(p.numel() for p in params))
        except PolicyError as exc:
            raise UsageError(str(exc)) from None
        except ValueError as exc:  # a factored state on a 1-d shape
            raise UsageError(f"--model-shapes: {exc}") from None
        columns.append((text, breakdown, count))

    exact = shapes is not None
    what = f"bytes for shapes {args.model_shapes}" if exact else "bytes per parameter"
    if args.params is not None:
        what += f" (and for {args.params:g} parameters)"
    table = Table(title=f"{spec.title}: {what}")
    table.add_column("component", no_wrap=True)
    for text, _, _ in columns:
        table.add_column(text, justify="right")
    for key in columns[0][1].as_dict():
        if not exact and key in ("step", "maps"):
            continue  # per tensor, not per element: in the notes
        row = [key]
        for _, breakdown, count in columns:
            value = breakdown.as_dict()[key]
            if exact:
                row.append(human_bytes(value) + (f"\n{_number(round(value / count, 4))}/param" if count else ""))
            else:
                row.append(_number(round(value, 6)) + (f"\n{human_bytes(value * args.params)}" if args.params else ""))
        table.add_row(*row, end_section=key in ("maps", "state." + spec.state_names[-1]) if spec.states else False)
    console = Console()
    console.print(table)
    for note in notes:
        console.print(f"  {note}")
    return 0


COMMAND = Subcommand(
    "memory", "bytes per parameter (params, grads, master, each state) under precision policies", add_arguments, run
)
