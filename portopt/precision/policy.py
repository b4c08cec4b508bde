"""Precision policies: how an optimizer stores its numbers, separate from what it computes.

A :class:`PrecisionPolicy` is an immutable, hashable value (it can sit in a param group:
each group may carry its own) made of independent choices:

* ``param_dtype``: the parameters' dtype *as expected*, never forced: the model owns its
  parameters; ``None`` accepts any, a dtype is checked (:meth:`PrecisionPolicy.check_param`)
  and is what memory accounting assumes when no dtype is given.
* ``master_weights``: keep a float32 master copy of float16/bfloat16 parameters; the update
  runs on the master and is written back to the parameter once per step (one rounding).
  No effect on float32/float64 parameters.
* ``states`` and ``state_overrides``: the storage of each state, by name (below).
* ``compute_dtype``: the dtype of the element-wise arithmetic: float32 (or float64; the
  wider of it and the parameter dtype is used, so float64 parameters compute in float64).
* ``stochastic_rounding``: bfloat16 stores (bf16 states, and bf16 parameters updated
  without a master) round stochastically, with noise keyed by ``(seed, step, tensor index)``
  (:meth:`PrecisionPolicy.rounding_key`, :mod:`portopt.precision.rounding`); otherwise every
  store rounds to nearest. A write-back from a master always rounds to nearest.
* ``min_8bit_size`` and ``block_size``: a state asked to be ``q8`` is quantised only when it
  has at least ``min_8bit_size`` elements (4096, as bitsandbytes' ``min_8bit_size``:
  smaller ones cost little and stay ``fp32``); blocks of ``block_size`` elements share one
  float32 absmax (:mod:`portopt.precision.quantize`).

State storage (:class:`StateStorage`): ``fp32`` (at least float32: float64 parameters keep
float64 states), ``bf16``, ``q8`` (8-bit block-wise; the signed or unsigned map chosen by
whether the spec proves the state non-negative), or ``param`` (the parameter's own dtype,
what torch.optim does). Per-tensor states (``Layout.TENSOR``, e.g. NAdam's ``mu_product``)
are step-like scalars and always kept at compute precision.

Text form (the CLI, and a param group that holds a string): comma-separated items; the first
may be a preset name (:data:`PRESETS`), the others ``key=value``: ``params=any|fp32|fp64|bf16|fp16``,
``master=fp32|none``, ``states=fp32|bf16|q8|param``, ``compute=fp32|fp64``, ``sr=true|false``,
``seed=N``, ``min_8bit_size=N``, ``block_size=N``; any other key names a state and overrides its
storage: ``"mixed-bf16,exp_avg_sq=q8"``, ``"master=fp32,states=q8,exp_avg=bf16"``.
:meth:`PrecisionPolicy.to_text` writes the canonical form that :func:`parse_policy` reads back.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

import torch

from portopt.precision.quantize import BLOCK_SIZE
from portopt.precision.rounding import noise_key


class PolicyError(ValueError):
    """An invalid precision policy: the message names the field, the value and what is accepted."""


class StateStorage(enum.Enum):
    """How one state is stored between steps."""

    FP32 = "fp32"
    BF16 = "bf16"
    Q8 = "q8"
    PARAM = "param"


DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})
"""Parameter dtypes that get a master copy under ``master_weights``."""

MIN_8BIT_SIZE = 4096
_COMPUTE_DTYPES = (torch.float32, torch.float64)
_STORAGE_WORDS = ", ".join(s.value for s in StateStorage)
_BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "1": True, "0": False}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the names of :data:`DTYPE_NAMES`; else torch's own)."""
    for name, known in DTYPE_NAMES.items():
        if known == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def _storage(value: object, field_name: str) -> StateStorage:
    if isinstance(value, StateStorage):
        return value
    if isinstance(value, str):
        try:
            return StateStorage(value.lower())
        except ValueError:
            pass
    raise PolicyError(f"Invalid precision policy: {field_name}={value!r} (accepted: {_STORAGE_WORDS})")


def _dtype(value: object, field_name: str, accepted: Iterable[torch.dtype]) -> torch.dtype:
    allowed = tuple(accepted)
    dtype = DTYPE_NAMES.get(value.lower()) if isinstance(value, str) else value
    if isinstance(dtype, torch.dtype) and dtype in allowed:
        return dtype
    words = ", ".join(dtype_name(d) for d in allowed)
    raise PolicyError(f"Invalid precision policy: {field_name}={value!r} (accepted: {words})")


