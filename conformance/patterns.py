"""Which elements differ, and what they have in common: the element pattern of a failure.

While the diagnosis re-runs an implementation in lock-step, :class:`Evidence` collects,
per tensor and element, whether it left the tolerance, whether it kept its previous value
when it did, whether it became inf/NaN where the reference is finite, whether the
reference moved it, and how large its gradients were. :func:`analyse` then names the
pattern, separately from the algebraic variant the implementation may follow:

1. *value regimes, by tensor*: a float32 overflow in the huge-gradient regime (inf/NaN
   where the reference is finite, or an update that vanished, as ``x/inf = 0`` makes it);
2. *a fixed subset*: the same few elements at every step ("the update is skipped on tensor
   t4 (1031,): 1 of 1031 element(s) at flat index [17]");
3. *a tensor property* the failing tensors share and most tensors with it fail: strided,
   transposed, 0-d, without a gradient at some steps, tiny gradients, a param group, ...;
4. *SIMD blocks*: in the dense tensors, exactly the elements of full ``B``-element blocks
   (memory order) differ and the tails follow the spec, or the reverse, for one ``B`` of
   4, 8, 16, 32, 64 (torch 2.13's CPU fused SGD in bfloat16 leaves its vector body's
   elements unchanged);
5. *value regimes within tensors*: only the elements with the smallest (or largest)
   gradients differ (an ε convention shows there first).

A problem keeps its regimes apart (:mod:`portopt.conformance.problems`): no tensor is both
strided and huge, so these findings do not confound each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from portopt.conformance.problems import GRAD_EVERY_STEP, GRAD_NEVER, Layout, Regime, TensorSpec

F64 = torch.float64
SIMD_BLOCKS = (4, 8, 16, 32, 64)
"""Block widths (elements) of the vector units patterns are checked for: 128- to 512-bit, 8 to 32 bits."""
FIXED_SUBSET = 0.01
"""A mismatch on at most this fraction of a tensor's elements (or 3) is a "subset"."""
MAJORITY = 0.5
"""A pattern must cover at least this share of the elements (or tensors) it names."""
FIXED_SUBSET_LIMIT = 64


@dataclass
class TensorEvidence:
    """What one tensor's elements did over the re-run (flat, row-major indices)."""

    numel: int
    over: Tensor
    """Left the tolerance at some step."""
    kept: Tensor
    """Kept its previous value at every step it was over."""
    nonfinite: Tensor
    """inf or NaN where the reference was finite, at some step."""
    moved: Tensor
    """The reference moved it by more than the allowed error at some step."""
    subsets: list[tuple[int, ...]] = field(default_factory=list)
    """The over elements of each failing step (while they are few)."""
    small_only: bool = True
    """At every failing step, the over elements had smaller |g| than every passing element."""
    large_only: bool = True
    small_edge: float = 0.0
    large_edge: float = math.inf
    compared: int = 0
    """Failing steps with both failing and passing elements of non-zero gradient (the evidence of the above)."""
    grad_max: float = 0.0


def _flat(x: Tensor) -> Tensor:
    return x.detach().to(device="cpu", dtype=F64).reshape(-1)


