"""The op-contract layer: the one small table through which the NPU rules call Ascend's ops.

An :class:`NpuOps` holds the four vendor ops the rules use, under torch_npu's names and
signatures (``npu_apply_adam_w``, ``_fused_adamw_``, ``_fused_adam_``, ``_fused_sgd_``), the
SoC they run on and where they came from. The same rule code runs on either table:

* :func:`hardware_ops`: torch_npu's ops on NPU tensors, probed from the installed package
  (imported lazily, here and nowhere else): its version (it must be built for this torch's
  major.minor), which ops it registers (``torch_npu.npu_apply_adam_w``; the ``_fused_*`` ops
  count only where the dispatcher has a ``PrivateUse1`` kernel for them, i.e. torch_npu
  registered one), and the SoC (``torch_npu.npu.get_device_name``);
* :func:`contract_ops`: a module named by ``PORTOPT_NPU_OPS`` (default
  :mod:`portopt.backends.npu_emulation`, the CPU emulation written from the documented
  semantics), exposing some of the four functions with torch_npu's signatures and
  optionally ``soc_name()`` (the SoC whose kernel and dtype limits apply; without it, none
  do) and ``__version__``. A value that cannot be imported, or a module with none of the
  ops, is an :class:`NpuOpsError` naming the variable.

Nothing is imported or probed before a rule or ``portopt doctor`` asks.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

OP_NAMES = ("npu_apply_adam_w", "_fused_adamw_", "_fused_adam_", "_fused_sgd_")
"""The ops the NPU rules call, in torch_npu's names."""
OPS_VARIABLE = "PORTOPT_NPU_OPS"
DEFAULT_EMULATION = "portopt.backends.npu_emulation"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class NpuOpsError(ValueError):
    """The op module that ``PORTOPT_NPU_OPS`` names cannot serve as the NPU op table."""


@dataclass(frozen=True)
class NpuOps:
    """The NPU op table: each op's callable (or why it is absent), the SoC, and the table's origin.

    ``emulated`` is True for a table that is not torch_npu on an NPU (reports say so).
    """

    source: str
    version: str
    soc: str | None
    emulated: bool
    available: tuple[tuple[str, Callable[..., Any]], ...]
    absent: tuple[tuple[str, str], ...]

    def op(self, name: str) -> Callable[..., Any] | None:
        """The callable of op ``name``, or ``None``."""
        return dict(self.available).get(name)

    def missing_reason(self, name: str) -> str | None:
        """``None`` if op ``name`` is in the table, else why not."""
        if name in dict(self.available):
            return None
        return dict(self.absent).get(name, f"{self.source} has no {name}")


# --------------------------------------------------------------------------------------
# torch_npu on an Ascend machine.


def torch_npu_status() -> tuple[Any, str | None]:
    """``(torch_npu module, None)``, or ``(None, why it cannot be used)``: missing, broken (its import is
    tried once: :func:`portopt.backends.package_reason`), or built for another torch."""
    from portopt.backends import package_reason

    reason = package_reason("torch_npu")
    if reason is not None:
        return None, reason
    module = importlib.import_module("torch_npu")
    version = str(getattr(module, "__version__", "unknown"))
    if _major_minor(version) != _major_minor(torch.__version__):
        return None, (
            f"torch_npu {version} is built for torch {'.'.join(map(str, _major_minor(version)))}, "
            f"this is torch {torch.__version__} (install the matching pair: portopt[npu])"
        )
    return module, None


