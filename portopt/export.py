"""Export an algorithm's step for other runtimes: :func:`to_onnx`.

::

    import onnx
    from portopt.export import to_onnx

    onnx.save(to_onnx("adamw"), "adamw.onnx")  # one AdamW step for one (flattened) tensor
    onnx.save(to_onnx("adamw", init=True), "adamw_init.onnx")  # its states before the first step

The model's interface, numerics and versions are described in :mod:`portopt.backends.onnx`
(inputs ``param``, ``grad``, each state by name, ``step``, each hyperparameter by name;
outputs ``param_out`` and ``<state>_out``). Needs the ``onnx`` package (``portopt[onnx]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from portopt.backends.onnx import (
    DEFAULT_OPSET,
    DTYPES,
    SCALAR_DTYPES,
    OnnxExportError,
    StepTypes,
    init_to_onnx,
    spec_to_onnx,
)
from portopt.spec.definition import OptionValue, Spec

if TYPE_CHECKING:
    import onnx

__all__ = ["DEFAULT_OPSET", "DTYPES", "SCALAR_DTYPES", "OnnxExportError", "StepTypes", "to_onnx"]


def to_onnx(
    spec: Spec | str,
    *,
    options: Mapping[str, OptionValue] | None = None,
    init: bool = False,
    dtype: str = "float32",
    types: StepTypes | None = None,
    rank: int | None = None,
    opset: int = DEFAULT_OPSET,
    scalar_dtype: str = "float64",
) -> onnx.ModelProto:
    """The ONNX model of one step of ``spec`` (with ``init``: of its initial states), checked.

    ``spec`` is a :class:`~portopt.spec.Spec` or an algorithm's name, built with ``options``
    (``{"amsgrad": True}``, ``{"maximize": True}``); ``dtype`` (``float32``, ``float16``,
    ``bfloat16``, ``float64``) is the storage dtype of the parameter, gradient and element-wise
    states (``types`` sets each); ``rank`` the number of dynamic dims (default 1, or 2 for a
    factored spec); ``opset`` the ai.onnx opset; ``scalar_dtype`` (``float64`` or ``float32``)
    the type of the step-only arithmetic. Raises :class:`OnnxExportError` for what cannot be
    written and ``ValueError`` for an unknown algorithm or option.
    """
    if isinstance(spec, str):
        from portopt.cli_options import build_spec

        spec = build_spec(spec, options)
    elif options:
        raise ValueError("options= builds an algorithm by name; pass them to the spec's factory instead")
    lower = init_to_onnx if init else spec_to_onnx
    return lower(spec, dtype=dtype, types=types, rank=rank, opset=opset, scalar_dtype=scalar_dtype)
