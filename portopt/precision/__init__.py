"""Precision policies: master weights, bf16 and 8-bit states, stochastic rounding, loss scaling.

* :mod:`~portopt.precision.policy`: :class:`PrecisionPolicy`, presets, the text form;
* :mod:`~portopt.precision.storage`: states in their storage form (``decode``/``encode``),
  master weights;
* :mod:`~portopt.precision.quantize`: 8-bit block-wise quantisation with dynamic maps;
* :mod:`~portopt.precision.rounding`: round-to-nearest and stochastic rounding to bfloat16;
* :mod:`~portopt.precision.signs`: which states are provably non-negative (unsigned map);
* :mod:`~portopt.precision.scaling`: GradScaler's ``grad_scale``/``found_inf`` inside the step;
* :mod:`~portopt.precision.memory`: bytes per parameter, and exact bytes for a model.

Where they are used: ``precision=`` on every optimizer (per param group) and
``torch.amp.GradScaler`` are handled by the front end (:mod:`portopt.optim.amp`: master
weights, unscaling, skipped steps) for every backend; bf16 and 8-bit states and stochastic
rounding by a backend's ``build_with_policy`` (the generic backend's
:mod:`portopt.backends.torch_policy`).
"""

from portopt.precision.memory import MemoryBreakdown, bytes_per_parameter, memory_for_params
from portopt.precision.policy import (
    PRESETS,
    PolicyError,
    PrecisionPolicy,
    StateStorage,
    as_policy,
    parse_policy,
    preset,
)
from portopt.precision.quantize import Q8State
from portopt.precision.scaling import LossScaling, prepare_gradients
from portopt.precision.storage import (
    StateFormat,
    StoredState,
    allocate_state,
    create_master,
    decode,
    encode,
    state_format,
    state_nbytes,
    stores_like_torch,
    write_back,
)

__all__ = [
    "PRESETS",
    "LossScaling",
    "MemoryBreakdown",
    "PolicyError",
    "PrecisionPolicy",
    "Q8State",
    "StateFormat",
    "StateStorage",
    "StoredState",
    "allocate_state",
    "as_policy",
    "bytes_per_parameter",
    "create_master",
    "decode",
    "encode",
    "memory_for_params",
    "parse_policy",
    "prepare_gradients",
    "preset",
    "state_format",
    "state_nbytes",
    "stores_like_torch",
    "write_back",
]
