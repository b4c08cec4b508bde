"""``portopt export onnx ALGORITHM --output FILE``: an algorithm's step as a file for another runtime."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from portopt.cli import Subcommand, UsageError
from portopt.cli_show import add_spec_source, spec_of
from portopt.spec.definition import Spec

if TYPE_CHECKING:
    from onnx import ModelProto


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # No backend import here (the parser is built for every subcommand): the lowering checks the values
    # and its errors list what it accepts.
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = sub.add_parser(
        "onnx",
        help="one step for one tensor as a standard ONNX model (inputs param, grad, states, step, hyperparameters)",
        description="Write one optimizer step for one tensor as a standard ONNX model: inputs param, grad, each "
        "state by name, step (float32, 1 at the first step), each hyperparameter (float32 scalars); outputs "
        "param_out and <state>_out. Any ONNX runtime runs it (onnxruntime: InferenceSession(FILE).run).",
    )
    add_spec_source(onnx)
    onnx.add_argument("--output", required=True, metavar="FILE", help="the .onnx file to write")
    onnx.add_argument(
        "-o",
        "--option",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="structural options, e.g. amsgrad=true maximize=true",
    )
    onnx.add_argument(
        "--dtype",
        default="float32",
        help="storage dtype of param, grad and states: float32, float16, bfloat16, float64",
    )
    onnx.add_argument(
        "--rank", type=int, default=None, help="dims of the tensor (default 1: flatten it; 2 if factored)"
    )
    onnx.add_argument("--opset", type=int, default=None, help="ai.onnx opset (default: 17, loadable almost anywhere)")
    onnx.add_argument(
        "--scalar-dtype",
        default="float64",
        help="type of the step-only arithmetic (bias corrections): float64, or float32 for runtimes without doubles",
    )
    onnx.add_argument(
        "--init-output", metavar="FILE", help="also write the states' initial values as a model (outputs <state>_init)"
    )


def _spec(args: argparse.Namespace) -> Spec:
    """The spec named on the command line: an algorithm, or ``--spec module:factory``."""
    return spec_of(args)


def run(args: argparse.Namespace) -> int:
    from portopt.backends.onnx import DEFAULT_OPSET, OnnxExportError
    from portopt.export import to_onnx

    spec = _spec(args)
    written: list[tuple[Path, str, ModelProto]] = []
    for init, path in ((False, args.output), (True, args.init_output)):
        if path is None:
            continue
        try:
            opset = DEFAULT_OPSET if args.opset is None else args.opset
            model = to_onnx(
                spec, init=init, dtype=args.dtype, rank=args.rank, opset=opset, scalar_dtype=args.scalar_dtype
            )
        except OnnxExportError as exc:
            raise UsageError(str(exc)) from None
        what = f"the {spec.title} states before the first step" if init else f"one {spec.title} step"
        written.append((Path(path), what, model))
    for path, what, model in written:
        try:
            path.write_bytes(model.SerializeToString())
        except OSError as exc:
            raise UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
        graph = model.graph
        print(
            f"wrote {path}: {what} for one tensor (opset {model.opset_import[0].version}, "
            f"IR {model.ir_version}, {len(graph.node)} nodes)\n"
            f"  inputs:  {', '.join(i.name for i in graph.input)}\n"
            f"  outputs: {', '.join(o.name for o in graph.output)}"
        )
    return 0


COMMAND = Subcommand("export", "write an algorithm's step for another runtime (onnx)", add_arguments, run)
