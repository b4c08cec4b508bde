"""The table of registered backends (built-in ones and third-party entry points)."""

from __future__ import annotations

from portopt.lowering.backend import Backend

_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to the table; a second registration of a name replaces the first."""
    _BACKENDS[backend.name] = backend
    return backend


def registered_backends() -> dict[str, Backend]:
    """Every registered backend by name (usable here or not)."""
    return dict(_BACKENDS)


def lookup_backend(name: str) -> Backend:
    """The backend called ``name``; the error lists the registered ones."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; registered backends: {', '.join(sorted(_BACKENDS)) or 'none'}"
        ) from None