class Evidence:
    """Element-level observations of a lock-step re-run, one :class:`TensorEvidence` per tensor."""

    def __init__(self, tensors: Sequence[TensorSpec], orders: Sequence[Tensor]) -> None:
        self.specs = tuple(tensors)
        self.orders = list(orders)
        self.tensors = [
            TensorEvidence(
                t.numel,
                torch.zeros(t.numel, dtype=torch.bool),
                torch.ones(t.numel, dtype=torch.bool),
                torch.zeros(t.numel, dtype=torch.bool),
                torch.zeros(t.numel, dtype=torch.bool),
            )
            for t in tensors
        ]

    def add(
        self,
        index: int,
        over: Tensor,
        got: Tensor,
        before: Tensor,
        expected: Tensor,
        allowed: Tensor,
        grad: Tensor | None,
    ) -> None:
        """One step of tensor ``index``: ``over`` (element-wise, any quantity), the implementation's
        parameter ``got``, its value ``before`` the step, the reference's ``expected`` and the allowed
        error (an element whose update exceeds it would be caught if it were not made)."""
        e = self.tensors[index]
        over = over.reshape(-1)
        allowed = _flat(allowed.expand(expected.shape))
        got, before, expected = _flat(got), _flat(before), _flat(expected)
        kept = got == before
        e.kept &= ~over | kept
        e.over |= over
        e.nonfinite |= ~torch.isfinite(got) & torch.isfinite(expected)
        e.moved |= (expected - before).abs() > allowed
        if grad is not None and grad.numel():
            e.grad_max = max(e.grad_max, float(_flat(grad).abs().nan_to_num(0.0).max()))
        count = int(over.sum())
        if count == 0:
            return
        if count <= FIXED_SUBSET_LIMIT and len(e.subsets) < 64:
            e.subsets.append(tuple(int(k) for k in torch.nonzero(over).reshape(-1)))
        elif count > FIXED_SUBSET_LIMIT:
            e.subsets.append(())
        if grad is not None:
            g = _flat(grad).abs()
            passing = g[~over & torch.isfinite(g) & (g > 0)]
            failing = g[over & torch.isfinite(g)]
            if passing.numel() and failing.numel():
                e.compared += 1
                if float(failing.max()) < float(passing.min()):
                    e.small_edge = max(e.small_edge, float(failing.max()))
                else:
                    e.small_only = False
                if float(failing.min()) > float(passing.max()):
                    e.large_edge = min(e.large_edge, float(failing.min()))
                else:
                    e.large_only = False

    def failing(self) -> list[int]:
        return [i for i, e in enumerate(self.tensors) if bool(e.over.any())]


@dataclass(frozen=True)
class Pattern:
    """A named element pattern: ``kind`` for programs, ``text`` for people."""

    kind: str
    text: str


def analyse(ev: Evidence, labels: Sequence[str], compute: str = "float32") -> list[Pattern]:
    """The patterns of the failing elements (see the module docstring), most specific first."""
    failing = ev.failing()
    if not failing:
        return []
    out: list[Pattern] = []
    huge = [i for i in failing if ev.specs[i].regime is Regime.HUGE]
    overflow = _overflow(ev, huge, len(huge) == len(failing), labels, compute)
    if overflow is not None:
        out.append(overflow)
        failing = [i for i in failing if i not in huge]
        if not failing:
            return out
    for finder in (_fixed_subset, _tensor_property, _simd_blocks, _value_regime):
        found = finder(ev, failing, labels)
        if found is not None:
            out.append(found)
            break
    return out


def _names(labels: Sequence[str], indices: Sequence[int]) -> str:
    return ", ".join(labels[i] for i in indices)


def _overflow(
    ev: Evidence, huge: Sequence[int], only_huge: bool, labels: Sequence[str], compute: str
) -> Pattern | None:
    """inf/NaN where the gradients are huge and the reference is finite; or, when nothing but the
    huge-gradient tensors differs, an update that vanished there (``x/inf = 0``)."""
    if not huge:
        return None
    nonfinite = [i for i in huge if bool(ev.tensors[i].nonfinite.any())]
    vanished = [i for i in huge if _kept_share(ev.tensors[i]) >= MAJORITY] if only_huge else []
    if not nonfinite and not vanished:
        return None
    scale = max(ev.tensors[i].grad_max for i in huge)
    how = (
        "their values are inf or NaN where the reference's are finite"
        if nonfinite
        else "their update vanished (the elements kept their previous value), as x/inf = 0 makes it"
    )
    return Pattern(
        "overflow",
        f"a {compute} overflow in the huge-gradient regime: only tensors with huge gradients "
        f"(|g| up to {scale:.3g}; |g|² = {scale * scale:.3g}, {compute}'s largest is "
        f"{float(torch.finfo(_dtype(compute)).max):.3g}) differ ({_names(labels, huge)}), and {how}: an intermediate "
        f"such as a square of the second moment overflows, while the reference's float64 does not",
    )


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float64)


