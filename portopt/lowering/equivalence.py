"""Do two specs compute the same step? A randomized identity test in float64.

A whole-algorithm rule (a vendor's fused kernel) may replace a user's spec only if the
kernel computes the same function. Both are specs: the kernel's is written from its
source code (its conventions included: how it counts steps, where it puts ε, how it
decays weights); the user's is whatever they wrote. Structural comparison would need a
normal form for rational functions with square roots, powers of ``t`` and selects, and
would still miss ``b·m + (1 − b)·g`` = ``m + (1 − b)·(g − m)``. Instead we test the
identity numerically, in the spirit of the Schwartz–Zippel lemma: two different
polynomials agree at a random point with probability at most degree/|S|, and two
different analytic functions (sqrt, division, ``β^t`` are analytic where defined) agree
on a set of measure zero; so agreement at many random points, far above round-off, is
overwhelming evidence of an identity. The test, :func:`check_equivalence`:

1. **Binding.** Each kernel hyperparameter is fed by the user's hyperparameter of the
   same name (the name is the torch param-group key the kernel's caller reads), or held
   at a *neutral* value the rule declares (``weight_decay = 0`` for a user spec without
   decay); each kernel state is one of the user's element-wise states, by name or, when
   names differ, by trying every one-to-one assignment. No binding, no rule.
2. **Points.** Trials of several steps each: the user's defaults once, then random
   hyperparameters drawn inside each one's declared range at order-one scale (``ε`` near
   0.5, not 1e-8, so that an ``ε`` inside or outside a square root changes the result in
   the third digit, not the sixteenth), random parameters and gradients (one gradient
   entry exactly 0, to separate conventions such as ``sign(0)``), step counters starting
   at 1 (first-step branches) or later (bias corrections at large ``t``).
3. **Compare.** At every step both specs run from the *same* state, initialised by the
   user's spec (the rule owns state creation, the kernel only updates), via the float64
   reference interpreter; the new parameter and every bound state must agree to 1e-9
   relative (NaN where the other has NaN). The user's results carry the trajectory on,
   so states are the reachable ones.

A false "equivalent" needs the specs to differ only on a set the samples miss: a branch
never taken (a threshold no sampled ``t`` reaches) or a difference below 1e-9 relative.
:data:`TRIALS` and :data:`STEPS` bound that risk; rules are also checked end to end
against the reference in the tests, and each kernel is probed at run time.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from portopt.lowering.interpreter import Bindings, evaluate_step, initial_state_values
from portopt.lowering.torch_ops import TORCH_RULES
from portopt.spec.definition import Spec
from portopt.spec.symbols import Hyperparameter, Layout

TRIALS = 8
"""Random hyperparameter draws per check (plus one at the user's defaults)."""
STEPS = 6
"""Steps per trial (crosses first-step branches and a few state updates)."""
RTOL = 1e-9
SIZE = 9
START_STEPS = (1, 1, 2, 7, 40, 1000)


@dataclass(frozen=True)
class Binding:
    """Where each kernel input comes from.

    ``hypers`` maps a kernel hyperparameter to the user's hyperparameter name (a str) or a
    fixed value (a float); ``states`` maps a kernel state to the user's state.
    """

    hypers: tuple[tuple[str, str | float], ...]
    states: tuple[tuple[str, str], ...]

    def kernel_hypers(self, user_values: Mapping[str, float]) -> dict[str, float]:
        """The kernel's hyperparameter values given the user's."""
        return {k: float(user_values[v]) if isinstance(v, str) else v for k, v in self.hypers}


def sample_hyperparameters(spec: Spec, rng: random.Random) -> dict[str, float]:
    """A random, order-one value for every hyperparameter, inside its declared range."""
    return {h.name: _sample(h, rng) for h in spec.hyperparameters}


def _sample(h: Hyperparameter, rng: random.Random) -> float:
    r = h.constraint
    low, high = r.low, r.high
    if not math.isfinite(low):
        low = high - 1.0 if math.isfinite(high) else -1.0
    if not math.isfinite(high):
        high = low + 1.0
    margin = 0.05 * (high - low)
    return rng.uniform(low + margin, high - margin)


def hyper_bindings(
    user: Spec, kernel: Spec, neutral: Mapping[str, float]
) -> tuple[tuple[str, str | float], ...] | None:
    """Kernel hyperparameter -> the user's of the same name, else its neutral value; else None."""
    bound: list[tuple[str, str | float]] = []
    for name in kernel.hyper_names:
        if name in user.hyper_names:
            bound.append((name, name))
        elif name in neutral:
            bound.append((name, float(neutral[name])))
        else:
            return None
    return tuple(bound)


def state_bindings(user: Spec, kernel: Spec) -> list[tuple[tuple[str, str], ...]]:
    """Candidate kernel-state -> user-state assignments: by name first, then every bijection."""
    if len(user.states) != len(kernel.states):
        return []
    if any(s.layout is not Layout.ELEMENTWISE for s in (*user.states, *kernel.states)):
        return []
    by_name = tuple((k, k) for k in kernel.state_names)
    candidates = [by_name] if set(kernel.state_names) == set(user.state_names) else []
    for perm in itertools.permutations(user.state_names):
        candidate = tuple(zip(kernel.state_names, perm, strict=True))
        if candidate not in candidates:
            candidates.append(candidate)
    return candidates


def find_binding(
    user: Spec, kernel: Spec, neutral: Mapping[str, float] | None = None, *, seed: int = 0
) -> tuple[Binding | None, str]:
    """A binding under which ``kernel`` computes ``user``'s step, or ``None`` and why not."""
    hypers = hyper_bindings(user, kernel, neutral or {})
    if hypers is None:
        missing = [n for n in kernel.hyper_names if n not in user.hyper_names and n not in (neutral or {})]
        return None, f"{user.name} has no hyperparameter {', '.join(map(repr, missing))} that {kernel.name} needs"
    candidates = state_bindings(user, kernel)
    if not candidates:
        return None, (
            f"{user.name} has states {list(user.state_names)}, {kernel.name} updates {list(kernel.state_names)} "
            "(element-wise, one to one)"
        )
    why = ""
    for states in candidates:
        binding = Binding(hypers, states)
        # A cheap screen first (one trial), then the full test.
        why = (
            check_equivalence(user, kernel, binding, trials=1, seed=seed)
            or check_equivalence(user, kernel, binding, seed=seed)
            or ""
        )
        if not why:
            return binding, ""
    return None, why


def check_equivalence(
    user: Spec, kernel: Spec, binding: Binding, *, trials: int = TRIALS, steps: int = STEPS, seed: int = 0
) -> str | None:
    """``None`` if ``kernel`` under ``binding`` matched ``user`` at every sampled point, else the first difference."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for trial in range(trials + 1):
        values = user.defaults() if trial == 0 else sample_hyperparameters(user, rng)
        kernel_values = binding.kernel_hypers(values)
        t = 1.0 if trial < 2 else float(rng.choice(START_STEPS))
        param = torch.randn(SIZE, generator=gen, dtype=torch.float64)
        grad = _gradient(gen)
        states = initial_state_values(user, TORCH_RULES, param, grad, values)
        for step in range(steps):
            if step:
                grad = _gradient(gen)
            new_user, p_user = evaluate_step(user, TORCH_RULES, Bindings(param, grad, t, values, states))
            kernel_states = {k: states[u] for k, u in binding.states}
            new_kernel, p_kernel = evaluate_step(
                kernel, TORCH_RULES, Bindings(param, grad, t, kernel_values, kernel_states)
            )
            where = f"trial {trial} (hyperparameters {_short(values)}), t={t:g}"
            diff = _difference(p_user, p_kernel, param)
            if diff:
                return f"the new parameter differs at {where}: {diff}"
            for k, u in binding.states:
                diff = _difference(new_user[u], new_kernel[k], param)
                if diff:
                    return f"state {u!r} (kernel {k!r}) differs at {where}: {diff}"
            param = p_user.expand_as(param).clone()
            states = {name: new_user[name].expand_as(states[name]).clone() for name in user.state_names}
            t += 1.0
    return None


def _gradient(gen: torch.Generator) -> Tensor:
    g = torch.randn(SIZE, generator=gen, dtype=torch.float64)
    g[0] = 0.0
    return g


def _difference(a: Tensor, b: Tensor, like: Tensor) -> str:
    a, b = a.expand_as(like), b.expand_as(like)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return "NaN in one and not the other"
    ok = ~nan_a
    a, b = a[ok], b[ok]
    infinite = ~torch.isfinite(a) | ~torch.isfinite(b)
    if not torch.equal(a[infinite], b[infinite]):
        return "infinities differ"
    a, b = a[~infinite], b[~infinite]
    gap = (a - b).abs()
    bound = RTOL * (a.abs() + b.abs()) + RTOL * 1e-3
    if bool((gap > bound).any()):
        i = int((gap - bound).argmax())
        return f"{float(a[i])!r} vs {float(b[i])!r}"
    return ""


def _short(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in values.items())
