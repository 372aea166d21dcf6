"""Formulas per imputed variable: interactions, transforms and splines in the imputation models.

``impute(..., formulas={"chol": "chol ~ age * smoker + bs(sbp, df=3) + event"})`` replaces
the default predictors of ``chol`` (every other column, linearly) by the design of the
formula, encoded by formulaic.  Terms that involve imputed variables are recomputed from
the current imputed values of each chain at every visit, so an interaction ``age:smoker``
with ``smoker`` partly imputed always uses the chain's latest ``smoker``.

The encoding (categorical levels, spline knots, centring) is fitted once, on a sample of
the rows of the data, and replayed unchanged on every partition, chain and iteration: the
design of a row never depends on which partition it is in.  Rows whose formula variables
are all observed have a fixed design; it is built once per partition and only the rows
with imputed cells are rebuilt for each chain.

Formulas are code written by whoever wrote the job file, so they are never evaluated as
Python.  This module is the one place where every formula of dmice is checked and
evaluated (imputation formulas, the SMC-FCS substantive model, :func:`dmice.analyze`,
``dmice validate``): formulaic parses the formula, and every factor (term expression) is
checked against an allow-list by walking its Python syntax tree (:func:`check`) --
column names (backticks or ``Q("...")`` for names that are not identifiers), numbers,
arithmetic, comparisons and the functions of :data:`FUNCTIONS` and :data:`CONTRASTS`.
Anything else is an :class:`~dmice.errors.InputError` naming the formula and the token.
Evaluation (:func:`model_matrix`, :func:`replay`) passes formulaic a namespace holding
only the allowed functions, with every Python builtin and every other formulaic transform
shadowed, and a replayed model spec is checked again where it is evaluated (on the
workers), so that a gap in the checker still reaches nothing else.

Nothing here touches dask.
"""

from __future__ import annotations

import ast
import builtins
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dmice.errors import InputError
from dmice.schema import CONTINUOUS, Variable, to_codes

#: rows of the sample the formula encodings are fitted on
SAMPLE_ROWS = 20_000


# ---------------------------------------------------------------------------------------------
# the allow-list: what a formula may contain

#: functions a term may call, by name (formulaic's transforms and numpy's ufuncs)
FUNCTIONS = ("I", "C", "Q", "log", "log2", "log10", "log1p", "exp", "expm1", "sqrt", "abs",
             "bs", "cr", "cs", "cc", "poly", "center", "scale", "standardize")
#: contrast codings, allowed only as the contrasts argument of ``C()``
CONTRASTS = ("Treatment", "Sum", "Helmert", "Poly", "Diff")
#: ``contr.<name>``: R's spelling of the same codings, allowed only in ``C()``
CONTR = ("treatment", "sum", "helmert", "poly", "diff")
_ARITH = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.FloorDiv: "//",
          ast.Mod: "%"}
_UNARY = (ast.USub, ast.UAdd)
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_NODE_NAMES = {ast.Attribute: "attribute access", ast.Subscript: "subscript", ast.Lambda: "lambda",
               ast.ListComp: "comprehension", ast.SetComp: "comprehension", ast.DictComp: "comprehension",
               ast.GeneratorExp: "comprehension", ast.Starred: "starred argument",
               ast.NamedExpr: "assignment expression ':='", ast.JoinedStr: "f-string",
               ast.IfExp: "conditional expression", ast.BoolOp: "'and'/'or'", ast.Await: "await",
               ast.Yield: "yield", ast.YieldFrom: "yield", ast.Dict: "dict", ast.Set: "set"}
#: a constant power whose value would exceed this is refused (``9 ** 9 ** 9`` would not finish)
_MAX_CONSTANT = 1e300
#: formula-level powers ``(a + b + c) ** k``: formulaic's expansion takes time exponential in k
#: (``(x + z + g) ** 10`` took 4 s, ``** 100`` does not finish), so k and terms ** k are bounded
MAX_POWER = 10
MAX_POWER_EXPANSION = 50_000


class _Refused(Exception):
    def __init__(self, token: str, why: str = "is not allowed in a formula"):
        super().__init__(token)
        self.token, self.why = token, why


