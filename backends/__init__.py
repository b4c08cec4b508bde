"""Backends, imported as ``portopt.backends.<name>``; each registers itself on import.

Importing this package registers the built-in backends ``reference`` and ``torch``;
``torch_fused``, ``compiled``, ``onnx``, ``npu`` and ``npu-contract`` register on first use.
Third-party backends register through the entry point group ``portopt.backends``: the
entry point names a module (importing it registers), a
:class:`~portopt.lowering.backend.Backend`, or a callable returning one. Entry points are
loaded lazily, the first time a backend is looked up, listed or chosen, and a failing
one is reported by :func:`available` instead of breaking the others.

:func:`select_backend` picks, for a device, a spec and a group size, the usable backend of
highest :attr:`~portopt.lowering.backend.Backend.priority` that lowers the spec
(``backend="auto"``), or checks that a named one can run there.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch

from portopt.backends import reference, torch_generic
from portopt.lowering.backend import Backend
from portopt.lowering.registry import register_backend, registered_backends
from portopt.spec.definition import Spec

__all__ = [
    "BackendStatus",
    "auto_choice",
    "auto_thresholds",
    "available",
    "device_unavailable_reason",
    "load_entry_points",
    "named_backend",
    "package_reason",
    "select_backend",
    "usable_backends",
]

BUILTIN = (reference.REFERENCE.name, torch_generic.TORCH_GENERIC.name)
OPTIONAL_BUILTIN = {
    "compiled": "portopt.backends.compiled",
    "onnx": "portopt.backends.onnx",
    "torch_fused": "portopt.backends.torch_fused",
    "npu": "portopt.backends.npu",
    "npu-contract": "portopt.backends.npu",
}
"""Built-in backends imported on first use: by name, or when ``"auto"`` first chooses."""
ENTRY_POINT_GROUP = "portopt.backends"

_entry_point_failures: dict[str, str] = {}
_entry_points_loaded = False


class BackendStatus(NamedTuple):
    """One row of :func:`available`: whether a backend can run here, and why (not)."""

    name: str
    usable: bool
    reason: str


def load_entry_points() -> None:
    """Load the ``portopt.backends`` entry points once; remember why any of them failed."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            if isinstance(loaded, Backend):
                register_backend(loaded)
            elif callable(loaded):
                result = loaded()
                if isinstance(result, Backend):
                    register_backend(result)
        except Exception as exc:  # a broken plug-in must not break the others
            _entry_point_failures[entry.name] = (
                f"entry point {entry.value!r} failed to load: {type(exc).__name__}: {exc}"
            )


_DEVICE_PACKAGES = {"npu": "torch_npu"}


def device_unavailable_reason(device_type: str) -> str | None:
    """``None`` if a device of ``device_type`` is present here, else why not."""
    if device_type == "cpu":
        return None
    package = _DEVICE_PACKAGES.get(device_type)
    if package is not None:
        reason = package_reason(package)
        if reason is not None:
            return reason
    if device_type == "mps":
        present = torch.backends.mps.is_available()
    else:
        module = getattr(torch, device_type, None)
        is_available = getattr(module, "is_available", None)
        if is_available is None:
            return f"this torch build has no {device_type} support (no torch.{device_type}.is_available)"
        present = bool(is_available())
    return None if present else f"no {device_type} device (torch.{device_type}.is_available() is False)"


_import_failures: dict[str, str] = {}


def package_reason(package: str) -> str | None:
    """``None`` if the vendor package ``package`` imports, else why not (not installed, or the import's error).

    A failed import is remembered and not tried again: re-importing a package whose first import
    failed half-way (its C extension loaded) is not safe."""
    if package in _import_failures:
        return _import_failures[package]
    if importlib.util.find_spec(package) is None:
        return f"package {package} is not installed"
    try:
        importlib.import_module(package)
    except Exception as exc:  # a broken vendor install is a reason, not a crash
        _import_failures[package] = f"package {package} failed to import: {type(exc).__name__}: {exc}"
        return _import_failures[package]
    return None


def _backend_reason(backend: Backend) -> str | None:
    reason = backend.unavailable_reason()
    if reason is not None:
        return reason
    missing = {t: device_unavailable_reason(t) for t in backend.device_types}
    if any(r is None for r in missing.values()):
        return None
    return "no supported device here: " + "; ".join(f"{r}" for r in missing.values())


def _load_optional(name: str) -> None:
    module = OPTIONAL_BUILTIN.get(name)
    if module is not None and name not in registered_backends():
        importlib.import_module(module)


def _load_all() -> None:
    """Register every backend that can be: entry points and the lazily imported built-ins."""
    load_entry_points()
    for name in OPTIONAL_BUILTIN:
        _load_optional(name)