def _kept_share(e: TensorEvidence) -> float:
    over = int(e.over.sum())
    return int((e.over & e.kept).sum()) / over if over else 0.0


def _fixed_subset(ev: Evidence, failing: Sequence[int], labels: Sequence[str]) -> Pattern | None:
    """The same few elements at every failing step."""
    parts: list[str] = []
    kept_everywhere = True
    for i in failing:
        e = ev.tensors[i]
        count = int(e.over.sum())
        if count > max(3, FIXED_SUBSET * e.numel) or not e.subsets or any(s != e.subsets[0] for s in e.subsets):
            return None
        moved = bool(e.moved[e.over].all())
        kept_everywhere = kept_everywhere and bool(e.kept[e.over].all()) and moved
        index = [int(k) for k in torch.nonzero(e.over).reshape(-1)[:5]]
        parts.append(f"tensor {labels[i]}: {count} of {e.numel} element(s) at flat index {index}")
    what = "the update is skipped on" if kept_everywhere else "the result differs only on"
    return Pattern("fixed-subset", f"{what} " + "; ".join(parts))


def _properties(specs: Sequence[TensorSpec]) -> list[tuple[str, str, set[int]]]:
    """(kind, description, members) of the properties a layout-, regime- or group-specific bug would hit."""

    def members(pred: object) -> set[int]:
        return {i for i, t in enumerate(specs) if pred(t) and t.numel > 0}  # type: ignore[operator]

    named = [
        ("strided", "strided (a view of every other row of a larger buffer)", members(lambda t: t.layout is Layout.STRIDED)),
        ("transposed", "transposed (a permuted view)", members(lambda t: t.layout is Layout.TRANSPOSED)),
        ("non-contiguous", "non-contiguous", members(lambda t: t.layout is not Layout.CONTIGUOUS)),
        ("0-d", "0-dimensional", members(lambda t: len(t.shape) == 0)),
        ("size-1", "with one element", members(lambda t: t.numel == 1)),
        ("no-grad", "never given a gradient (they must not move)", members(lambda t: t.grads == GRAD_NEVER)),
        ("some-grads", "without a gradient at some steps", members(lambda t: t.grads != GRAD_EVERY_STEP)),
        ("tiny", "with tiny gradients (around 1e-9)", members(lambda t: t.regime is Regime.TINY)),
        ("huge", "with huge gradients", members(lambda t: t.regime is Regime.HUGE)),
        ("zero-grad", "with an all-zero gradient at some step", members(lambda t: bool(t.zero_at) or t.regime is Regime.ZERO)),
    ]  # fmt: skip
    for group in sorted({t.group for t in specs}):
        named.append(("group", f"of param group {group}", {i for i, t in enumerate(specs) if t.group == group}))
    return named


def _tensor_property(ev: Evidence, failing: Sequence[int], labels: Sequence[str]) -> Pattern | None:
    """The smallest property that every failing tensor has and that every tensor with it, which the
    reference moved by more than the tolerance, fails."""
    fail = set(failing)
    everything = {i for i, t in enumerate(ev.specs) if t.numel > 0}
    fitting = [
        (len(m), kind, text)
        for kind, text, m in _properties(ev.specs)
        if m and fail <= m and m != everything and all(i in fail for i in m if bool(ev.tensors[i].moved.any()))
    ]
    if not fitting:
        return None
    _, kind, text = min(fitting, key=lambda f: f[0])
    return Pattern(
        f"tensors:{kind}",
        f"only tensors {text} differ ({_names(labels, sorted(fail))}); every other tensor matches the spec",
    )


def _dense(spec: TensorSpec) -> bool:
    return spec.layout is not Layout.STRIDED


