"""A spec as a straight-line program: fused forms and in-place buffer reuse, decided once.

Given the host values of a step, a spec's tensor work is fixed: each step-scalar
``where`` has a taken branch, and ``x ± 0·y``/``x·1``/``x/1`` (zero weight decay, a
unit decay factor) reduce to ``x``, as torch.optim skips them. :class:`SpecPlan` caches,
per combination of those decisions, a :class:`Program`:

* one :class:`Instr` per remaining node, operands before users;
* sums of products fused into the forms torch has kernels for: ``β·x + (1 − β)·y`` →
  ``lerp``; ``a ± s·(b/c)`` and ``a ± b/c`` → ``addcdiv``; ``a ± s·b·c``, ``a ± s·b²`` →
  ``addcmul``; ``a ± s·b`` → ``add`` with ``alpha`` (a product is absorbed only if it
  feeds nothing else; ``s`` is a host scalar);
* each instruction marked to write *in place* into an operand's buffer when that operand
  is dead afterwards and has the result's shape: a temporary, or a state/parameter whose
  old value is read no more (the gradient only when it is a private widened copy).

Adam, for instance, becomes ``m.lerp_(g, 1 − β1)``, ``v.mul_(β2).addcmul_(g, g, value=1 − β2)``,
``d = sqrt(v)/sqrt(1 − β2^t) + ε`` (the one new buffer) and ``p.addcdiv_(m, d, value=−α)``:
torch.optim.Adam's own calls. The program is device-independent; a backend executes it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from portopt.lowering.host import HostValue
from portopt.spec.analysis import Kind, NodeInfo, classify
from portopt.spec.definition import Spec
from portopt.spec.expr import Expr, walk
from portopt.spec.ops import OP_INFO, Family, Op


@dataclass(frozen=True)
class Instr:
    """One instruction: compute ``node`` from ``operands``.

    ``form`` is ``"op"`` (the node's own op on ``operands``) or a fused form on
    ``(a, b[, c])``: ``"lerp"`` (``a + s·(b − a)``), ``"axpy"`` (``a + s·b``),
    ``"addcmul"`` (``a + s·b·c``), ``"addcdiv"`` (``a + (s·b)/c``), where ``s`` is the host
    value of ``scale`` (1 if ``None``), negated if ``negate``. ``host`` marks the operands
    that are host scalars. ``inplace`` is the index of the operand whose buffer receives the result (``None``:
    a new buffer); ``uniform`` says every tensor operand has the result's shape (so
    foreach ops apply; otherwise a broadcasting per-tensor loop); ``release`` lists the
    operands whose last use this is.
    """

    node: Expr
    form: str
    operands: tuple[Expr, ...]
    host: tuple[bool, ...]
    scale: Expr | None
    negate: bool
    inplace: int | None
    uniform: bool
    release: tuple[Expr, ...]


@dataclass(frozen=True)
class Program:
    """The straight-line step of one spec for one combination of host decisions."""

    host_nodes: tuple[Expr, ...]
    leaves: tuple[Expr, ...]
    instrs: tuple[Instr, ...]
    commits: tuple[tuple[str | None, Expr], ...]  # (state name, or None for the parameter; new value)
    kinds: Mapping[Expr, NodeInfo]
    shape_nodes: tuple[Expr, ...] = ()
    """The per-tensor host values (``numel``, ``finfo``, and what is computed from them and step scalars),
    operands first; the largest of them are among ``leaves``, one 0-d value per tensor."""

    @property
    def allocations(self) -> int:
        """How many instructions allocate a new buffer (the rest write in place)."""
        return sum(1 for i in self.instrs if i.inplace is None)


_INPLACE_FAMILIES = (Family.ELEMENTWISE,)


def _scaled(node: Expr, info: Mapping[Expr, NodeInfo]) -> tuple[Expr, Expr] | None:
    """``(s, b)`` if ``node`` is ``s·b`` or ``b·s`` with ``s`` a host scalar and ``b`` a tensor."""
    if node.op is not Op.MUL:
        return None
    a, b = node.args
    host_a, host_b = info[a].kind.is_step_scalar, info[b].kind.is_step_scalar
    if host_a and not host_b:
        return a, b
    if host_b and not host_a:
        return b, a
    return None


def _resolve(roots: Sequence[Expr], mapping: Mapping[Expr, Expr]) -> dict[Expr, Expr]:
    """Rewrite the DAG under ``roots``: each key of ``mapping`` becomes (the rewrite of) its value."""
    memo: dict[Expr, Expr] = {}
    for node in walk(list(roots)):
        if node in mapping:
            memo[node] = memo[mapping[node]]
        elif node.args:
            args = tuple(memo[a] for a in node.args)
            same = all(x is y for x, y in zip(args, node.args, strict=True))
            memo[node] = node if same else Expr(node.op, args, node.value, node.label)
        else:
            memo[node] = node
    return memo


def build_program(spec: Spec, mapping: Mapping[Expr, Expr], grad_writable: bool) -> Program:
    """The program of ``spec`` after the rewrites in ``mapping`` (taken branches, identities)."""
    memo = _resolve(spec.roots, mapping)
    targets: list[tuple[str | None, Expr]] = [(name, memo[e]) for name, e in spec.updates]
    targets.append((None, memo[spec.param_update]))
    roots = [root for _, root in targets]
    info = classify(roots, {s.name: s.layout for s in spec.states}, spec.name)
    order = walk(roots)
    host_nodes = tuple(n for n in order if info[n].kind.is_step_scalar)
    # Per-tensor host values: computed on the host for each tensor (float64), then one 0-d value per tensor.
    shape = {n for n in order if info[n].kind is Kind.SHAPE}
    used_by_tensor = {a for n in order if n.args and n not in shape for a in n.args} | set(roots)
    shape_leaves = [n for n in order if n in shape and n in used_by_tensor]
    info = {n: NodeInfo(Kind.TENSOR, i.is_bool) if n in shape else i for n, i in info.items()}
    leaves = tuple(n for n in order if (not n.args and not info[n].kind.is_step_scalar and n not in shape))
    leaves += tuple(shape_leaves)
    computed = [n for n in order if n.args and not info[n].kind.is_step_scalar and n not in shape]

    def is_tensor(node: Expr) -> bool:
        return not info[node].kind.is_step_scalar

    edge_uses: Counter[Expr] = Counter(a for n in computed for a in n.args)
    edge_uses.update(roots)

    forms: dict[Expr, Form] = {}
    absorbed: set[Expr] = set()
    for node in computed:
        fused = _fuse(node, info, edge_uses, absorbed)
        if fused is None:
            forms[node] = Form("op", node.args)
        else:
            forms[node], taken = fused
            absorbed.update(taken)
    steps = [n for n in computed if n not in absorbed]

    uses: Counter[Expr] = Counter(o for n in steps for o in forms[n].operands if is_tensor(o))
    uses.update(r for r in roots if is_tensor(r))

    def writable(node: Expr) -> bool:
        if node.op is Op.GRAD:
            return grad_writable
        if node in shape:
            return False
        return node.op in (Op.PARAM, Op.STATE) or bool(node.args)

    instrs: list[Instr] = []
    for node in steps:
        form, operands, scale, negate = forms[node].parts
        host = tuple(not is_tensor(o) for o in operands)
        for o, h in zip(operands, host, strict=True):
            if not h:
                uses[o] -= 1
        dead = tuple(dict.fromkeys(o for o, h in zip(operands, host, strict=True) if not h and uses[o] == 0))
        kind = info[node].kind
        uniform = all(h or info[o].kind == kind for o, h in zip(operands, host, strict=True))
        inplace = None
        if form != "op" or OP_INFO[node.op].family in _INPLACE_FAMILIES:
            positions = (0,) if form != "op" else range(len(operands))
            for pos in positions:
                o = operands[pos]
                if not host[pos] and o in dead and writable(o) and info[o].kind == kind and not info[o].is_bool:
                    inplace = pos
                    break
        instrs.append(Instr(node, form, operands, host, scale, negate, inplace, uniform, dead))
    return Program(host_nodes, leaves, tuple(instrs), tuple(targets), info, tuple(n for n in order if n in shape))


@dataclass(frozen=True)
class Form:
    """How an instruction computes its node: the form, its operands, scale and sign (see :class:`Instr`)."""

    form: str
    operands: tuple[Expr, ...]
    scale: Expr | None = None
    negate: bool = False

    @property
    def parts(self) -> tuple[str, tuple[Expr, ...], Expr | None, bool]:
        return self.form, self.operands, self.scale, self.negate


def _fuse(
    node: Expr, info: Mapping[Expr, NodeInfo], uses: Mapping[Expr, int], absorbed: set[Expr]
) -> tuple[Form, tuple[Expr, ...]] | None:
    """A fused form of ``node`` and the nodes it absorbs, or ``None``.

    * ``β·x + (1 − β)·y`` → ``lerp(x, y, 1 − β)`` (one pass, torch.optim's moment update);
    * ``a ± s·(b/c)`` → ``addcdiv(a, b, c, value=±s)``; ``a ± s·b·c``, ``a ± s·b²`` →
      ``addcmul``; ``a ± s·b`` → ``add(a, b, alpha=±s)``.

    Only products that feed nothing else are absorbed; every tensor has the node's shape.
    """
    if node.op not in (Op.ADD, Op.SUB):
        return None
    kind = info[node].kind
    products = _PRODUCT_FORMS

    def single(x: Expr) -> bool:
        return uses[x] == 1 and x not in absorbed

    def fits(*xs: Expr) -> bool:
        return all(info[x].kind == kind for x in xs)

    x, y = node.args
    if node.op is Op.ADD:
        mx, my = _scaled(x, info), _scaled(y, info)
        # lerp reads y once; keep a ± s·b·c (addcmul) instead where y is itself a product (no temporary)
        if mx and my and single(x) and single(y) and fits(mx[1], my[1]):
            for (beta, start), (weight, end) in ((mx, my), (my, mx)):
                if _is_one_minus(weight, beta) and not (end.op in products and single(end)):
                    return Form("lerp", (start, end), weight), (x, y)
    options = [(x, y, node.op is Op.SUB)] + ([(y, x, False)] if node.op is Op.ADD else [])
    for base, product, negate in options:
        if info[base].kind.is_step_scalar or not single(product):
            continue
        match = _scaled(product, info)
        if match is not None and fits(base, match[1]):
            scale, b = match
            if b.op in products and single(b) and fits(*b.args):
                return Form(_PRODUCT_FORMS[b.op], (base, b.args[0], b.args[-1]), scale, negate), (product, b)
            return Form("axpy", (base, b), scale, negate), (product,)
        quotient = _scaled_quotient(product, info, single)
        if quotient is not None and fits(base, *quotient[1:]):  # a ± (s·b)/c: addcdiv's own order
            scale, b, c = quotient
            return Form("addcdiv", (base, b, c), scale, negate), (product, product.args[0])
        if product.op in products and fits(base, *product.args):  # a ± b·c, a ± b/c, a ± b²: value ±1
            return Form(_PRODUCT_FORMS[product.op], (base, product.args[0], product.args[-1]), None, negate), (product,)
    return None


def _scaled_quotient(
    node: Expr, info: Mapping[Expr, NodeInfo], single: Callable[[Expr], bool]
) -> tuple[Expr, Expr, Expr] | None:
    """``(s, b, c)`` if ``node`` is ``(s·b)/c`` with ``s`` a host scalar and ``s·b`` used only here.

    torch's ``addcdiv(a, b, c, value=s)`` evaluates ``a + (s·b)/c`` in this order on the CPU.
    """
    if node.op is not Op.DIV or info[node.args[1]].kind.is_step_scalar:
        return None
    match = _scaled(node.args[0], info)
    if match is None or not single(node.args[0]):
        return None
    return match[0], match[1], node.args[1]


_PRODUCT_FORMS = {Op.MUL: "addcmul", Op.SQUARE: "addcmul", Op.DIV: "addcdiv"}


def _is_one_minus(weight: Expr, beta: Expr) -> bool:
    """Whether ``weight`` is literally ``1 − beta``."""
    if weight.op is not Op.SUB:
        return False
    one, other = weight.args
    return one.op is Op.CONST and float(one.value or 0.0) == 1.0 and other.unlabelled() == beta.unlabelled()


@dataclass
class SpecPlan:
    """What is known of a spec before any step: its host scalars and its decision points.

    ``branches`` are the tensor-valued ``where`` nodes whose condition is a step scalar;
    ``identities`` are ``(node, replacement, scalar, neutral)``: ``node`` equals
    ``replacement`` when ``scalar`` equals ``neutral`` (``x + 0·y``, ``x·1``, ``x/1``).
    """

    spec: Spec
    host_nodes: tuple[Expr, ...]
    branches: tuple[Expr, ...]
    identities: tuple[tuple[Expr, Expr, Expr, float], ...]
    programs: dict[tuple[object, ...], Program] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: Spec) -> SpecPlan:
        order = walk(list(spec.roots))
        host = tuple(n for n in order if spec.kind(n).is_step_scalar)
        branches = tuple(
            n
            for n in order
            if n.op is Op.WHERE and spec.kind(n.args[0]).is_step_scalar and not spec.kind(n).is_step_scalar
        )
        identities: list[tuple[Expr, Expr, Expr, float]] = []
        # A product that is summed is fused into the sum (add with alpha, addcmul, lerp) whatever its
        # factor, so ``s·x`` with s = 1 keeps its multiplication there: it rounds like torch.optim.
        summands = {a for n in order if n.op is Op.ADD for a in n.args}
        summands.update(n.args[1] for n in order if n.op is Op.SUB)
        info = {n: NodeInfo(spec.kind(n), False) for n in order}
        for node in order:
            kind = spec.kind(node)
            if kind.is_step_scalar:
                continue
            if node.op in (Op.ADD, Op.SUB):
                x, y = node.args
                pairs = [(x, y)] + ([(y, x)] if node.op is Op.ADD else [])
                for keep, product in pairs:
                    match = _scaled(product, info)
                    if match is not None and spec.kind(keep) == kind:
                        identities.append((node, keep, match[0], 0.0))
                        break
            elif node.op in (Op.MUL, Op.DIV) and node not in summands:
                x, y = node.args
                pairs = [(x, y)] + ([(y, x)] if node.op is Op.MUL else [])
                for keep, factor in pairs:
                    if spec.kind(factor).is_step_scalar and spec.kind(keep) == kind:
                        identities.append((node, keep, factor, 1.0))
                        break
        return cls(spec, host, branches, tuple(identities))

    def program(self, values: Mapping[Expr, HostValue], grad_writable: bool) -> Program:
        taken = tuple(bool(values[w.args[0]]) for w in self.branches)
        neutral = tuple(values[s] == v for _, _, s, v in self.identities)
        key = (taken, neutral, grad_writable)
        program = self.programs.get(key)
        if program is None:
            mapping: dict[Expr, Expr] = {
                w: w.args[1] if t else w.args[2] for w, t in zip(self.branches, taken, strict=True)
            }
            for (node, keep, _, _), hit in zip(self.identities, neutral, strict=True):
                if hit:
                    mapping.setdefault(node, keep)
            program = self.programs[key] = build_program(self.spec, mapping, grad_writable)
        return program