@dataclass
class Checked:
    """A formula that passed :func:`check`: formulaic's parse, the columns it uses (in order of
    appearance) and the names that are neither a column nor an allowed function."""

    formula: Any
    columns: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def _short(node: ast.AST, limit: int = 60) -> str:
    text = ast.unparse(node)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Checker:
    """Walks the syntax tree of one factor; records the columns it names."""

    def __init__(self, columns: Any, aliases: dict[str, str], out: Checked):
        self.columns = columns
        self.aliases = aliases
        self.out = out

    def name(self, ident: str) -> None:
        col = self.aliases.get(ident, ident)
        if col.startswith("__") or ident.startswith("__"):
            raise _Refused(f"`{col}`", "(a dunder name) is not allowed in a formula")
        if col in self.columns:
            if col not in self.out.columns:
                self.out.columns.append(col)
            return
        if col in FUNCTIONS or col in CONTRASTS or col == "contr" or hasattr(builtins, col) \
                or col in _formulaic_names():
            raise _Refused(f"`{col}`", "is not a column; a function must be called, and only "
                                       "the allowed functions can be")
        if col not in self.out.unknown:
            self.out.unknown.append(col)

    def value(self, node: ast.AST) -> None:
        """An expression computing values: columns, numbers, arithmetic, comparisons, calls."""
        if isinstance(node, ast.Name):
            self.name(node.id)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise _Refused(f"`{_short(node, 20)}`", "is not allowed here (numbers only; a string "
                                                        "only as an argument or in a comparison)")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _ARITH:
                raise _Refused(f"operator {type(node.op).__name__}", "is not allowed in a formula "
                                                                      "(+ - * / ** // % only)")
            self.value(node.left)
            self.value(node.right)
            if isinstance(node.op, ast.Pow):
                _constant(node)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, _UNARY):
                raise _Refused(f"operator {type(node.op).__name__}", "is not allowed in a formula")
            self.value(node.operand)
        elif isinstance(node, ast.Compare):
            if not all(isinstance(op, _COMPARE) for op in node.ops):
                raise _Refused(_short(node), "uses a comparison that is not allowed (== != < <= > >= "
                                             "only)")
            for operand in [node.left, *node.comparators]:
                if isinstance(operand, ast.Constant) and isinstance(operand.value, str):
                    continue  # g == 'a'
                self.value(operand)
        elif isinstance(node, ast.Call):
            self.call(node)
        else:
            self.refuse(node)

    def refuse(self, node: ast.AST) -> None:
        """Refuse ``node``, naming its most telling token: a dunder name or attribute inside it,
        else a call of a function outside the allow-list, else the node itself."""
        inner = list(ast.walk(node))
        for sub in inner:
            if isinstance(sub, ast.Name) and sub.id.startswith("__") and sub is not node:
                raise _Refused(f"`{sub.id}`", "(a dunder name) is not allowed in a formula")
            if isinstance(sub, ast.Attribute) and sub.attr.startswith("__"):
                node = sub
                break
        else:
            for sub in inner:
                if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id not in FUNCTIONS:
                    raise _Refused(f"`{sub.func.id}`", "is not an allowed function; allowed: "
                                                       f"{', '.join(FUNCTIONS)}")
        if isinstance(node, ast.Attribute):
            dotted = ast.unparse(node)
            hint = f"; write the column `{dotted}` in backticks" if dotted in self.columns else ""
            raise _Refused(f"`.{node.attr}`", f"(attribute access) is not allowed in a formula{hint}")
        if isinstance(node, ast.Subscript):
            raise _Refused(f"`[{_short(node.slice, 40)}]`", "(subscript) is not allowed in a formula")
        kind = _NODE_NAMES.get(type(node), type(node).__name__)
        raise _Refused(f"`{_short(node, 40)}`", f"({kind}) is not allowed in a formula")

    def literal(self, node: ast.AST) -> bool:
        """Whether ``node`` is a literal argument: a number, string, True/False/None, or a list or
        tuple of these."""
        if isinstance(node, ast.Constant):
            return node.value is None or isinstance(node.value, (bool, int, float, str))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY):
            return isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)) \
                and not isinstance(node.operand.value, bool)
        if isinstance(node, (ast.List, ast.Tuple)):
            return all(self.literal(e) for e in node.elts)
        return False

    def argument(self, node: ast.AST) -> None:
        if not self.literal(node):
            self.value(node)

    def keywords(self, node: ast.Call) -> None:
        for kw in node.keywords:
            if kw.arg is None:
                raise _Refused("`**`", "(keyword unpacking) is not allowed in a formula")
            if kw.arg.startswith("_"):
                raise _Refused(f"`{kw.arg}=`", "(a private argument) is not allowed in a formula")

    def contrasts(self, node: ast.AST) -> None:
        """The contrasts argument of ``C()``: ``Treatment('b')``, ``contr.sum``, ``Sum`` ..."""
        func = node.func if isinstance(node, ast.Call) else node
        if isinstance(func, ast.Name) and func.id in CONTRASTS:
            pass
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                and func.value.id == "contr" and func.attr in CONTR:
            pass
        else:
            if any(isinstance(n, ast.Attribute) and n.attr.startswith("__") or isinstance(n, ast.Name)
                   and n.id.startswith("__") for n in ast.walk(node)):
                self.refuse(node)
            raise _Refused(f"`{_short(node, 40)}`", "is not a contrast coding; allowed: "
                           f"{', '.join(CONTRASTS)} or contr.{{{','.join(CONTR)}}}")
        if isinstance(node, ast.Call):
            self.keywords(node)
            for a in [*node.args, *(k.value for k in node.keywords)]:
                if not self.literal(a):
                    raise _Refused(f"`{_short(a, 40)}`", "is not allowed as an argument of a contrast "
                                                         "coding (literals only)")

    def call(self, node: ast.Call) -> None:
        if not isinstance(node.func, ast.Name):
            self.refuse(node.func)
        fname = node.func.id
        if fname in CONTRASTS:
            raise _Refused(f"`{fname}`", "is allowed only as the contrasts of C(), e.g. "
                                         "C(g, Treatment('b'))")
        if fname not in FUNCTIONS:
            raise _Refused(f"`{fname}`", "is not an allowed function; allowed: "
                                         f"{', '.join(FUNCTIONS)}")
        if fname in self.columns:
            raise _Refused(f"`{fname}`", "is both a column and a function; rename the column")
        self.keywords(node)
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise _Refused("`*`", "(starred argument) is not allowed in a formula")
        if fname == "Q":
            if len(node.args) != 1 or node.keywords or not isinstance(node.args[0], ast.Constant) \
                    or not isinstance(node.args[0].value, str):
                raise _Refused(f"`{_short(node, 40)}`", "must be Q(\"column name\")")
            self.name(node.args[0].value)
            return
        if not node.args:
            raise _Refused(f"`{_short(node, 40)}`", "needs its argument")
        self.value(node.args[0])
        rest = list(node.args[1:])
        kws = {k.arg: k.value for k in node.keywords}
        if fname == "C":
            contrasts = rest.pop(0) if rest else kws.pop("contrasts", None)
            if contrasts is not None and not (isinstance(contrasts, ast.Constant) and contrasts.value is None):
                self.contrasts(contrasts)
            if rest:
                raise _Refused(f"`{_short(node, 40)}`", "takes C(column, contrasts, levels=[...])")
        for a in [*rest, *kws.values()]:
            self.argument(a)