def _major_minor(version: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", version.split("+")[0])
    return tuple(int(n) for n in numbers[:2])


def registered_for_npu(op: str) -> bool:
    """Whether torch_npu registered an NPU (``PrivateUse1``) kernel for ``aten::<op>``."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "PrivateUse1"))
    except RuntimeError:  # an op this torch does not have
        return False


def npu_soc(module: Any) -> str | None:
    """The SoC name torch_npu reports for device 0, or ``None`` (no device, or no such API)."""
    try:
        if not module.npu.is_available():
            return None
        return str(module.npu.get_device_name(0))
    except Exception:
        return None


def hardware_ops() -> NpuOps | str:
    """torch_npu's op table, or why there is none (the package is missing or broken)."""
    module, reason = torch_npu_status()
    if module is None:
        assert reason is not None
        return reason
    return _hardware_table(module)


@functools.lru_cache(maxsize=1)
def _hardware_table(module: Any) -> NpuOps:
    version = str(getattr(module, "__version__", "unknown"))
    available: list[tuple[str, Callable[..., Any]]] = []
    absent: list[tuple[str, str]] = []
    apply_adam_w = getattr(module, "npu_apply_adam_w", None)
    if callable(apply_adam_w):
        available.append(("npu_apply_adam_w", apply_adam_w))
    else:
        absent.append(("npu_apply_adam_w", f"torch_npu {version} has no npu_apply_adam_w"))
    for name in OP_NAMES[1:]:
        if registered_for_npu(name):
            available.append((name, getattr(torch, name)))
        else:
            absent.append((name, f"torch_npu {version} registers no NPU kernel for aten::{name}"))
    return NpuOps(f"torch_npu {version}", version, npu_soc(module), False, tuple(available), tuple(absent))


# --------------------------------------------------------------------------------------
# An op module named by PORTOPT_NPU_OPS (the CPU emulation by default).


def contract_module_name(environ: Mapping[str, str] | None = None) -> str:
    """The op module the contract backend uses: ``$PORTOPT_NPU_OPS``, default the emulation."""
    return (environ if environ is not None else os.environ).get(OPS_VARIABLE, "").strip() or DEFAULT_EMULATION


def contract_ops() -> NpuOps:
    """The op table of the module ``PORTOPT_NPU_OPS`` names (read now); :class:`NpuOpsError` if it cannot be one."""
    return load_ops_module(contract_module_name())


def load_ops_module(name: str) -> NpuOps:
    """The op table of module ``name``: its functions named as torch_npu's ops, ``soc_name()``, ``__version__``.

    Built at every call (the import is cached by Python; ``soc_name()`` may read the
    environment), so a changed ``PORTOPT_NPU_OPS`` takes effect at the next step."""
    accepted = (
        f"a module exposing some of {', '.join(OP_NAMES)} with torch_npu's signatures (default {DEFAULT_EMULATION})"
    )
    if not _MODULE_NAME.match(name):
        raise NpuOpsError(f"{OPS_VARIABLE}={name!r} is not a module name; accepted: {accepted}")
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        raise NpuOpsError(
            f"{OPS_VARIABLE}={name!r}: cannot import it ({type(exc).__name__}: {exc}); accepted: {accepted}"
        ) from None
    available: list[tuple[str, Callable[..., Any]]] = []
    absent: list[tuple[str, str]] = []
    for op in OP_NAMES:
        fn = getattr(module, op, None)
        if fn is None:
            absent.append((op, f"{name} has no {op}"))
        elif not callable(fn):
            raise NpuOpsError(f"{OPS_VARIABLE}={name!r}: {name}.{op} is not callable; accepted: {accepted}")
        else:
            available.append((op, fn))
    if not available:
        raise NpuOpsError(f"{OPS_VARIABLE}={name!r}: module {name} has none of the ops; accepted: {accepted}")
    soc_fn = getattr(module, "soc_name", None)
    soc = str(soc_fn()) if callable(soc_fn) else None
    version = str(getattr(module, "__version__", ""))
    return NpuOps(name, version, soc, True, tuple(available), tuple(absent))


def contract_unavailable_reason() -> str | None:
    """``None`` if the contract op table loads, else the :class:`NpuOpsError` message."""
    try:
        contract_ops()
    except NpuOpsError as exc:
        return str(exc)
    return None
