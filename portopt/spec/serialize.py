"""A stable, versioned JSON form of a spec, so it can be stored next to a report and reloaded.

Layout (version 1)::

    {"format": "portopt.spec", "version": 1,
     "name": ..., "title": ...,
     "hyperparameters": [{"name", "default", "constraint": {"low", "high", "low_inclusive",
                          "high_inclusive"}, "symbol", "latex", "doc", "what", "group_key",
                          "group_index"}, ...],
     "nodes": [{"op": "hyper", "value": "beta1"}, {"op": "mul", "args": [0, 3]}, ...],
     "states": [{"name", "symbol", "latex", "init": <node>, "layout", "doc"}, ...],
     "updates": [{"state": "exp_avg", "value": <node>}, ...],
     "param_update": <node>,
     "options": [[key, value], ...], "references": [...], "notes": ...,
     "inputs": [{"name", "default", "constraint", "symbol", "latex", "doc"}, ...],      (only if any)
     "methods": [{"name", "updates": [{"state", "value"}, ...], "due": <node> | null, "doc"}, ...]}

A state may carry ``"when": <node>`` (it exists only for tensors whose shape satisfies it).

``-0.0`` is written as ``0.0`` (the two compare equal, so equal specs give equal bytes).

Every distinct expression node appears once in ``nodes``, operands before their users,
and is referenced by its index, so the DAG's sharing survives the round trip (a paper's
``m_t`` used in three places is one node). A node may carry ``"label": {"text", "latex"}``.
Numbers are JSON numbers; the non-finite ones (a range's open ends) are the strings
``"inf"``, ``"-inf"`` and ``"nan"``, which every JSON reader accepts. The output is
deterministic: equal specs give equal bytes.

Loading treats the text as untrusted data: it checks the size, the format and version,
every op name, every node reference, every field's type and the limits of
:mod:`portopt.spec.limits` (node count, depth, string lengths and characters), then builds
the :class:`~portopt.spec.Spec`, which runs the spec's own validation; anything wrong
raises :class:`~portopt.spec.SpecError` naming the field, and nothing else escapes.
Structurally equal nodes are merged on load, so each distinct subexpression is one object.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping
from typing import Any, TypeVar

from portopt.spec.definition import OptionValue, Spec
from portopt.spec.errors import HyperparameterError, InvalidDefaultError, SpecError
from portopt.spec.expr import Expr, Label, walk
from portopt.spec.limits import (
    MAX_DECLARATIONS,
    MAX_DEPTH,
    MAX_GROUP_INDEX,
    MAX_JSON_BYTES,
    MAX_NODES,
    check_latex,
    check_name,
    check_text,
)
from portopt.spec.ops import FINFO_FIELDS, Op
from portopt.spec.symbols import Hyperparameter, Input, Layout, Method, Range, StateDecl

__all__ = ["FORMAT", "VERSION", "spec_from_dict", "spec_from_json", "spec_to_dict", "spec_to_json"]

FORMAT = "portopt.spec"
VERSION = 1

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_OPS = {op.value: op for op in Op}
_LAYOUTS = {layout.value: layout for layout in Layout}
_TOP_KEYS = (
    "format",
    "version",
    "name",
    "title",
    "hyperparameters",
    "nodes",
    "states",
    "updates",
    "param_update",
    "options",
    "references",
    "notes",
    "inputs",
    "methods",
)
_T = TypeVar("_T")


# writing ----------------------------------------------------------------------------
def _number_out(x: float) -> float | str:
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x + 0.0  # -0.0 == 0.0: equal specs must give equal bytes


def _option_out(value: OptionValue) -> OptionValue | dict[str, str]:
    """Options keep their JSON type; a non-finite float is ``{"float": "inf"}`` (a string stays a string)."""
    if isinstance(value, float):
        number = _number_out(value)
        return {"float": number} if isinstance(number, str) else number
    return value


def _node_out(node: Expr, index: Mapping[Expr, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"op": node.op.value}
    if node.args:
        out["args"] = [index[a] for a in node.args]
    if node.op in (Op.CONST, Op.SIZE):
        out["value"] = _number_out(float(node.value or 0.0))
    elif node.value is not None:
        out["value"] = str(node.value)
    if node.label is not None:
        out["label"] = {"text": node.label.text, "latex": node.label.latex}
    return out


def _hyper_out(h: Hyperparameter) -> dict[str, Any]:
    r = h.constraint
    return {
        "name": h.name,
        "default": _number_out(h.default),
        "constraint": {
            "low": _number_out(r.low),
            "high": _number_out(r.high),
            "low_inclusive": r.low_inclusive,
            "high_inclusive": r.high_inclusive,
        },
        "symbol": h.symbol,
        "latex": h.latex,
        "doc": h.doc,
        "what": h.what,
        "group_key": h.group_key,
        "group_index": h.group_index,
    }


def _range_out(r: Range) -> dict[str, Any]:
    return {
        "low": _number_out(r.low),
        "high": _number_out(r.high),
        "low_inclusive": r.low_inclusive,
        "high_inclusive": r.high_inclusive,
    }


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The JSON-ready form of ``spec`` (see the module docstring for the layout)."""
    roots = [s.init for s in spec.states] + [e for _, e in spec.updates] + [spec.param_update]
    roots += [s.when for s in spec.states if s.when is not None]
    roots += [e for m in spec.methods for _, e in m.updates] + [m.due for m in spec.methods if m.due is not None]
    nodes = walk(roots)
    index = {node: i for i, node in enumerate(nodes)}
    out = {
        "format": FORMAT,
        "version": VERSION,
        "name": spec.name,
        "title": spec.title,
        "hyperparameters": [_hyper_out(h) for h in spec.hyperparameters],
        "nodes": [_node_out(n, index) for n in nodes],
        "states": [
            {
                "name": s.name,
                "symbol": s.symbol,
                "latex": s.latex,
                "init": index[s.init],
                "layout": s.layout.value,
                "doc": s.doc,
                **({"when": index[s.when]} if s.when is not None else {}),
            }
            for s in spec.states
        ],
        "updates": [{"state": name, "value": index[e]} for name, e in spec.updates],
        "param_update": index[spec.param_update],
        "options": [[k, _option_out(v)] for k, v in spec.options],
        "references": list(spec.references),
        "notes": spec.notes,
    }
    if spec.inputs:
        out["inputs"] = [
            {
                "name": i.name,
                "default": _number_out(i.default),
                "constraint": _range_out(i.constraint),
                "symbol": i.symbol,
                "latex": i.latex,
                "doc": i.doc,
            }
            for i in spec.inputs
        ]
    if spec.methods:
        out["methods"] = [
            {
                "name": m.name,
                "updates": [{"state": n, "value": index[e]} for n, e in m.updates],
                "due": None if m.due is None else index[m.due],
                "doc": m.doc,
            }
            for m in spec.methods
        ]
    return out


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def spec_to_json(spec: Spec) -> str:
    """``spec`` as deterministic JSON text: one field per line, one list item (node, state, ...) per line.

    Symbols stay readable UTF-8; the text ends with a newline.
    """
    fields = []
    for key, value in spec_to_dict(spec).items():
        if isinstance(value, list) and value:
            items = ",\n".join(f"    {_compact(item)}" for item in value)
            fields.append(f"  {_compact(key)}: [\n{items}\n  ]")
        else:
            fields.append(f"  {_compact(key)}: {_compact(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


# reading ----------------------------------------------------------------------------
_PREVIEW = reprlib.Repr()
_PREVIEW.maxstring = _PREVIEW.maxother = 40
_PREVIEW.maxlevel = 2
_MAX_INT_DIGITS = 32


def _show(value: Any) -> str:
    """A short, ASCII-only form of an untrusted value for an error message (bounded whatever its size)."""
    return ascii(value) if isinstance(value, str) and len(value) <= 40 else _PREVIEW.repr(value)


def _fail(where: str, message: str) -> SpecError:
    return SpecError(f"spec JSON: {where}: {message}")


def _field(obj: Mapping[str, Any], key: str, kind: type[_T] | tuple[type, ...], where: str) -> _T:
    if key not in obj:
        raise _fail(where, f"missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; a JSON true is never accepted where a number is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise _fail(where, f"field {key!r} must be {_type_names(kind)}, got {_show(value)}")
    return value  # type: ignore[return-value]


def _name(obj: Mapping[str, Any], key: str, where: str, *, dotted: bool = False) -> str:
    return check_name(_field(obj, key, str, where), f"spec JSON: {where} {key}", dotted=dotted)


def _text(obj: Mapping[str, Any], key: str, where: str, *, multiline: bool = False) -> str:
    return check_text(_field(obj, key, str, where), f"spec JSON: {where} {key}", multiline=multiline)


def _latex(obj: Mapping[str, Any], key: str, where: str) -> str:
    return check_latex(_field(obj, key, str, where), f"spec JSON: {where} {key}")


def _list(obj: Mapping[str, Any], key: str, where: str, limit: int) -> list[Any]:
    value: list[Any] = _field(obj, key, list, where)
    if len(value) > limit:
        raise _fail(where, f"{key!r} has {len(value)} entries; at most {limit} are accepted")
    return value


def _optional_list(top: Mapping[str, Any], key: str) -> list[Any]:
    """A top-level list written only when not empty (``inputs``, ``methods``)."""
    return _list(top, key, "top level", MAX_DECLARATIONS) if key in top else []


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    names |= {dict: "an object", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _exact_keys(obj: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(_show(k) for k in obj if k not in allowed)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise _fail(where, f"unknown field(s) {shown} (allowed: {', '.join(allowed)})")


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object, got {_show(value)}")
    return value


def _number_in(value: Any, where: str, *, finite: bool = False) -> float:
    if isinstance(value, str) and value in _NON_FINITE and not finite:
        return _NON_FINITE[value]
    accepted = "a finite number" if finite else "a number or one of 'inf', '-inf', 'nan'"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"must be {accepted}, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise _fail(where, f"must be {accepted}, got an integer of {len(str(value))} digits") from None
    if finite and not math.isfinite(number):
        raise _fail(where, f"must be {accepted}, got {_show(value)}")
    return number


def _nodes_in(raw: list[Any]) -> list[Expr]:
    """The node list, each node checked; structurally equal nodes become one object (hash-consing)."""
    nodes: list[Expr] = []
    depths: list[int] = []
    interned: dict[Expr, Expr] = {}
    for i, item in enumerate(raw):
        where = f"node {i}"
        obj = _object(item, where)
        _exact_keys(obj, ("op", "args", "value", "label"), where)
        op_name = _field(obj, "op", str, where)
        if op_name not in _OPS:
            raise _fail(where, f"unknown op {_show(op_name)} (known: {', '.join(sorted(_OPS))})")
        op = _OPS[op_name]
        refs = obj.get("args", [])
        if not isinstance(refs, list) or len(refs) > 3:
            raise _fail(where, f"'args' must be a list of at most 3 node indices, got {_show(refs)}")
        for ref in refs:
            if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < i:
                raise _fail(
                    where,
                    f"operand {_show(ref)} is not the index of an earlier node (nodes list operands before their "
                    f"users; valid here: 0..{i - 1})",
                )
        depth = 1 + max((depths[r] for r in refs), default=0)
        if depth > MAX_DEPTH:
            raise _fail(where, f"the expression is {depth} nodes deep; at most {MAX_DEPTH} (MAX_DEPTH) is accepted")
        value: float | str | None = None
        if op is Op.CONST:
            value = _number_in(obj.get("value"), f"{where} (const) value")
        elif op is Op.SIZE:
            value = _number_in(obj.get("value"), f"{where} (size) axis", finite=True)
        elif op is Op.FINFO:
            field = _field(obj, "value", str, where)
            if field not in FINFO_FIELDS:
                raise _fail(where, f"finfo field {_show(field)} is not one of {', '.join(FINFO_FIELDS)}")
            value = field
        elif op in (Op.HYPER, Op.STATE, Op.INPUT):
            value = _name(obj, "value", where)
        elif "value" in obj:
            raise _fail(where, f"op {op_name!r} takes no value")
        label = None
        if "label" in obj:
            raw_label = _object(obj["label"], f"{where} label")
            _exact_keys(raw_label, ("text", "latex"), f"{where} label")
            label = Label(_text(raw_label, "text", f"{where} label"), _latex(raw_label, "latex", f"{where} label"))
        try:
            node = Expr(op, tuple(nodes[r] for r in refs), value, label)
        except SpecError as exc:
            raise _fail(where, str(exc)) from None
        nodes.append(interned.setdefault(node, node))
        depths.append(depth)
    return nodes


def _node_ref(nodes: list[Expr], ref: Any, where: str) -> Expr:
    if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < len(nodes):
        raise _fail(where, f"node reference {_show(ref)} is dangling (the spec has nodes 0..{len(nodes) - 1})")
    return nodes[ref]


def _hyper_in(item: Any, i: int) -> Hyperparameter:
    where = f"hyperparameter {i}"
    obj = _object(item, where)
    keys = ("name", "default", "constraint", "symbol", "latex", "doc", "what", "group_key", "group_index")
    _exact_keys(obj, keys, where)
    c = _object(_field(obj, "constraint", dict, where), f"{where} constraint")
    _exact_keys(c, ("low", "high", "low_inclusive", "high_inclusive"), f"{where} constraint")
    low, high = (_number_in(c.get(end), f"{where} constraint {end}") for end in ("low", "high"))
    if math.isnan(low) or math.isnan(high):
        raise _fail(f"{where} constraint", "an end of a range must be a number or 'inf'/'-inf', not 'nan'")
    constraint = Range(
        low,
        high,
        _field(c, "low_inclusive", bool, f"{where} constraint"),
        _field(c, "high_inclusive", bool, f"{where} constraint"),
    )
    group_key = _field(obj, "group_key", str, where)
    group_index: int | None = _field(obj, "group_index", (int, type(None)), where)
    if group_index is not None and not 0 <= group_index <= MAX_GROUP_INDEX:
        raise _fail(where, f"group_index must be null or 0..{MAX_GROUP_INDEX}, got {group_index}")
    return Hyperparameter(
        name=_name(obj, "name", where),
        default=_number_in(obj.get("default"), f"{where} default"),
        constraint=constraint,
        symbol=_text(obj, "symbol", where),
        latex=_latex(obj, "latex", where),
        doc=_text(obj, "doc", where, multiline=True),
        what=_text(obj, "what", where),
        group_key=check_name(group_key, f"spec JSON: {where} group_key") if group_key else "",
        group_index=group_index,
    )


def _range_in(obj: Mapping[str, Any], where: str) -> Range:
    c = _object(_field(obj, "constraint", dict, where), f"{where} constraint")
    _exact_keys(c, ("low", "high", "low_inclusive", "high_inclusive"), f"{where} constraint")
    low, high = (_number_in(c.get(end), f"{where} constraint {end}") for end in ("low", "high"))
    if math.isnan(low) or math.isnan(high):
        raise _fail(f"{where} constraint", "an end of a range must be a number or 'inf'/'-inf', not 'nan'")
    return Range(
        low,
        high,
        _field(c, "low_inclusive", bool, f"{where} constraint"),
        _field(c, "high_inclusive", bool, f"{where} constraint"),
    )


def _input_in(item: Any, i: int) -> Input:
    where = f"input {i}"
    obj = _object(item, where)
    _exact_keys(obj, ("name", "default", "constraint", "symbol", "latex", "doc"), where)
    return Input(
        name=_name(obj, "name", where),
        default=_number_in(obj.get("default"), f"{where} default", finite=True),
        constraint=_range_in(obj, where),
        symbol=_text(obj, "symbol", where),
        latex=_latex(obj, "latex", where),
        doc=_text(obj, "doc", where, multiline=True),
    )


def _method_in(item: Any, i: int, nodes: list[Expr]) -> Method:
    where = f"method {i}"
    obj = _object(item, where)
    _exact_keys(obj, ("name", "updates", "due", "doc"), where)
    due_ref = obj.get("due")
    return Method(
        name=_name(obj, "name", where),
        updates=_updates_in(_list(obj, "updates", where, MAX_DECLARATIONS), nodes),
        due=None if due_ref is None else _node_ref(nodes, due_ref, f"{where} due"),
        doc=_text(obj, "doc", where, multiline=True),
    )


def _state_in(item: Any, i: int, nodes: list[Expr]) -> StateDecl:
    where = f"state {i}"
    obj = _object(item, where)
    _exact_keys(obj, ("name", "symbol", "latex", "init", "layout", "doc", "when"), where)
    layout = _field(obj, "layout", str, where)
    if layout not in _LAYOUTS:
        raise _fail(where, f"unknown layout {_show(layout)} (known: {', '.join(_LAYOUTS)})")
    return StateDecl(
        name=_name(obj, "name", where),
        symbol=_text(obj, "symbol", where),
        latex=_latex(obj, "latex", where),
        init=_node_ref(nodes, obj.get("init"), f"{where} init"),
        layout=_LAYOUTS[layout],
        doc=_text(obj, "doc", where, multiline=True),
        when=_node_ref(nodes, obj["when"], f"{where} when") if "when" in obj else None,
    )


def _option_in(item: Any, i: int) -> tuple[str, OptionValue]:
    where = f"option {i}"
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
        raise _fail(where, f"must be a [name, value] pair, got {_show(item)}")
    name, value = check_name(item[0], f"spec JSON: {where} name"), item[1]
    if isinstance(value, bool):
        return name, value
    if isinstance(value, int):
        if abs(value) > 2**63:
            raise _fail(where, f"an integer value must lie within +-2**63, got {len(str(value))} digits")
        return name, value
    if isinstance(value, float):
        return name, _number_in(value, where, finite=True)
    if isinstance(value, str):
        return name, check_text(value, f"spec JSON: {where} value")
    if isinstance(value, dict) and set(value) == {"float"}:
        return name, _number_in(value["float"], where)
    raise _fail(where, f"value must be true/false, a number, a string or {{'float': 'inf'}}, got {_show(value)}")


def _updates_in(raw: list[Any], nodes: list[Expr]) -> tuple[tuple[str, Expr], ...]:
    updates = []
    for i, item in enumerate(raw):
        where = f"update {i}"
        obj = _object(item, where)
        _exact_keys(obj, ("state", "value"), where)
        updates.append((_name(obj, "state", where), _node_ref(nodes, obj.get("value"), where)))
    return tuple(updates)


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Rebuild a spec from :func:`spec_to_dict`'s form; raise :class:`SpecError` on anything malformed.

    ``data`` is untrusted: every field is checked against :mod:`portopt.spec.limits` before
    anything is built, and nothing but :class:`SpecError` comes out of a malformed input.
    """
    top = _object(data, "top level")
    if top.get("format") != FORMAT:
        raise _fail("top level", f"format is {_show(top.get('format'))}, expected {FORMAT!r}")
    if top.get("version") != VERSION or isinstance(top.get("version"), bool):
        raise _fail(
            "top level", f"unsupported version {_show(top.get('version'))} (this portopt reads version {VERSION})"
        )
    _exact_keys(top, _TOP_KEYS, "top level")
    raw_nodes = _list(top, "nodes", "top level", MAX_NODES)
    nodes = _nodes_in(raw_nodes)
    hypers = _list(top, "hyperparameters", "top level", MAX_DECLARATIONS)
    states = _list(top, "states", "top level", MAX_DECLARATIONS)
    options = _list(top, "options", "top level", MAX_DECLARATIONS)
    references = _list(top, "references", "top level", MAX_DECLARATIONS)
    for i, ref in enumerate(references):
        if not isinstance(ref, str):
            raise _fail(f"reference {i}", f"must be a string, got {_show(ref)}")
        check_text(ref, f"spec JSON: reference {i}")
    name, title = _name(top, "name", "top level", dotted=True), _text(top, "title", "top level")
    declared = tuple(_hyper_in(h, i) for i, h in enumerate(hypers))
    state_decls = tuple(_state_in(s, i, nodes) for i, s in enumerate(states))
    updates = _updates_in(_list(top, "updates", "top level", MAX_DECLARATIONS), nodes)
    param_update = _node_ref(nodes, top.get("param_update"), "param_update")
    option_pairs = tuple(_option_in(o, i) for i, o in enumerate(options))
    notes = _text(top, "notes", "top level", multiline=True)
    inputs = tuple(_input_in(x, i) for i, x in enumerate(_optional_list(top, "inputs")))
    methods = tuple(_method_in(x, i, nodes) for i, x in enumerate(_optional_list(top, "methods")))
    try:
        return Spec(
            name, title, declared, state_decls, updates, param_update, option_pairs, tuple(references), notes,
            inputs, methods,
        )  # fmt: skip
    except SpecError as exc:
        raise _fail("the spec", str(exc)) from None
    except HyperparameterError as exc:  # a default outside its own range: still a malformed spec
        raise InvalidDefaultError(f"spec JSON: hyperparameters: {exc}") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON; write non-finite numbers as the strings 'inf', '-inf', 'nan'")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {_MAX_INT_DIGITS} are accepted)")
    return int(text)


def spec_from_json(text: str | bytes) -> Spec:
    """Parse :func:`spec_to_json`'s output back into an equal spec.

    The text is untrusted: at most :data:`~portopt.spec.limits.MAX_JSON_BYTES` bytes, then
    the limits of :mod:`portopt.spec.limits`; anything wrong raises :class:`SpecError`.
    """
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_JSON_BYTES:
        raise SpecError(f"spec JSON: {size} bytes; at most {MAX_JSON_BYTES} (MAX_JSON_BYTES) are accepted")
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int)
    except RecursionError:
        raise SpecError("spec JSON: nested too deeply to be a spec") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise SpecError(f"spec JSON: not valid JSON: {exc}") from None
    return spec_from_dict(data)