@functools.lru_cache(maxsize=1)
def _formulaic_names() -> frozenset[str]:
    from formulaic.transforms import TRANSFORMS

    return frozenset(TRANSFORMS)


def _constant(node: ast.AST) -> float | None:
    """The value of an expression of numbers alone (None when it involves a column), computed in
    floating point; a power that would be too large to compute is refused."""
    if isinstance(node, ast.Constant):
        return float(node.value) if isinstance(node.value, (int, float)) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARY):
        v = _constant(node.operand)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        a, b = _constant(node.left), _constant(node.right)
        if a is None or b is None:
            return None
        try:
            if isinstance(node.op, ast.Pow):
                v = math.pow(abs(a), b)
            elif isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
                v = a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
            elif b == 0:
                raise _Refused(f"`{_short(node, 40)}`", "divides by zero")
            else:
                v = a / b if isinstance(node.op, ast.Div) else a // b if isinstance(node.op, ast.FloorDiv) \
                    else a % b
        except (OverflowError, ValueError):
            v = math.inf
        if not math.isfinite(v) or abs(v) > _MAX_CONSTANT:
            raise _Refused(f"`{_short(node, 40)}`", "is too large a number")
        return v
    return None


def _factors(formula: Any) -> list[Any]:
    """Every factor of a formulaic formula (or of a model spec's formula), both sides."""
    from formulaic.formula import SimpleFormula

    parts = [formula] if isinstance(formula, SimpleFormula) else list(formula._flatten())
    return [factor for part in parts for term in part for factor in term.factors]