def available() -> list[BackendStatus]:
    """Every known backend: usable here or not, and why (missing package, missing device)."""
    _load_all()
    rows = []
    for name, backend in sorted(registered_backends().items()):
        reason = _backend_reason(backend)
        if reason is None:
            here = [t for t in backend.device_types if device_unavailable_reason(t) is None]
            how = f"priority {backend.priority}" if backend.auto_select else "by name only"
            if backend.auto_select and backend.min_auto_numel() > 0:
                how += f"; auto for groups of >= {backend.min_auto_numel():,} elements"
            if backend.label:
                how += f"; {backend.label}"
            rows.append(BackendStatus(name, True, f"usable on {', '.join(here)} ({how})"))
        else:
            rows.append(BackendStatus(name, False, reason))
    rows.extend(BackendStatus(name, False, why) for name, why in sorted(_entry_point_failures.items()))
    return rows


def select_backend(
    device: torch.device | str,
    name: str = "auto",
    spec: Spec | None = None,
    numel: int | None = None,
    *,
    accept: Callable[[Backend], bool] | None = None,
) -> Backend:
    """The backend to step ``spec`` on ``device``: ``name``, or the best usable one for ``"auto"``.

    ``"auto"`` takes the usable backend of highest priority (``auto_select``) that runs on the
    device, lowers ``spec`` (when given) and whose ``min_auto_numel`` the group's ``numel``
    reaches (when given): a torch fused kernel where one is proven equivalent, the compiled
    kernel for groups large enough to repay compiling, else the generic torch backend. With
    ``accept``, only backends it accepts are considered (the implementation a torch flag asks
    for: ``fused=True``, ``foreach=False``, ...). A named backend that cannot run here or does
    not lower ``spec`` raises ``ValueError`` saying why.
    """
    device_type = torch.device(device).type
    if name != "auto":
        backend = named_backend(name)
        if device_type not in backend.device_types:
            raise ValueError(
                f"backend {name!r} does not run on {device_type} tensors (it runs on: {', '.join(backend.device_types)})"
            )
        reason = backend.unavailable_reason()
        if reason is None and spec is not None:
            reason = backend.unsupported_reason(spec)
        if reason is not None:
            raise ValueError(f"backend {name!r} is not usable here: {reason}")
        return backend
    _load_all()
    chosen = auto_choice(device_type, spec, numel, accept=accept)
    if chosen is None:
        what = "no usable backend" if accept is None else "no usable backend of the kind asked for"
        raise ValueError(
            f"{what} runs on {device_type} tensors; " + "; ".join(f"{r.name}: {r.reason}" for r in available())
        )
    return chosen


def usable_backends() -> list[Backend]:
    """Every registered backend that can run here (its package and a device of its types present)."""
    _load_all()
    return [b for b in registered_backends().values() if _backend_reason(b) is None]


def named_backend(name: str) -> Backend:
    """The registered backend called ``name``; ``ValueError`` lists the known ones (or why a plug-in failed)."""
    load_entry_points()
    _load_optional(name)
    backends = registered_backends()
    if name not in backends:
        why = _entry_point_failures.get(name)
        known = ", ".join(sorted(backends)) or "none"
        raise ValueError(f"unknown backend {name!r}" + (f" ({why})" if why else f"; registered backends: {known}"))
    return backends[name]


def auto_thresholds() -> set[int]:
    """The group sizes at which ``"auto"`` may change its choice (every backend's ``min_auto_numel``)."""
    _load_all()
    return {b.min_auto_numel() for b in registered_backends().values() if b.auto_select}


def auto_choice(
    device_type: str,
    spec: Spec | None = None,
    numel: int | None = None,
    below_priority: int | None = None,
    *,
    accept: Callable[[Backend], bool] | None = None,
) -> Backend | None:
    """The backend ``"auto"`` chooses for ``spec`` on ``device_type``, or ``None``.

    ``below_priority`` considers only backends of lower priority (a backend handing on a call
    it cannot take); ``accept`` only backends it accepts. Backends are tried best first and the
    costlier checks (a compiler's import, a kernel's equivalence proof) run only for those that
    get that far."""
    ranked = sorted(
        (
            b
            for b in registered_backends().values()
            if b.auto_select and device_type in b.device_types and (accept is None or accept(b))
        ),
        key=lambda b: (b.priority, b.name),
        reverse=True,
    )
    for b in ranked:
        if below_priority is not None and b.priority >= below_priority:
            continue
        if numel is not None and numel < b.min_auto_numel():
            continue
        if b.unavailable_reason() is None and (spec is None or b.unsupported_reason(spec) is None):
            return b
    return None
