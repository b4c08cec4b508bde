"""Errors raised when an algorithm spec is built or used wrongly."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec is malformed: the message names the algorithm, the symbol and the fix."""


class HyperparameterError(ValueError):
    """A hyperparameter value violates its declared constraint."""


class InvalidDefaultError(SpecError, HyperparameterError):
    """A loaded spec declares a hyperparameter whose default violates its own constraint.

    A :class:`SpecError` (the loader raises nothing else) and a :class:`HyperparameterError`
    (what is wrong is a hyperparameter value).
    """


class HyperparameterOverflowError(HyperparameterError, OverflowError):
    """A hyperparameter value too large for a float (``lr=10**400``): a ValueError naming the
    hyperparameter, and the OverflowError that converting it would raise."""