def _check_factor(expr: str, method: str, columns: Any, out: Checked) -> None:
    if method == "lookup":
        _Checker(columns, {}, out).name(expr)
    elif method == "literal":
        try:
            value = ast.literal_eval(expr)
        except (ValueError, SyntaxError):
            raise _Refused(f"`{expr}`", "is not a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Refused(f"`{expr}`", "is not allowed as a term (numbers only)")
    elif method == "python":
        from formulaic.utils.code import sanitize_variable_names

        aliases: dict[str, str] = {}
        code = sanitize_variable_names(expr, {}, aliases)
        try:
            tree = ast.parse(code, mode="eval")
        except SyntaxError:
            raise _Refused(f"`{expr}`", "is not a valid expression") from None
        _Checker(columns, aliases, out).value(tree.body)
    else:
        raise _Refused(f"`{expr}`", f"is evaluated by {method!r}, which is not allowed")


def check(formula: Any, columns: Any, *, label: str = "formula") -> Checked:
    """Parse ``formula`` with formulaic and check every factor against the allow-list.

    ``columns``: the data's column names.  Returns the parsed formula, the columns it uses and
    the names that are neither columns nor allowed functions (the caller refuses those in its
    own words).  Raises :class:`InputError` naming ``label``, the formula and the offending
    token for anything outside the allow-list; nothing of the formula is evaluated.
    """
    from formulaic import Formula

    if not isinstance(formula, str):
        raise InputError(f"{label} must be a string, got {type(formula).__name__}")
    try:
        _check_powers(formula)
    except _Refused as r:
        raise InputError(f"{label} {formula!r}: {r.token} {r.why}") from None
    try:
        parsed = Formula(formula)
    except Exception as e:  # noqa: BLE001 - formulaic raises several types
        raise InputError(f"{label} {formula!r} is not valid: {error_text(e)}") from None
    out = Checked(parsed)
    cols = frozenset(map(str, columns))
    try:
        for factor in _factors(parsed):
            _check_factor(factor.expr, factor.eval_method.value, cols, out)
    except _Refused as r:
        raise InputError(f"{label} {formula!r}: {r.token} {r.why}") from None
    return out


def _check_powers(formula: str) -> None:
    """Refuse a formula-level power ``(terms) ** k`` (or ``^ k``) too large to expand, before
    formulaic's parser expands it."""
    from formulaic.parser import DefaultFormulaParser

    try:
        tokens = list(DefaultFormulaParser().get_tokens(formula))
    except Exception:  # noqa: BLE001 - formulaic's parse reports it
        return
    operands = ("name", "python", "value")
    opened: list[int] = []  # operand count where each open parenthesis started
    count = 0  # operands so far
    group = 1  # operands of the group just closed (or 1 after a single operand)
    for i, tok in enumerate(tokens):
        kind, text = tok.kind.value, str(tok)
        if kind in operands:
            count += 1
            group = 1
        elif kind == "context" and text == "(":
            opened.append(count)
        elif kind == "context" and text == ")" and opened:
            group = max(count - opened.pop(), 1)
        elif kind == "operator" and text in ("**", "^") and i + 1 < len(tokens):
            try:
                k = int(str(tokens[i + 1]))
            except ValueError:
                continue
            if k > MAX_POWER or group ** k > MAX_POWER_EXPANSION:
                raise _Refused(f"`{text}{k}`", f"is too large a power of {group} term(s) (interactions "
                                               f"up to order {MAX_POWER}, at most "
                                               f"{MAX_POWER_EXPANSION:,} products)")


@functools.lru_cache(maxsize=256)
def _check_exprs(exprs: tuple[tuple[str, str], ...], columns: frozenset[str]) -> str | None:
    out = Checked(None)
    try:
        for expr, method in exprs:
            _check_factor(expr, method, columns, out)
    except _Refused as r:
        return f"{r.token} {r.why}"
    return None


def check_spec(spec: Any, columns: Any) -> None:
    """Check a fitted model spec (formulaic's ModelSpec or ModelSpecs) again where it is about
    to be evaluated: the factors it evaluates, against the columns of the frame at hand."""
    specs = list(spec._flatten()) if hasattr(spec, "_flatten") and not hasattr(spec, "formula") else [spec]
    exprs = tuple((f.expr, f.eval_method.value) for s in specs for f in _factors(s.formula))
    why = _check_exprs(exprs, frozenset(map(str, columns)))
    if why is not None:
        raise InputError(f"a model spec holds a term outside the formula rules: {why}")


class _Blocked:
    """What every name outside the allow-list evaluates to: nothing that can be called."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise InputError(f"`{self.name}` is not allowed in a formula")

    def __reduce__(self) -> Any:
        return (_Blocked, (self.name,))


@functools.lru_cache(maxsize=1)
def namespace() -> dict[str, Any]:
    """The evaluation context passed to formulaic: the allowed functions, and every builtin and
    every other formulaic transform (``np``, ``lag``, ``hashed`` ...) shadowed by a blocker.  The
    data's columns come before it (formulaic's layers: data, context, transforms)."""
    from types import SimpleNamespace

    from formulaic.transforms import TRANSFORMS

    ns: dict[str, Any] = {n: _Blocked(n) for n in (*dir(builtins), *TRANSFORMS, "__builtins__",
                                                   "numpy", "np", "os", "sys")}
    ns.update({n: TRANSFORMS[n] for n in ("I", "C", "Q", "log", "log2", "log10", "exp", "bs", "cr", "cs",
                                          "cc", "poly", "center", "scale", "standardize", *CONTRASTS)})
    ns.update(log1p=np.log1p, expm1=np.expm1, sqrt=np.sqrt, abs=np.abs)
    contr = TRANSFORMS["contr"]
    ns["contr"] = SimpleNamespace(**{n: getattr(contr, n) for n in CONTR})
    assert set(FUNCTIONS) | set(CONTRASTS) | {"contr"} <= {n for n, v in ns.items()
                                                           if not isinstance(v, _Blocked)}
    return ns


def model_matrix(formula: Any, data: pd.DataFrame, **kwargs: Any) -> Any:
    """formulaic's model matrix of a formula that passed :func:`check` (a formulaic Formula or
    the formula string), evaluated in the allow-list's namespace."""
    from formulaic import Formula

    if isinstance(formula, str):
        checked = check(formula, data.columns)
        if checked.unknown:
            raise InputError(f"formula {formula!r} uses unknown columns {checked.unknown}")
        formula = checked.formula
    if not isinstance(formula, Formula):
        raise InputError("model_matrix takes a formula that passed dmice.formulas.check")
    return formula.get_model_matrix(data, context=namespace(), **kwargs)


