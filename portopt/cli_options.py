"""Structural options of the registered algorithms: what each accepts, parsing, checking.

An algorithm's options are the keyword arguments of its spec factory (``amsgrad``,
``nesterov``, ``threshold``, ...), read from the factory's signature so they cannot drift
from the code; ``maximize`` is accepted by every algorithm (it is :meth:`Spec.maximized`).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
import sys
from collections.abc import Mapping

from portopt.algorithms import ALGORITHMS, SpecFactory, algorithm_names
from portopt.spec.definition import OptionValue, Spec

GENERIC_OPTIONS: dict[str, OptionValue] = {"maximize": False}
"""Options every algorithm accepts, with their defaults."""

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _factory(name: str) -> SpecFactory:
    try:
        return ALGORITHMS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(algorithm_names())}") from None


def option_defaults(name: str) -> dict[str, OptionValue]:
    """The structural options of algorithm ``name`` with their defaults (factory keywords first)."""
    options: dict[str, OptionValue] = {}
    for param in inspect.signature(_factory(name)).parameters.values():
        if param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is not inspect.Parameter.empty:
            options[param.name] = param.default
    return {**options, **GENERIC_OPTIONS}


def describe_options(name: str) -> str:
    """``amsgrad=False, maximize=False``: every option of ``name`` with its default."""
    return ", ".join(f"{k}={v}" for k, v in option_defaults(name).items())


def parse_value(text: str) -> OptionValue:
    """``true``/``false`` (any case) -> bool, then int, then float, else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_option(text: str) -> tuple[str, OptionValue]:
    """``"amsgrad=true"`` -> ``("amsgrad", True)``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"option {text!r} is not of the form KEY=VALUE (e.g. amsgrad=true)")
    return key.strip(), parse_value(value.strip())


def _coerce(name: str, key: str, value: OptionValue, default: OptionValue) -> OptionValue:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not expected:
        raise ValueError(
            f"{name}: option {key!r} must be {_TYPE_WORDS.get(expected, expected.__name__)}, got {value!r}"
        )
    return value


def build_spec(name: str, options: Mapping[str, OptionValue] | None = None) -> Spec:
    """The spec of ``name`` with ``options``, checked: an unknown option or a wrongly typed value
    raises :class:`ValueError` naming it and listing what ``name`` accepts."""
    accepted = option_defaults(name)
    checked: dict[str, OptionValue] = {}
    for key, value in (options or {}).items():
        if key not in accepted:
            raise ValueError(f"{name}: unknown option {key!r}; accepted options: {describe_options(name)}")
        checked[key] = _coerce(name, key, value, accepted[key])
    maximize = bool(checked.pop("maximize", False))
    try:
        spec = _factory(name)(**checked)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return spec.maximized() if maximize else spec


def option_variants(name: str) -> list[dict[str, OptionValue]]:
    """Every combination of ``name``'s boolean factory options (others at their defaults) that
    the factory accepts; ``maximize`` is left out (combine it with :meth:`Spec.maximized`)."""
    flags = [k for k, v in option_defaults(name).items() if isinstance(v, bool) and k not in GENERIC_OPTIONS]
    variants = []
    for values in itertools.product((False, True), repeat=len(flags)):
        options: dict[str, OptionValue] = dict(zip(flags, values, strict=True))
        try:
            build_spec(name, options)
        except ValueError:
            continue  # a combination the algorithm refuses (Nesterov without momentum)
        variants.append(options)
    return variants


def load_user_spec(target: str, options: Mapping[str, OptionValue] | None = None) -> Spec:
    """The spec of ``module:factory`` (``factory(**options)``; a :class:`Spec` attribute is taken as it is).

    The current directory is searched first, as ``python -m`` does, so ``--spec mymod:make`` finds
    ``./mymod.py``. Every problem is a :class:`ValueError` that says what was wrong.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--spec {target!r}: write it as module:factory (e.g. mymod:make)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--spec {target!r}: cannot import module {module_name!r}: {exc}") from None
    try:
        found = getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"--spec {target!r}: module {module_name!r} has no {attribute!r}") from None
    values = dict(options or {})
    maximize = bool(values.pop("maximize", False))
    if isinstance(found, Spec):
        if values:
            raise ValueError(f"--spec {target!r} is a Spec, not a factory: it takes no options ({', '.join(values)})")
        spec = found
    elif callable(found):
        try:
            spec = found(**values)
        except (TypeError, ValueError) as exc:  # SpecError is a ValueError
            raise ValueError(f"--spec {target!r}: {type(exc).__name__}: {exc}") from None
    else:
        raise ValueError(f"--spec {target!r}: {attribute!r} is a {type(found).__name__}, not a spec factory")
    if not isinstance(spec, Spec):
        raise ValueError(f"--spec {target!r} returned a {type(spec).__name__}, not a portopt Spec")
    return spec.maximized() if maximize else spec
