"""What this machine offers portopt: versions, CPU features, devices, backends and vendor kernels, and why not.

The facts behind ``portopt doctor`` (:mod:`portopt.cli_doctor` renders them). Every
function here returns rows of text and never raises: a probe that fails becomes a row that
says why. torch is imported inside the functions, so a torch that cannot be imported
(torch_npu installed without CANN makes ``import torch`` fail through its ``torch.backends``
entry point) is reported, with the way around it, instead of ending the command.

Files read (the CANN version, the CPU model) are data: at most 64 KiB each, parsed as
``key=value`` or ``key : value`` lines, nothing evaluated.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

MAX_FILE_BYTES = 64 * 1024
CANN_ROOTS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/cann", "/usr/local/Ascend/ascend-toolkit")
CANN_VARIABLES = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
CANN_FILES = ("ascend_toolkit_install.info", "version.cfg", "version.info")
ISA_FLAGS = (
    ("SSE4.2", "sse4_2"),
    ("AVX", "avx"),
    ("AVX2", "avx2"),
    ("FMA", "fma"),
    ("AVX-512F", "avx512f"),
    ("AVX-512BW", "avx512bw"),
    ("AVX-512VL", "avx512vl"),
    ("AVX-512 VNNI", "avx512_vnni"),
    ("AVX-512 BF16", "avx512_bf16"),
    ("AVX-512 FP16", "avx512_fp16"),
    ("AMX-TILE", "amx_tile"),
    ("AMX-BF16", "amx_bf16"),
    ("AMX-INT8", "amx_int8"),
    ("NEON/ASIMD", "asimd"),
    ("SVE", "sve"),
)
"""(shown name, /proc/cpuinfo flag) of the instruction sets that matter to CPU kernels."""
DEVICE_TYPES = ("cpu", "cuda", "npu", "xpu", "mps")


@dataclass(frozen=True)
class KernelRow:
    """A vendor op as one backend uses it on one device type, for some dtypes: ``why_not`` is ``None`` where the
    backend hands those dtypes to the op, else the reason."""

    backend: str
    op: str
    device: str
    dtypes: str
    why_not: str | None


def _guard(what: str, fn: Callable[[], list[Any]]) -> list[Any]:
    """``fn()``, or a single row saying why ``what`` could not be determined."""
    try:
        return fn()
    except Exception as exc:
        return [(what, f"could not be determined: {type(exc).__name__}: {exc}")]


@functools.cache
def import_torch() -> tuple[ModuleType | None, str | None]:
    """``(torch, None)`` or ``(None, why it cannot be imported)``; tried once (a second import of a torch whose
    first import failed half-way can crash the interpreter)."""
    try:
        return importlib.import_module("torch"), None
    except Exception as exc:
        hint = ""
        if "backend extension" in str(exc) or _torch_backend_entry_points():
            hint = (
                " — a torch.backends entry point failed to load (torch_npu without Ascend's CANN libraries?); "
                "TORCH_DEVICE_BACKEND_AUTOLOAD=0 skips it"
            )
        return None, f"import torch failed: {type(exc).__name__}: {exc}{hint}"


def _torch_backend_entry_points() -> list[str]:
    try:
        return [f"{e.name} = {e.value}" for e in importlib.metadata.entry_points(group="torch.backends")]
    except Exception:
        return []


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------
# Versions.


def versions() -> list[tuple[str, str]]:
    """Python, platform, portopt, torch, torch_npu and CANN versions (or why they are absent)."""
    import portopt

    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("portopt", portopt.__version__),
    ]
    torch, error = import_torch()
    if torch is None:
        rows.append(("torch", error or "not importable"))
    else:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        rows.append(("torch", f"{torch.__version__} ({build})"))
    entry_points = _torch_backend_entry_points()
    if entry_points:
        rows.append(("torch device backends", "; ".join(entry_points) + " (loaded by `import torch`)"))
    rows.append(("torch_npu", _torch_npu_line(torch is not None)))
    rows.append(("CANN", cann_version(torch is not None)))
    if torch is not None:
        rows.append(("NPU op contract", _contract_line()))
    return rows


def _contract_line() -> str:
    from portopt.backends.npu.ops import OPS_VARIABLE, NpuOpsError, contract_ops

    try:
        table = contract_ops()
    except NpuOpsError as exc:
        return str(exc)
    version = f" ({table.version})" if table.version else ""
    return (
        f"{table.source}{version}, SoC {table.soc or 'unknown'}: the ops npu-contract runs on CPU "
        f"(${OPS_VARIABLE} names another module)"
    )


def _torch_npu_line(torch_ok: bool) -> str:
    installed = _distribution_version("torch_npu")
    if installed is None and importlib.util.find_spec("torch_npu") is None:
        return "not installed (pip install 'portopt[npu]' on an Ascend machine with CANN)"
    if not torch_ok:
        return f"installed ({installed or 'version unknown'}); not imported: torch does not import"
    from portopt.backends.npu.ops import torch_npu_status

    module, reason = torch_npu_status()
    if module is None:
        return f"installed ({installed or 'version unknown'}), unusable: {reason}"
    return str(getattr(module, "__version__", installed or "unknown"))


def cann_version(torch_ok: bool = True) -> str:
    """CANN's version: torch_npu's ``get_cann_version()`` where torch_npu imports, else the toolkit's files."""
    if torch_ok and importlib.util.find_spec("torch_npu") is not None:
        from portopt.backends.npu.ops import torch_npu_status

        module, _ = torch_npu_status()
        for holder in (getattr(module, "utils", None), getattr(getattr(module, "npu", None), "utils", None)):
            getter = getattr(holder, "get_cann_version", None)
            if callable(getter):
                try:
                    version = str(getter("CANN"))
                except Exception:
                    continue
                if version:
                    return f"{version} (torch_npu.utils.get_cann_version)"
    roots = [os.environ[v] for v in CANN_VARIABLES if os.environ.get(v)] + list(CANN_ROOTS)
    for root in roots:
        found = _version_file(Path(root))
        if found is not None:
            return found
    where = ", ".join(f"${v}" for v in CANN_VARIABLES) + ", " + ", ".join(CANN_ROOTS)
    return f"not found (no {' / '.join(CANN_FILES)} under {where})"