def _simd_blocks(ev: Evidence, failing: Sequence[int], labels: Sequence[str]) -> Pattern | None:
    """Bodies of full ``B``-blocks versus tails, in the dense tensors (memory order)."""
    dense = [i for i, t in enumerate(ev.specs) if _dense(t) and t.numel > 0]
    for body in (True, False):
        blocks = sorted(SIMD_BLOCKS, reverse=body)  # the body pattern holds for divisors of B too: take the largest
        for b in blocks:
            if _blocks_fit(ev, dense, b, body):
                return _simd_pattern(ev, failing, dense, labels, b, body)
    return None


def _split(ev: Evidence, i: int, b: int) -> tuple[Tensor, Tensor]:
    """(body, tail) masks of tensor ``i`` in flat row-major indices: body = the first ⌊n/b⌋·b in memory order."""
    n = ev.tensors[i].numel
    rank = torch.empty(n, dtype=torch.long)
    rank[ev.orders[i]] = torch.arange(n)
    body = rank < (n // b) * b
    return body, ~body


def _blocks_fit(ev: Evidence, dense: Sequence[int], b: int, body: bool) -> bool:
    inside_moving = inside_over = 0
    outside_clean = False
    for i in dense:
        e = ev.tensors[i]
        bodies, tails = _split(ev, i, b)
        inside, outside = (bodies, tails) if body else (tails, bodies)
        if bool((e.over & outside).any()):
            return False
        inside_moving += int((inside & e.moved).sum())
        inside_over += int((inside & e.over).sum())
        outside_clean = outside_clean or bool((outside & e.moved & ~e.over).any())
    return outside_clean and inside_over > 0 and inside_over >= MAJORITY * inside_moving


def _simd_pattern(
    ev: Evidence, failing: Sequence[int], dense: Sequence[int], labels: Sequence[str], b: int, body: bool
) -> Pattern:
    over = [i for i in dense if bool(ev.tensors[i].over.any())]
    kept = all(bool(ev.tensors[i].kept[ev.tensors[i].over].all()) for i in over)
    how = "kept their previous value" if kept else "differ from the spec"
    examples = ", ".join(
        f"{labels[i]} {_span(ev.tensors[i].numel // b * b, ev.tensors[i].numel - 1)}"
        for i in dense
        if ev.tensors[i].numel % b and ev.tensors[i].numel > b
    )
    if body:
        text = (
            f"SIMD blocks: in every dense tensor the elements of full {b}-element blocks (in memory order) {how}, "
            f"and only the tails, the last numel mod {b} elements ({examples}), follow the spec: a {b}-wide vector body "
            f"that {'does not update' if kept else 'computes something else'}, with a correct scalar tail loop"
        )
        kind = f"simd-body:{b}"
    else:
        text = (
            f"SIMD tails: only the tail elements, the last numel mod {b} in memory order ({examples}), {how}; "
            f"the full {b}-element blocks follow the spec: the remainder loop after a {b}-wide vector body "
            f"{'is missing' if kept else 'computes something else'}"
        )
        kind = f"simd-tail:{b}"
    others = [i for i in failing if i not in dense]
    if others:
        text += f"; the non-dense tensors {_names(labels, others)} differ as well"
    return Pattern(kind, text)


def _span(first: int, last: int) -> str:
    return f"element {first}" if first == last else f"elements {first}-{last}"


def _value_regime(ev: Evidence, failing: Sequence[int], labels: Sequence[str]) -> Pattern | None:
    """Only the elements with the smallest, or the largest, gradients of their tensors."""
    mixed = [i for i in failing if not bool(ev.tensors[i].over.all()) and ev.tensors[i].compared]
    if not mixed:
        return None
    if all(ev.tensors[i].small_only for i in mixed):
        edge = max(ev.tensors[i].small_edge for i in mixed)
        return Pattern(
            "values:small",
            f"only elements with small gradients (|g| <= {edge:.3g}) differ in {_names(labels, mixed)}: "
            "the regime where ε and other small constants matter",
        )
    if all(ev.tensors[i].large_only for i in mixed):
        edge = min(ev.tensors[i].large_edge for i in mixed)
        return Pattern(
            "values:large", f"only elements with large gradients (|g| >= {edge:.3g}) differ in {_names(labels, mixed)}"
        )
    return None