def replay(spec: Any, data: pd.DataFrame, **kwargs: Any) -> Any:
    """A fitted model spec evaluated on ``data`` (checked again here, on the worker, then
    evaluated in the allow-list's namespace)."""
    check_spec(spec, data.columns)
    return spec.get_model_matrix(data, context=namespace(), **kwargs)


def error_text(e: Exception) -> str:
    """formulaic's message without the wrapped exception's text (which could quote data)."""
    msg = str(e).strip().splitlines()[0].split(" [", 1)[0].strip() if str(e).strip() else type(e).__name__
    cause = e.__cause__ or e.__context__
    if isinstance(cause, NameError) and getattr(cause, "name", None):
        return f"{msg} (unknown name {cause.name!r})"  # a name in the formula, not data
    return f"{msg} ({type(cause).__name__})" if cause is not None else msg


@dataclass(frozen=True)
class FormulaModel:
    """The design of one imputed variable's model."""

    target: str
    rhs: str
    spec: Any  # formulaic ModelSpec, fitted once
    inputs: tuple[int, ...]  # indices of the variables the design needs
    columns: tuple[str, ...]  # design columns (intercept first when present)

    @property
    def width(self) -> int:
        return len(self.columns)


def parse(formulas: Any, columns: list[str]) -> dict[str, str]:
    """Validate ``impute(formulas=...)``: target column -> ``"target ~ terms"``; returns the terms."""
    if formulas is None:
        return {}
    if not isinstance(formulas, dict):
        raise InputError(f"formulas must be a dict of column -> formula, got {type(formulas).__name__}")
    out = {}
    for target, text in formulas.items():
        if target not in columns:
            raise InputError(f"formulas names unknown column {target!r}")
        if not isinstance(text, str) or "~" not in text:
            raise InputError(f"formula for {target!r} must be a string 'target ~ terms', got {text!r}")
        lhs, rhs = text.split("~", 1)
        if lhs.strip() != target:
            raise InputError(f"formula for {target!r} must have {target!r} on the left of '~', "
                             f"got {lhs.strip()!r}")
        checked = check(rhs.strip(), columns, label=f"formula for {target!r}")
        if checked.unknown:
            raise InputError(f"formula for {target!r} cannot be evaluated: unknown column(s) "
                             + ", ".join(f"`{n}`" for n in checked.unknown))
        out[target] = rhs.strip()
    return out