def _version_file(root: Path) -> str | None:
    if not root.is_dir():
        return None
    candidates = [root / name for name in CANN_FILES]
    with contextlib.suppress(OSError):  # an unreadable folder: look at its top level only
        candidates += [child / name for child in sorted(root.iterdir()) if child.is_dir() for name in CANN_FILES]
    for path in candidates:
        version = _read_version(path)
        if version:
            return f"{version} ({path})"
    return None


def _read_version(path: Path) -> str | None:
    try:
        if not path.is_file():
            return None
        with path.open("rb") as f:
            text = f.read(MAX_FILE_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() in ("version", "toolkit_version", "package_version"):
            return value.strip().strip("\"'") or None
    return None


# --------------------------------------------------------------------------------------
# The CPU.


def cpu_facts() -> list[tuple[str, str]]:
    """The CPU model, its instruction sets that matter to kernels, and torch's CPU capability."""
    info = _cpuinfo()
    rows = [("model", info.get("model name") or platform.processor() or platform.machine() or "unknown")]
    rows.append(("cores", str(os.cpu_count() or "unknown")))
    flags = set(info.get("flags", info.get("Features", "")).split())
    if flags:
        present = [name for name, flag in ISA_FLAGS if flag in flags]
        rows.append(("instruction sets", ", ".join(present) or "none of " + ", ".join(n for n, _ in ISA_FLAGS)))
    else:
        rows.append(("instruction sets", "unknown (no /proc/cpuinfo flags on this system)"))
    torch, error = import_torch()
    if torch is not None:
        capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
        rows.append(("torch CPU capability", str(capability()) if callable(capability) else "unknown"))
        rows.append(("torch threads", str(torch.get_num_threads())))
    else:
        rows.append(("torch CPU capability", error or "unknown"))
    return rows


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key : value`` lines of /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            text = f.read(MAX_FILE_BYTES).decode("utf-8", "replace")
    except OSError:
        return {}
    facts: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and facts:
            break
        key, sep, value = line.partition(":")
        if sep:
            facts.setdefault(key.strip(), value.strip())
    return facts


# --------------------------------------------------------------------------------------
# Devices and backends.


def devices() -> list[tuple[str, str, str]]:
    """``(device type, "yes"/"no", names or why not)`` for every device type portopt knows."""
    torch, error = import_torch()
    if torch is None:
        return [(t, "yes" if t == "cpu" else "unknown", error or "") for t in DEVICE_TYPES]
    from portopt.backends import device_unavailable_reason

    rows = []
    for device_type in DEVICE_TYPES:
        reason = _guard_text(functools.partial(device_unavailable_reason, device_type))
        if reason is not None:
            rows.append((device_type, "no", reason))
            continue
        rows.append((device_type, "yes", _guard_text(functools.partial(_device_names, torch, device_type)) or ""))
    return rows


def _guard_text(fn: Callable[[], str | None]) -> str | None:
    try:
        return fn()
    except Exception as exc:
        return f"could not be determined: {type(exc).__name__}: {exc}"


def _device_names(torch: Any, device_type: str) -> str:
    if device_type == "cpu":
        return _cpuinfo().get("model name") or platform.machine()
    module = getattr(torch, device_type, None)
    count = int(getattr(module, "device_count", lambda: 1)())
    name_of = getattr(module, "get_device_name", None)
    if device_type == "npu":
        from portopt.backends.npu.ops import torch_npu_status

        npu_module, _ = torch_npu_status()
        name_of = getattr(getattr(npu_module, "npu", None), "get_device_name", name_of)
    if not callable(name_of):
        return f"{count} device(s)"
    return "; ".join(f"{device_type}:{i} {name_of(i)}" for i in range(count))


def backends() -> list[tuple[str, str, str]]:
    """``(name, "yes"/"no", how it is chosen or why it is unusable)`` for every backend."""
    torch, error = import_torch()
    if torch is None:
        return [("(all)", "no", error or "torch does not import")]
    from portopt.backends import available

    return [(row.name, "yes" if row.usable else "no", row.reason) for row in available()]


# --------------------------------------------------------------------------------------
# Vendor kernels.


def vendor_kernels() -> list[KernelRow]:
    """torch's fused kernels and the NPU ops, per backend, op and device type: which dtypes, and why not."""
    torch, error = import_torch()
    if torch is None:
        return [KernelRow("(all)", "-", "-", "-", error or "torch does not import")]
    rows = _guard("torch fused kernels", lambda: _torch_fused_rows(torch))
    rows += _guard("npu kernels", _npu_rows)
    return [r if isinstance(r, KernelRow) else KernelRow(r[0], "-", "-", "-", r[1]) for r in rows]


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _summarise(backend: str, op: str, device: str, verdicts: Iterable[tuple[str, str | None]]) -> list[KernelRow]:
    """Rows from ``(dtype name, reason or None)`` verdicts of every configuration of ``op``: the dtypes used, then
    the refused ones grouped by reason (a dtype is refused when some configuration refuses it)."""
    first: dict[str, str | None] = {}
    for dtype, reason in verdicts:
        if first.get(dtype) is None:
            first[dtype] = reason
    grouped: dict[str | None, list[str]] = {}
    for dtype, reason in first.items():
        grouped.setdefault(reason, []).append(dtype)
    ordered = sorted(grouped.items(), key=lambda item: item[0] is not None)
    return [KernelRow(backend, op, device, ", ".join(dtypes), why) for why, dtypes in ordered]


def _torch_fused_rows(torch: Any) -> list[KernelRow]:
    from portopt.backends import device_unavailable_reason
    from portopt.backends.torch_fused import FUSED_DEVICE_TYPES, KERNELS, NAME, dtype_reason

    rows = []
    ops = sorted({k.spec.name for k in KERNELS})
    for device_type in FUSED_DEVICE_TYPES:
        absent = device_unavailable_reason(device_type)
        if absent is not None:
            rows.append(KernelRow(NAME, ", ".join(ops), device_type, "all", absent))
            continue
        for op in ops:
            configs = [k for k in KERNELS if k.spec.name == op]
            verdicts = [
                (name, dtype_reason(k, device_type, getattr(torch, name))) for name in DTYPE_NAMES for k in configs
            ]
            rows += _summarise(NAME, op, device_type, verdicts)
    return rows


def _npu_rows() -> list[KernelRow]:
    import torch

    from portopt.backends.npu import CONTRACT_NAME, NAME
    from portopt.backends.npu.kernels import KERNELS
    from portopt.backends.npu.ops import OP_NAMES, NpuOps, NpuOpsError, contract_ops, hardware_ops
    from portopt.backends.npu.step import kernel_reason

    contract: NpuOps | str
    try:
        contract = contract_ops()
    except NpuOpsError as exc:
        contract = str(exc)
    rows = []
    for backend, ops, device_type in ((NAME, hardware_ops(), "npu"), (CONTRACT_NAME, contract, "cpu")):
        if isinstance(ops, str):
            rows.append(KernelRow(backend, ", ".join(OP_NAMES), device_type, "all", ops))
            continue
        table = ops
        for op in OP_NAMES:
            verdicts = [
                (name, kernel_reason(table, k, device_type, getattr(torch, name)))
                for name in DTYPE_NAMES
                for k in KERNELS
                if k.op == op
            ]
            where = f"{device_type} ({'emulated ' if table.emulated else ''}{table.soc or 'SoC unknown'})"
            rows += _summarise(backend, op, where, verdicts)
    return rows
