"""The base of the named optimizers (``portopt.Adam``, ``portopt.SGD``, ...).

A named class takes torch.optim's arguments, stores them in torch.optim's param-group
layout, and picks its spec per param group from the group's structural options
(``amsgrad``, ``nesterov``, ``centered``, ``momentum != 0``, ``decoupled_weight_decay``;
``maximize`` is applied to any spec). Specs are built once per option set and cached.
The class docstring ends with the equations rendered from the default spec.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections.abc import Mapping
from typing import Any, ClassVar

from portopt.algorithms import REGISTRY, get_spec
from portopt.optim.optimizer import Optimizer
from portopt.spec.definition import OptionValue, Spec

_BACKEND_DOC = (
    '``backend`` (keyword-only, portopt\'s addition): ``"auto"`` runs each parameter on the best usable\n'
    'backend for its device (:func:`portopt.backends.select_backend`), or name one (``"torch"``, ...).\n\n'
    "``precision`` and ``skip_nonfinite`` (keyword-only, portopt's additions, per param group too): a\n"
    'precision policy (``"mixed-bf16"``, ``"q8-states"``, ``"mixed-fp16,exp_avg_sq=bf16"``, a\n'
    ":class:`~portopt.precision.policy.PrecisionPolicy`; ``None``: torch.optim's storage), and whether a\n"
    "step with an inf/NaN gradient is skipped whole; ``torch.amp.GradScaler`` is handled inside the\n"
    "step (:mod:`portopt.optim.amp`)."
)


@functools.cache
def cached_spec(algorithm: str, options: tuple[tuple[str, OptionValue], ...]) -> Spec:
    """``get_spec(algorithm, **options)``, built once per option set."""
    return get_spec(algorithm, **dict(options))


def equations(spec: Spec) -> str:
    """The spec rendered as text equations, or ``""`` if rendering is unavailable."""
    try:
        from portopt.spec.render import render_text
    except ImportError:  # rendering is optional for the optimizer itself
        return ""
    return render_text(spec)


class NamedOptimizer(Optimizer):
    """An algorithm of :mod:`portopt.algorithms` with torch.optim's constructor and group layout."""

    algorithm: ClassVar[str]
    """The name in :mod:`portopt.algorithms`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__doc__:
            return
        doc = inspect.cleandoc(cls.__doc__) + "\n\n" + _BACKEND_DOC
        text = equations(cls.spec())
        if text:
            doc += (
                f"\n\nEquations (rendered from ``{cls.__name__}.spec()``)::\n\n" + textwrap.indent(text, "    ") + "\n"
            )
        cls.__doc__ = doc

    @classmethod
    def spec_options(cls, group: Mapping[str, Any]) -> dict[str, OptionValue]:
        """The spec factory's options for a param group (override per class)."""
        return {}

    @classmethod
    def spec(cls, **options: Any) -> Spec:
        """The spec for these group options (defaults: the class's), before ``maximize``.

        ``portopt.Adam.spec(amsgrad=True)`` is AMSGrad's spec, for instance.
        """
        group = {**cls.option_defaults, **options, **cls.forced_options}
        return cached_spec(cls.algorithm, tuple(sorted(cls.spec_options(group).items())))

    def torch_class_name(self) -> str:
        registered = REGISTRY.get(self.algorithm)
        return registered.torch_class if registered is not None else ""

    def base_spec(self, group: Mapping[str, Any]) -> Spec:
        return cached_spec(self.algorithm, tuple(sorted(self.spec_options(group).items())))
