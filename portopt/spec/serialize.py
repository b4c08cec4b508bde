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
     "options": [[key, value], ...], "references": [...], "notes": ...}

``-0.0`` is written as ``0.0`` (the two compare equal, so equal specs give equal bytes).

Every distinct expression node appears once in ``nodes``, operands before their users,
and is referenced by its index, so the DAG's sharing survives the round trip (a paper's
``m_t`` used in three places is one node). A node may carry ``"label": {"text", "latex"}``.
Numbers are JSON numbers; the non-finite ones (a range's open ends) are the strings
``"inf"``, ``"-inf"`` and ``"nan"``, which every JSON reader accepts. The output is
deterministic: equal specs give equal bytes.

Loading checks the format and version, every op name, every node reference and every
field's type, then builds the :class:`~portopt.spec.Spec`, which runs the spec's own
validation; anything wrong raises :class:`~portopt.spec.SpecError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from portopt.spec.definition import OptionValue, Spec
from portopt.spec.errors import SpecError
from portopt.spec.expr import Expr, Label, walk
from portopt.spec.ops import Op
from portopt.spec.symbols import Hyperparameter, Layout, Range, StateDecl

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
    if node.op is Op.CONST:
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


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The JSON-ready form of ``spec`` (see the module docstring for the layout)."""
    roots = [s.init for s in spec.states] + [e for _, e in spec.updates] + [spec.param_update]
    nodes = walk(roots)
    index = {node: i for i, node in enumerate(nodes)}
    return {
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
            }
            for s in spec.states
        ],
        "updates": [{"state": name, "value": index[e]} for name, e in spec.updates],
        "param_update": index[spec.param_update],
        "options": [[k, _option_out(v)] for k, v in spec.options],
        "references": list(spec.references),
        "notes": spec.notes,
    }


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
def _fail(where: str, message: str) -> SpecError:
    return SpecError(f"spec JSON: {where}: {message}")


def _field(obj: Mapping[str, Any], key: str, kind: type[_T] | tuple[type, ...], where: str) -> _T:
    if key not in obj:
        raise _fail(where, f"missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; a JSON true is never accepted where a number is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise _fail(where, f"field {key!r} must be {_type_names(kind)}, got {value!r}")
    return value  # type: ignore[return-value]


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_names(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    names |= {dict: "an object", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


def _exact_keys(obj: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(allowed)})")


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object, got {value!r}")
    return value


def _number_in(value: Any, where: str) -> float:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"must be a number or one of 'inf', '-inf', 'nan', got {value!r}")
    return float(value)


def _nodes_in(raw: list[Any]) -> list[Expr]:
    nodes: list[Expr] = []
    for i, item in enumerate(raw):
        where = f"node {i}"
        obj = _object(item, where)
        _exact_keys(obj, ("op", "args", "value", "label"), where)
        op_name = _field(obj, "op", str, where)
        if op_name not in _OPS:
            raise _fail(where, f"unknown op {op_name!r} (known: {', '.join(sorted(_OPS))})")
        op = _OPS[op_name]
        args = []
        for ref in obj.get("args", []):
            if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < i:
                raise _fail(
                    where,
                    f"operand {ref!r} is not the index of an earlier node (nodes list operands before their "
                    f"users; valid here: 0..{i - 1})",
                )
            args.append(nodes[ref])
        value: float | str | None = None
        if op is Op.CONST:
            value = _number_in(obj.get("value"), f"{where} (const) value")
        elif op in (Op.HYPER, Op.STATE):
            value = _field(obj, "value", str, where)
        elif "value" in obj:
            raise _fail(where, f"op {op_name!r} takes no value")
        label = None
        if "label" in obj:
            raw_label = _object(obj["label"], f"{where} label")
            _exact_keys(raw_label, ("text", "latex"), f"{where} label")
            label = Label(_field(raw_label, "text", str, where), _field(raw_label, "latex", str, where))
        try:
            nodes.append(Expr(op, tuple(args), value, label))
        except SpecError as exc:
            raise _fail(where, str(exc)) from None
    return nodes


def _node_ref(nodes: list[Expr], ref: Any, where: str) -> Expr:
    if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < len(nodes):
        raise _fail(where, f"node reference {ref!r} is dangling (the spec has nodes 0..{len(nodes) - 1})")
    return nodes[ref]


def _hyper_in(item: Any, i: int) -> Hyperparameter:
    where = f"hyperparameter {i}"
    obj = _object(item, where)
    keys = ("name", "default", "constraint", "symbol", "latex", "doc", "what", "group_key", "group_index")
    _exact_keys(obj, keys, where)
    c = _object(_field(obj, "constraint", dict, where), f"{where} constraint")
    _exact_keys(c, ("low", "high", "low_inclusive", "high_inclusive"), f"{where} constraint")
    constraint = Range(
        _number_in(c.get("low"), f"{where} constraint low"),
        _number_in(c.get("high"), f"{where} constraint high"),
        _field(c, "low_inclusive", bool, f"{where} constraint"),
        _field(c, "high_inclusive", bool, f"{where} constraint"),
    )
    return Hyperparameter(
        name=_field(obj, "name", str, where),
        default=_number_in(obj.get("default"), f"{where} default"),
        constraint=constraint,
        symbol=_field(obj, "symbol", str, where),
        latex=_field(obj, "latex", str, where),
        doc=_field(obj, "doc", str, where),
        what=_field(obj, "what", str, where),
        group_key=_field(obj, "group_key", str, where),
        group_index=_field(obj, "group_index", (int, type(None)), where),
    )


def _state_in(item: Any, i: int, nodes: list[Expr]) -> StateDecl:
    where = f"state {i}"
    obj = _object(item, where)
    _exact_keys(obj, ("name", "symbol", "latex", "init", "layout", "doc"), where)
    layout = _field(obj, "layout", str, where)
    if layout not in _LAYOUTS:
        raise _fail(where, f"unknown layout {layout!r} (known: {', '.join(_LAYOUTS)})")
    return StateDecl(
        name=_field(obj, "name", str, where),
        symbol=_field(obj, "symbol", str, where),
        latex=_field(obj, "latex", str, where),
        init=_node_ref(nodes, obj.get("init"), f"{where} init"),
        layout=_LAYOUTS[layout],
        doc=_field(obj, "doc", str, where),
    )


def _option_in(item: Any, i: int) -> tuple[str, OptionValue]:
    where = f"option {i}"
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
        raise _fail(where, f"must be a [name, value] pair, got {item!r}")
    name, value = item
    if isinstance(value, (bool, int, float, str)):
        return name, value
    if isinstance(value, dict) and set(value) == {"float"}:
        return name, _number_in(value["float"], where)
    raise _fail(where, f"value must be true/false, a number, a string or {{'float': 'inf'}}, got {value!r}")


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Rebuild a spec from :func:`spec_to_dict`'s form; raise :class:`SpecError` on anything malformed."""
    top = _object(data, "top level")
    if top.get("format") != FORMAT:
        raise _fail("top level", f"format is {top.get('format')!r}, expected {FORMAT!r}")
    if top.get("version") != VERSION or isinstance(top.get("version"), bool):
        raise _fail("top level", f"unsupported version {top.get('version')!r} (this portopt reads version {VERSION})")
    _exact_keys(top, _TOP_KEYS, "top level")
    nodes = _nodes_in(_field(top, "nodes", list, "top level"))
    updates = []
    for i, item in enumerate(_field(top, "updates", list, "top level")):
        obj = _object(item, f"update {i}")
        _exact_keys(obj, ("state", "value"), f"update {i}")
        updates.append((_field(obj, "state", str, f"update {i}"), _node_ref(nodes, obj.get("value"), f"update {i}")))
    references = _field(top, "references", list, "top level")
    if not all(isinstance(r, str) for r in references):
        raise _fail("top level", f"references must be strings, got {references!r}")
    return Spec(
        name=_field(top, "name", str, "top level"),
        title=_field(top, "title", str, "top level"),
        hyperparameters=tuple(_hyper_in(h, i) for i, h in enumerate(_field(top, "hyperparameters", list, "top level"))),
        states=tuple(_state_in(s, i, nodes) for i, s in enumerate(_field(top, "states", list, "top level"))),
        updates=tuple(updates),
        param_update=_node_ref(nodes, top.get("param_update"), "param_update"),
        options=tuple(_option_in(o, i) for i, o in enumerate(_field(top, "options", list, "top level"))),
        references=tuple(references),
        notes=_field(top, "notes", str, "top level"),
    )


def spec_from_json(text: str | bytes) -> Spec:
    """Parse :func:`spec_to_json`'s output back into an equal spec."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec JSON: not valid JSON: {exc}") from None
    return spec_from_dict(data)
