"""What a spec read from JSON may hold: sizes, counts, depth, and which characters each string may use.

A spec's JSON form travels between machines (a report's attachment, a golden file), so
:func:`~portopt.spec.serialize.spec_from_json` treats it as untrusted data and checks it
against these limits *before* building anything; every violation is a
:class:`~portopt.spec.SpecError` naming the field, the limit and what is accepted. The
limits sit far above any real optimizer (the library's largest spec has under 100 nodes,
a depth under 20 and names under 32 characters). The character rules (not the sizes)
also hold for a spec built in Python (:func:`check_spec_strings`), so every spec that
can be built can be written and read back.

============================  =======================================================
:data:`MAX_JSON_BYTES`        the JSON text, before it is parsed
:data:`MAX_NODES`             expression nodes (each distinct subexpression once)
:data:`MAX_DEPTH`             the longest operand chain from a root to a leaf
:data:`MAX_DECLARATIONS`      hyperparameters, states, options, references (each list)
:data:`MAX_NAME`              a name (spec, hyperparameter, state, option, group key)
:data:`MAX_TEXT`              a one-line display string (title, symbol, label, ...)
:data:`MAX_LONG_TEXT`         a multi-line string (``doc``, ``notes``)
:data:`MAX_GROUP_INDEX`       a hyperparameter's ``group_index``
============================  =======================================================

Characters: a *name* is a key of an optimizer's param groups or state, so it is an ASCII
identifier (``[A-Za-z_][A-Za-z0-9_]*``; a spec's own name may join identifiers by dots). A *display string* may be any printable Unicode
text but no control, format, surrogate, private-use or unassigned character, and no line
or paragraph separator (U+2028, U+2029): it cannot move a terminal's cursor, reorder text
(bidirectional overrides) or start a new line. Multi-line strings may also hold ``\\n``.
A *LaTeX* string is math-mode text: balanced braces, no ``$ % # &`` or ``^^``, and only the control
sequences of :data:`LATEX_COMMANDS` (Greek letters, accents, fonts, a few operators), so a
rendered spec pasted into a document cannot read or write files (``\\input``, ``\\write``)
or define macros.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from portopt.spec.errors import SpecError
from portopt.spec.expr import walk

if TYPE_CHECKING:
    from portopt.spec.definition import Spec

MAX_JSON_BYTES = 1 << 20
MAX_NODES = 10_000
MAX_DEPTH = 2_000
MAX_DECLARATIONS = 64
MAX_NAME = 64
MAX_TEXT = 256
MAX_LONG_TEXT = 4_096
MAX_GROUP_INDEX = 15

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Unicode categories refused in display text: controls, format characters (bidi overrides,
# zero-width joiners), surrogates, private use, unassigned; line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_GREEK = (
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi varpi "
    "rho varrho sigma varsigma tau upsilon phi varphi chi psi omega "
    "Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega"
)
_MATH = (
    "hat bar tilde widehat widetilde overline underline dot ddot vec check breve acute grave "
    "mathrm mathbf mathit mathsf mathtt mathcal mathbb boldsymbol operatorname text "
    "max min exp log sqrt frac cdot odot oslash otimes times circ prime infty partial nabla ell "
    "mathfrak mathscr overrightarrow star ast dagger top perp "
    "lVert rVert lvert rvert langle rangle left right big Big "
    "le ge leq geq neq approx sim propto in notin mid"
)
LATEX_COMMANDS = frozenset((_GREEK + " " + _MATH).split())
"""The LaTeX control words a spec's LaTeX strings may use (math symbols and fonts only)."""
_LATEX_ESCAPES = frozenset("_{}|,;! ")
_LATEX_FORBIDDEN = frozenset("$%#&")
_BACKSLASH = "\\"


def check_name(value: str, where: str, *, dotted: bool = False) -> str:
    """``value`` if it is an ASCII identifier of at most :data:`MAX_NAME` characters, else :class:`SpecError`.

    ``dotted`` also accepts identifiers joined by dots (a spec's name: ``torch._fused_adam_``).
    """
    if len(value) > MAX_NAME:
        raise SpecError(f"{where}: a name may have at most {MAX_NAME} characters, got {len(value)}")
    if not (_DOTTED_NAME if dotted else _NAME).fullmatch(value):
        joined = ", joined by '.'" if dotted else ""
        raise SpecError(
            f"{where}: {_preview(value)} is not a name; a name is an ASCII identifier "
            f"(letters, digits and '_', not starting with a digit{joined})"
        )
    return value