def as_column(v: Variable, internal: np.ndarray) -> Any:
    """A column as formulas see it, from internal values: numbers, or categoricals with every level."""
    if v.kind == CONTINUOUS:
        return internal
    levels = list(v.levels or [])
    codes = np.where(np.isnan(internal), -1, internal).astype(np.int64)
    if levels and all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
                      for x in levels) and len(levels) == 2 and not v.ordered and v.kind == "binary":
        return np.where(codes >= 0, np.asarray(levels, dtype=np.float64)[np.maximum(codes, 0)], np.nan)
    return pd.Categorical.from_codes(codes, categories=levels, ordered=v.ordered)


def sample_frame(df: pd.DataFrame, variables: list[Variable]) -> pd.DataFrame:
    """Columns of a raw partition in the representation of :func:`as_column`."""
    return pd.DataFrame({v.name: as_column(v, to_codes(df[v.name], v)) for v in variables
                         if v.kind in (CONTINUOUS, "binary", "nominal", "ordinal")})


def fit(rhs: dict[str, str], sample: pd.DataFrame, variables: list[Variable]) -> dict[int, FormulaModel]:
    """Fit the encoding of every formula on ``sample`` (rows with a missing formula variable are
    left out of the fit).  Returns the models by target index."""
    names = [v.name for v in variables]
    out = {}
    for target, terms in rhs.items():
        checked = check(terms, sample.columns, label=f"formula for {target!r}")
        if checked.unknown:
            raise InputError(f"formula for {target!r} uses unknown or unusable column(s) {checked.unknown}")
        try:
            mm = model_matrix(checked.formula, sample, na_action="drop")
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(f"formula for {target!r} cannot be evaluated: {type(e).__name__}: "
                             f"{error_text(e)}") from None
        spec = mm.model_spec
        need = sorted(spec.required_variables)
        unknown = [n for n in need if n not in names]
        if unknown:
            raise InputError(f"formula for {target!r} uses unknown or unusable column(s) {unknown}")
        if target in need:
            raise InputError(f"formula for {target!r} uses {target!r} on the right of '~'")
        if len(mm) == 0:
            raise InputError(f"formula for {target!r}: no sampled row has every variable it uses")
        out[names.index(target)] = FormulaModel(target, terms, spec, tuple(names.index(n) for n in need),
                                                tuple(map(str, mm.columns)))
    return out


def design(fm: FormulaModel, frame: pd.DataFrame) -> np.ndarray:
    """The formula's design of ``frame`` (its encoding replayed)."""
    X = replay(fm.spec, frame, output="numpy", na_action="ignore")
    return np.asarray(X, dtype=np.float64)