def _int(value: object, field_name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PolicyError(f"Invalid precision policy: {field_name}={value!r} (an integer >= {low})")
    return value


def _bool(value: object, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"Invalid precision policy: {field_name}={value!r} (True or False)")
    return value


@dataclass(frozen=True)
class PrecisionPolicy:
    """Storage choices for parameters and states (see the module doc for each field).

    Fields are typed strictly; at run time, string forms are accepted too and normalised
    (``states="q8"``, ``param_dtype="bf16"``, ``state_overrides={"exp_avg": "bf16"}``), so that
    equal policies compare and hash equal whatever form they were written in.
    """

    param_dtype: torch.dtype | None = None
    master_weights: bool = False
    states: StateStorage = StateStorage.PARAM
    state_overrides: tuple[tuple[str, StateStorage], ...] = ()
    compute_dtype: torch.dtype = torch.float32
    stochastic_rounding: bool = False
    seed: int = 0
    min_8bit_size: int = MIN_8BIT_SIZE
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.param_dtype is not None:
            set_(self, "param_dtype", _dtype(self.param_dtype, "param_dtype", DTYPE_NAMES.values()))
        set_(self, "master_weights", _bool(self.master_weights, "master_weights"))
        set_(self, "states", _storage(self.states, "states"))
        overrides: object = self.state_overrides
        pairs = overrides.items() if isinstance(overrides, Mapping) else overrides
        if not isinstance(pairs, Iterable) or isinstance(pairs, str):
            raise PolicyError(
                f"Invalid precision policy: state_overrides={overrides!r} (a mapping state name -> storage)"
            )
        normalised: dict[str, StateStorage] = {}
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
                raise PolicyError(
                    f"Invalid precision policy: state_overrides entry {pair!r} (a (state name, storage) pair)"
                )
            normalised[pair[0]] = _storage(pair[1], pair[0])
        set_(self, "state_overrides", tuple(sorted(normalised.items())))
        set_(self, "compute_dtype", _dtype(self.compute_dtype, "compute_dtype", _COMPUTE_DTYPES))
        set_(self, "stochastic_rounding", _bool(self.stochastic_rounding, "stochastic_rounding"))
        set_(self, "seed", _int(self.seed, "seed", 0))
        set_(self, "min_8bit_size", _int(self.min_8bit_size, "min_8bit_size", 0))
        set_(self, "block_size", _int(self.block_size, "block_size", 1))

    # queries -------------------------------------------------------------------
    def storage_of(self, state_name: str) -> StateStorage:
        """The storage requested for state ``state_name`` (its override, else ``states``)."""
        return dict(self.state_overrides).get(state_name, self.states)

    def needs_master(self, param_dtype: torch.dtype) -> bool:
        """True when a parameter of ``param_dtype`` gets a float32 master copy."""
        return self.master_weights and param_dtype in LOW_PRECISION

    def compute_dtype_for(self, param_dtype: torch.dtype) -> torch.dtype:
        """float64 when the policy or the parameter is float64, else float32."""
        return torch.float64 if torch.float64 in (self.compute_dtype, param_dtype) else torch.float32

    def rounding_key(self, step: int, tensor_index: int) -> int | None:
        """Noise key of one bf16 store (``None``: round to nearest).

        ``tensor_index`` numbers every stored tensor of the optimizer stably (a backend uses
        ``param_index · (number of states + 1) + slot``, slot 0 for the parameter itself and
        ``1 + i`` for its ``i``-th declared state), so that no two stores of a step share noise.
        """
        if not self.stochastic_rounding:
            return None
        return noise_key(self.seed, step, tensor_index)

    # checks against a model and an algorithm -------------------------------------
    def check_param(self, param: torch.Tensor, where: str = "parameter") -> None:
        """Raise :class:`PolicyError` if ``param`` is not of the expected ``param_dtype``."""
        if self.param_dtype is not None and param.dtype != self.param_dtype:
            raise PolicyError(
                f"precision policy {self.to_text()!r} expects {dtype_name(self.param_dtype)} parameters, "
                f"but {where} is {dtype_name(param.dtype)}; convert the model (model.to({self.param_dtype})) "
                f"or use params=any"
            )

    def check_states(self, state_names: Iterable[str], algorithm: str) -> None:
        """Raise :class:`PolicyError` if an override names a state that ``algorithm`` does not have."""
        names = tuple(state_names)
        unknown = [name for name, _ in self.state_overrides if name not in names]
        if unknown:
            raise PolicyError(
                f"precision policy overrides state {unknown[0]!r}, which {algorithm} does not have "
                f"(its states: {', '.join(names) or 'none'}; policy keys: {', '.join(POLICY_KEYS)})"
            )

    # text form ----------------------------------------------------------------------
    def to_text(self) -> str:
        """Canonical text, read back by :func:`parse_policy` (always starts with ``states=``)."""
        items = [f"states={self.states.value}"]
        if self.param_dtype is not None:
            items.append(f"params={dtype_name(self.param_dtype)}")
        if self.master_weights:
            items.append("master=fp32")
        if self.compute_dtype != torch.float32:
            items.append(f"compute={dtype_name(self.compute_dtype)}")
        if self.stochastic_rounding:
            items.append("sr=true")
        for key in ("seed", "min_8bit_size", "block_size"):
            value = getattr(self, key)
            if value != _DEFAULTS[key]:
                items.append(f"{key}={value}")
        items.extend(f"{name}={storage.value}" for name, storage in self.state_overrides)
        return ",".join(items)

    def __str__(self) -> str:
        return self.to_text()


_DEFAULTS = {f.name: f.default for f in fields(PrecisionPolicy)}

POLICY_KEYS = ("params", "master", "states", "compute", "sr", "seed", "min_8bit_size", "block_size")
"""Reserved keys of the text form; any other key is a state name."""

PRESETS: dict[str, tuple[PrecisionPolicy, str]] = {
    "torch": (PrecisionPolicy(), "states in the parameter dtype, no master (torch.optim's behaviour)"),
    "fp32": (PrecisionPolicy(states=StateStorage.FP32), "fp32 states whatever the parameter dtype"),
    "bf16-states": (PrecisionPolicy(states=StateStorage.BF16), "bf16 states, rounded to nearest"),
    "bf16-states-sr": (
        PrecisionPolicy(states=StateStorage.BF16, stochastic_rounding=True),
        "bf16 states, rounded stochastically",
    ),
    "q8-states": (PrecisionPolicy(states=StateStorage.Q8), "8-bit block-wise states (small tensors fp32)"),
    "mixed-bf16": (
        PrecisionPolicy(param_dtype=torch.bfloat16, master_weights=True, states=StateStorage.FP32),
        "bf16 params, fp32 master, fp32 states",
    ),
    "mixed-fp16": (
        PrecisionPolicy(param_dtype=torch.float16, master_weights=True, states=StateStorage.FP32),
        "fp16 params, fp32 master, fp32 states (use with a GradScaler)",
    ),
    "mixed-bf16-q8": (
        PrecisionPolicy(param_dtype=torch.bfloat16, master_weights=True, states=StateStorage.Q8),
        "bf16 params, fp32 master, 8-bit states",
    ),
    "pure-bf16": (
        PrecisionPolicy(param_dtype=torch.bfloat16, states=StateStorage.PARAM),
        "bf16 params and states, no master, rounded to nearest",
    ),
    "pure-bf16-sr": (
        PrecisionPolicy(param_dtype=torch.bfloat16, states=StateStorage.PARAM, stochastic_rounding=True),
        "bf16 params and states, no master, rounded stochastically",
    ),
}
"""Named policies: name -> (policy, one-line description)."""


def preset(name: str) -> PrecisionPolicy:
    """The preset ``name``; unknown names raise :class:`PolicyError` listing the presets."""
    try:
        return PRESETS[name.lower()][0]
    except KeyError:
        raise PolicyError(
            f"Invalid precision policy: unknown preset {name!r} (presets: {', '.join(PRESETS)})"
        ) from None


def preset_name(policy: PrecisionPolicy) -> str | None:
    """The name of the preset equal to ``policy``, if any."""
    return next((name for name, (known, _) in PRESETS.items() if known == policy), None)


def _parse_bool(text: str, key: str) -> bool:
    try:
        return _BOOL_WORDS[text.lower()]
    except KeyError:
        raise PolicyError(f"Invalid precision policy: {key}={text!r} (accepted: true, false)") from None


def _parse_int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise PolicyError(f"Invalid precision policy: {key}={text!r} (an integer)") from None


def parse_policy(text: str) -> PrecisionPolicy:
    """Read the text form (module doc): ``"mixed-bf16"``, ``"master=fp32,states=q8,exp_avg=bf16"``, ..."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise PolicyError(f"Invalid precision policy {text!r}: empty item (write a preset or key=value items)")
    policy = PrecisionPolicy()
    if "=" not in items[0]:
        policy = preset(items[0])
        items = items[1:]
    changes: dict[str, object] = {}
    overrides = dict(policy.state_overrides)
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise PolicyError(
                f"Invalid precision policy item {item!r}: expected key=value (keys: {', '.join(POLICY_KEYS)}, "
                f"or a state name); a preset may only come first (presets: {', '.join(PRESETS)})"
            )
        if key == "params":
            changes["param_dtype"] = None if value.lower() == "any" else _dtype(value, "params", DTYPE_NAMES.values())
        elif key == "master":
            if value.lower() not in ("fp32", "none"):
                raise PolicyError(f"Invalid precision policy: master={value!r} (accepted: fp32, none)")
            changes["master_weights"] = value.lower() == "fp32"
        elif key == "states":
            changes["states"] = _storage(value, "states")
        elif key == "compute":
            changes["compute_dtype"] = _dtype(value, "compute", _COMPUTE_DTYPES)
        elif key == "sr":
            changes["stochastic_rounding"] = _parse_bool(value, key)
        elif key in ("seed", "min_8bit_size", "block_size"):
            changes[key] = _parse_int(value, key)
        else:
            overrides[key] = _storage(value, key)
    return replace(policy, state_overrides=tuple(overrides.items()), **changes)  # type: ignore[arg-type]


def as_policy(value: PrecisionPolicy | str | None) -> PrecisionPolicy:
    """A policy from a param group's ``precision`` entry: a policy, its text form, or ``None`` (default)."""
    if value is None:
        return PrecisionPolicy()
    if isinstance(value, PrecisionPolicy):
        return value
    if isinstance(value, str):
        return parse_policy(value)
    raise PolicyError(
        f"Invalid precision policy: {value!r} ({type(value).__name__}); give a PrecisionPolicy, "
        f"a preset name ({', '.join(PRESETS)}) or key=value text"
    )