def check_text(value: str, where: str, *, multiline: bool = False) -> str:
    """``value`` if it is printable text within its length limit, else :class:`SpecError`."""
    limit = MAX_LONG_TEXT if multiline else MAX_TEXT
    if len(value) > limit:
        raise SpecError(f"{where}: at most {limit} characters, got {len(value)}")
    for position, char in enumerate(value):
        if multiline and char == "\n":
            continue
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            extra = "; only a newline may break a line" if multiline else ""
            raise SpecError(
                f"{where}: character U+{ord(char):04X} at position {position} is not printable text "
                f"(control, format and line-separator characters are refused{extra})"
            )
    return value


def check_latex(value: str, where: str) -> str:
    """``value`` if it is safe math-mode LaTeX (see the module docstring), else :class:`SpecError`."""
    check_text(value, where)
    if "^^" in value:  # TeX's ^^5c notation writes a backslash, hence any command
        raise SpecError(f"{where}: '^^' is not allowed in a LaTeX string (TeX's character-code notation)")
    depth = 0
    i = 0
    while i < len(value):
        char = value[i]
        if char in _LATEX_FORBIDDEN:
            raise SpecError(f"{where}: {char!r} is not allowed in a LaTeX string (math mode only)")
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise SpecError(f"{where}: unbalanced '}}' at position {i}")
        elif char == "\\":
            word = re.match(r"[A-Za-z]+", value[i + 1 :])
            if word is None:
                escaped = value[i + 1 : i + 2]
                if escaped not in _LATEX_ESCAPES or not escaped:
                    allowed = " ".join(_BACKSLASH + e for e in sorted(_LATEX_ESCAPES))
                    raise SpecError(
                        f"{where}: LaTeX escape {_BACKSLASH + escaped!a} is not allowed (allowed: {allowed})"
                    )
                i += 2
                continue
            if word[0] not in LATEX_COMMANDS:
                raise SpecError(
                    f"{where}: LaTeX command \\{word[0]} is not allowed; a symbol may use Greek "
                    "letters, accents, fonts and math operators (see portopt.spec.limits.LATEX_COMMANDS)"
                )
            i += 1 + len(word[0])
            continue
        i += 1
    if depth:
        raise SpecError(f"{where}: {depth} unclosed '{{'")
    return value


def _preview(value: str) -> str:
    """A short, escaped form of an untrusted string for an error message."""
    text = ascii(value[:40])
    return text if len(value) <= 40 else text[:-1] + "...'"


def check_spec_strings(spec: Spec) -> None:
    """Apply the character rules to every string of ``spec`` (names, display text, LaTeX, labels)."""
    name = spec.name
    check_name(name, "spec name", dotted=True)
    check_text(spec.title, f"{name}: title")
    check_text(spec.notes, f"{name}: notes", multiline=True)
    for i, reference in enumerate(spec.references):
        check_text(reference, f"{name}: reference {i}")
    for h in spec.hyperparameters:
        where = f"{name}: hyperparameter {_preview(h.name)}"
        check_name(h.name, f"{where} name")
        check_text(h.symbol, f"{where} symbol")
        check_latex(h.latex, f"{where} latex")
        check_text(h.doc, f"{where} doc", multiline=True)
        check_text(h.what, f"{where} what")
        if h.group_key:
            check_name(h.group_key, f"{where} group_key")
    for s in spec.states:
        where = f"{name}: state {_preview(s.name)}"
        check_name(s.name, f"{where} name")
        check_text(s.symbol, f"{where} symbol")
        check_latex(s.latex, f"{where} latex")
        check_text(s.doc, f"{where} doc", multiline=True)
    for key, value in spec.options:
        check_name(key, f"{name}: option {_preview(key)}")
        if isinstance(value, str):
            check_text(value, f"{name}: option {key} value")
    for declared in spec.inputs:
        where = f"{name}: input {_preview(declared.name)}"
        check_name(declared.name, f"{where} name")
        check_text(declared.symbol, f"{where} symbol")
        check_latex(declared.latex, f"{where} latex")
        check_text(declared.doc, f"{where} doc", multiline=True)
    for m in spec.methods:
        check_name(m.name, f"{name}: method {_preview(m.name)} name")
        check_text(m.doc, f"{name}: method {_preview(m.name)} doc", multiline=True)
    extra = [s.when for s in spec.states if s.when is not None]
    extra += [e for m in spec.methods for _, e in m.updates] + [m.due for m in spec.methods if m.due is not None]
    for node in walk(list(spec.roots) + [s.init for s in spec.states] + extra):
        if node.label is not None:
            check_text(node.label.text, f"{name}: label {_preview(node.label.text)} text")
            check_latex(node.label.latex, f"{name}: label {_preview(node.label.text)} latex")
