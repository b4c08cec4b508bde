"""What a spec may know of a tensor before reading it: its shape and its dtype.

:class:`TensorFacts` are the values of the shape leaves (``numel(p)``, ``ndim(p)``,
``size(p, axis)``, ``finfo(p).eps``): per tensor, known on the host, never read from device
memory. A spec whose ``where`` conditions or state ``when=`` clauses depend only on these
facts (``ndim(p) >= 2``) is *shape-dependent*: each tensor runs the plain spec of its shape
class (:meth:`portopt.spec.Spec.specialize`), so a factored state exists only for matrices.

The dtype is the stepped tensor's (the parameter, or its float32 master copy under master
weights): ``finfo`` follows torch's :class:`torch.finfo` of it, tabulated here so that the
spec layer needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from portopt.spec.errors import SpecError

FINFO: dict[str, dict[str, float]] = {
    "float64": {"eps": 2.0**-52, "tiny": 2.0**-1022, "max": (2 - 2.0**-52) * 2.0**1023},
    "float32": {"eps": 2.0**-23, "tiny": 2.0**-126, "max": (2 - 2.0**-23) * 2.0**127},
    "float16": {"eps": 2.0**-10, "tiny": 2.0**-14, "max": 65504.0},
    "bfloat16": {"eps": 2.0**-7, "tiny": 2.0**-126, "max": (2 - 2.0**-7) * 2.0**127},
}
"""``torch.finfo(dtype).eps/.tiny/.max`` of the floating dtypes a parameter may have."""


@dataclass(frozen=True)
class TensorFacts:
    """The shape and dtype (``"float32"``, ...) of one stepped tensor."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in FINFO:
            raise SpecError(f"tensor dtype {self.dtype!r} is not a floating dtype a spec knows ({', '.join(FINFO)})")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, axis: int) -> float:
        """The size of ``axis`` (negative from the end); 1 for an axis the tensor lacks, as broadcasting does."""
        if -self.ndim <= axis < self.ndim:
            return float(self.shape[axis])
        return 1.0

    def finfo(self, field: str) -> float:
        return FINFO[self.dtype][field]


SAMPLE_SHAPES: tuple[tuple[int, ...], ...] = (
    (),
    (0,),
    (1,),
    (3,),
    (1, 1),
    (3, 1),
    (1, 3),
    (2, 3),
    (0, 3),
    (2, 0),
    (2, 3, 4),
    (2, 1, 3),
    (2, 3, 1, 4),
)
"""Shapes a shape-dependent spec is checked on when it is built: every rank up to 4, empty
axes and axes of size 1 (the cases a factored state treats specially)."""
