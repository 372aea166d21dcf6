"""Formulas are never executed as Python: impute(formulas=, substantive=), analyze, compare and
job files (dmice validate / dmice run) refuse anything outside the formula rules with an
InputError (exit 2) naming the formula and the token, before anything is evaluated; a model
spec is checked again where it is replayed (the workers), and evaluated in a namespace that
holds only the allowed functions.

Each attack writes a marker file when it runs (it did on the code before the formula rules)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import dask.dataframe as dd
import formulaic
import numpy as np
import pandas as pd
import pytest
from conftest import mixed_frame

import dmice
from dmice import formulas
from dmice.cli import main
from dmice.errors import InputError


def _touch(marker) -> str:
    """Python that creates ``marker`` (plus the process id) and evaluates to None."""
    return f"__import__('pathlib').Path({str(marker) + '-'!r} + str(__import__('os').getpid())).touch()"


def _import_attack(marker, column: str) -> str:
    # the form of the report: __import__ inside I()
    return f"I(({_touch(marker)}) or {column})"


def _globals_attack(marker, column: str) -> str:
    # no name outside the data: builtins reached through a column's attributes
    code = f"import os, pathlib; pathlib.Path({str(marker)!r} + '-' + str(os.getpid())).touch()"
    return (f"I({column} + ({column}.__class__.__init__.__globals__['__builtins__']['exec']"
            f"(\"{code}\") or 0))")


def _ran(marker) -> list[str]:
    return sorted(p.name for p in marker.parent.glob(marker.name + "-*"))


def _data(n: int = 400, seed: int = 0) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    z = g.normal(size=n)
    y = g.normal(size=n)
    x = 0.5 * y + 0.3 * z + g.normal(size=n)
    df = pd.DataFrame({"x": x, "y": y, "z": z})
    df.loc[g.random(n) < 0.3, "x"] = np.nan
    return df


ATTACKS = {"import": _import_attack, "globals": _globals_attack}


# ---------------------------------------------------------------------------------------------
# impute(formulas=, substantive=)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_impute_formula_is_not_executed(cluster_client, tmp_path, attack):
    marker = tmp_path / "pwned"
    formula = f"x ~ y + {ATTACKS[attack](marker, 'z')}"
    with pytest.raises(InputError, match=r"formula for 'x'.*(`__import__`|`\.__globals__`)"):
        dmice.impute(dd.from_pandas(_data(), npartitions=2), m=2, max_iter=1, formulas={"x": formula},
                     progress=False)
    assert _ran(marker) == []


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_substantive_model_is_not_executed(cluster_client, tmp_path, attack):
    marker = tmp_path / "pwned"
    with pytest.raises(InputError, match=r"(`__import__`|`\.__globals__`)"):
        dmice.impute(dd.from_pandas(_data(), npartitions=2), m=2, max_iter=1,
                     substantive=f"y ~ x + {ATTACKS[attack](marker, 'z')}", progress=False)
    assert _ran(marker) == []


def test_a_formula_in_a_written_manifest_is_not_executed(cluster_client, tmp_path):
    """Continuing a written output re-reads its formulas from the stored state (and the manifest):
    a forged one is refused."""
    marker = tmp_path / "pwned"
    imp = dmice.impute(dd.from_pandas(_data(), npartitions=2), m=2, max_iter=1, seed=1, progress=False)
    imp.to_parquet(str(tmp_path / "out"))
    for path in (tmp_path / "out" / "_manifest.json", tmp_path / "out" / "_state" / "state.json"):
        man = json.loads(path.read_text())
        man["parameters"]["formulas"] = {"x": f"x ~ y + {_globals_attack(marker, 'z')}"}
        path.write_text(json.dumps(man))
    with pytest.raises(InputError, match=r"`\.__globals__`"):
        dmice.open(str(tmp_path / "out")).iterate(1)
    assert _ran(marker) == []


# ---------------------------------------------------------------------------------------------
# analyze and compare


@pytest.fixture(scope="module")
def completed():
    frames = [mixed_frame(600, seed=k, frac=0.0) for k in range(2)]
    return [dd.from_pandas(f, npartitions=2) for f in frames]


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_analyze_formula_is_not_executed(cluster_client, completed, tmp_path, attack):
    marker = tmp_path / "pwned"
    with pytest.raises(InputError, match=r"formula .*(`__import__`|`\.__globals__`)"):
        dmice.analyze(completed, f"y ~ {ATTACKS[attack](marker, 'x')}", client=cluster_client)
    assert _ran(marker) == []  # neither the client nor a worker ran it


def test_compare_does_not_execute_an_outcome(cluster_client, completed, tmp_path):
    # compare(method="D3") fits the intercept-only model "<outcome> ~ 1" of the full model
    marker = tmp_path / "pwned"
    full = dmice.analyze(completed, "y ~ x + z", client=cluster_client)
    forged = replace(full, outcome=_globals_attack(marker, "y"))
    with pytest.raises(InputError, match=r"`\.__globals__`"):
        dmice.compare(forged, method="D3")
    assert _ran(marker) == []


def test_a_spec_outside_the_rules_is_refused_where_it_is_replayed(cluster_client, completed, tmp_path):
    """A model spec that never passed the checker (built by formulaic directly) is refused by
    the worker that would evaluate it; the attack writes only outside the client's process."""
    marker = tmp_path / "pwned"
    code = (f"import os, pathlib; os.getpid() == {os.getpid()} or pathlib.Path({str(marker)!r} + '-' "
            "+ str(os.getpid())).touch()")
    attack = (f"y ~ x + I(x*0 + (x.__class__.__init__.__globals__['__builtins__']['exec'](\"{code}\") "
              "or 0))")
    full = dmice.analyze(completed, "y ~ x + z", client=cluster_client)
    first = completed[0].partitions[0].compute()
    spec = formulaic.model_matrix(attack, first).model_spec  # runs on the client: writes nothing
    assert _ran(marker) == []
    design = type(full._design)(spec, full._design.columns, full._design.levels, None, None)
    with pytest.raises(InputError, match=r"model spec .*`\.__globals__`"):
        p = len(spec.rhs.column_names)
        replace(full, _design=design, terms=list(spec.rhs.column_names))._loglik_at(np.zeros(p))
    assert _ran(marker) == []
    with pytest.raises(InputError, match=r"`\.__globals__`"):
        formulas.replay(spec, first)


# ---------------------------------------------------------------------------------------------
# job files: dmice validate (exit 2, no cluster) and dmice run


def _job(tmp_path, imputation: dict, analysis: list | None = None) -> str:
    inp = tmp_path / "in"
    inp.mkdir()
    _data().to_parquet(inp / "part-0.parquet")
    job = {"version": 1, "input": {"url": str(inp), "format": "parquet"},
           "output": {"url": str(tmp_path / "out")},
           "imputation": {"m": 2, "max_iter": 1, "seed": 1, **imputation}}
    if analysis:
        job["analysis"] = analysis
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    return str(path)


JOB_ATTACKS = {
    "formulas": lambda mk: ({"formulas": {"x": f"x ~ y + {_import_attack(mk, 'z')}"}}, None,
                            "imputation.formulas.x"),
    "substantive": lambda mk: ({"substantive": f"y ~ x + {_globals_attack(mk, 'z')}"}, None,
                               "imputation.substantive"),
    "analysis": lambda mk: ({}, [{"formula": f"y ~ x + {_globals_attack(mk, 'z')}"}], "analysis.0.formula"),
}


@pytest.mark.parametrize("where", list(JOB_ATTACKS))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_job_formulas_are_checked_before_a_cluster_starts(tmp_path, capsys, where, command):
    marker = tmp_path / "pwned"
    imputation, analysis, key = JOB_ATTACKS[where](marker)
    path = _job(tmp_path, imputation, analysis)
    assert main([command, path]) == 2
    err = capsys.readouterr().err
    assert key in err and ("`__import__`" in err or "`.__globals__`" in err), err
    assert _ran(marker) == []
    assert not (tmp_path / "out").exists()


def test_a_legitimate_job_formula_validates(tmp_path):
    path = _job(tmp_path, {"formulas": {"x": "x ~ y * z + bs(z, df=3) + I(y ** 2)"}},
                [{"formula": "y ~ x + C(`z` > 0) + log1p(abs(z))"}])
    assert main(["validate", path]) == 0


# ---------------------------------------------------------------------------------------------
# the rules, without a cluster

COLUMNS = ["x", "y", "z", "g", "a b", "c.d"]

REFUSED = {
    "I(__import__('os').system('true') + z)": "`__import__`",
    "I(z.__class__)": "`.__class__`",
    "I(z.shape)": "`.shape`",
    "np.log(z)": "`.log`",
    "I(z[0])": "`[0]`",
    "I(eval('1') + z)": "`eval`",
    "I(open('f') or z)": "`open`",
    "I(getattr(z, 'real'))": "`getattr`",
    "z + len": "`len`",
    "__x__": "`__x__`",
    "`__import__`": "`__import__`",
    "Q('__builtins__')": "`__builtins__`",
    "I((lambda: 1)() + z)": "lambda",
    "I([v for v in z])": "comprehension",
    "I(sum(v for v in z))": "`sum`",
    "I('text')": "`'text'`",
    "log(*z)": "`*`",
    "I((w := z))": ":=",
    "I(f'{z}')": "f-string",
    "I(z if z else y)": "conditional",
    "I(z and y)": "'and'/'or'",
    "I(z << 2)": "LShift",
    "I(z @ z)": "MatMult",
    "lag(z)": "`lag`",
    "hashed(g)": "`hashed`",
    "bs(z, _state={})": "`_state=`",
    "bs(z, **{'df': 3})": "`**`",
    "I(z + 9 ** 9 ** 9)": "`9 ** 9 ** 9`",
    "Treatment('a')": "`Treatment`",
    "C(g, contr.custom)": "contr.custom",
    "C(g, contr.treatment.__class__)": "`.__class__`",
    "C(g, Treatment(z))": "literals only",
    "{z.values}": "`.values`",
    "I(c.d * 2)": "write the column `c.d` in backticks",
    "(x + z + g) ** 1000000000": "`**1000000000` is too large a power of 3 term(s)",  # hung the parser
    "(x + z + g) ^ 12": "`^12`",
}


@pytest.mark.parametrize("rhs", list(REFUSED))
def test_terms_outside_the_rules_are_refused_with_their_token(rhs):
    formula = f"y ~ x + {rhs}"
    with pytest.raises(InputError) as e:
        formulas.check(formula, COLUMNS, label="formula")
    assert REFUSED[rhs] in str(e.value) and repr(formula) in str(e.value)


def test_the_error_names_the_token_but_no_data_value(cluster_client):
    # a level that is a patient's name, and numbers of the data: none of them in the message
    df = _data(200)
    df["g"] = np.where(np.arange(200) < 100, "Jane Roe", "John Doe")
    values = ["Jane Roe", "John Doe"] + [repr(v) for v in df["y"].head(20)] + [str(v) for v in df["y"].head(20)]
    for bad in ("x ~ y + I(z.__class__)", "x ~ y + I(z[3])"):
        with pytest.raises(InputError) as e:
            dmice.impute(df, m=2, max_iter=1, formulas={"x": bad}, progress=False)
        msg = str(e.value)
        assert ("`.__class__`" in msg or "`[3]`" in msg) and not any(v in msg for v in values), msg
    # an evaluation error from formulaic: the message keeps the term, not the levels
    with pytest.raises(InputError) as e:
        dmice.analyze([df.fillna(0.0)] * 2, "y ~ x + C(g, Treatment('nobody'))")
    assert "Treatment" in str(e.value) and not any(v in str(e.value) for v in values), str(e.value)


def test_the_namespace_reaches_no_builtin_even_past_the_checker(tmp_path, monkeypatch):
    """Defence in depth: with the checker switched off, evaluation still finds no builtin,
    no numpy and no formulaic transform outside the allow-list."""
    marker = tmp_path / "pwned"
    monkeypatch.setattr(formulas._Checker, "value", lambda self, node: None)
    monkeypatch.setattr(formulas._Checker, "name", lambda self, ident: None)
    df = _data(20).fillna(0.0)
    for rhs in (_import_attack(marker, "z"), "I(np.os.getpid() + z)", "I(numpy.pi + z)",
                "I(open('/dev/null') or z)", "I(eval('1') + z)", "I(__builtins__['eval']('1') + z)",
                "lag(z)", "hashed(z)", "I(contr.custom)"):
        checked = formulas.check(f"x ~ {rhs}", df.columns)  # accepted: the checker is off
        with pytest.raises(Exception) as e:
            formulas.model_matrix(checked.formula, df)
        assert "not allowed" in str(e.value) or "_Blocked" in str(e.value) \
            or "SimpleNamespace" in str(e.value), (rhs, str(e.value))
    assert _ran(marker) == []


LEGITIMATE = [
    "y ~ x * z + C(g, contr.treatment('b')) + I(x ** 2)",
    "y ~ bs(x, df=3) + cr(z, df=4) + poly(x, 2) + center(z) + scale(x) + standardize(z)",
    "y ~ log(w) + log2(w) + log10(w) + log1p(w) + exp(x) + sqrt(w) + abs(x) + expm1(x)",
    "y ~ C(g, Treatment('b')) + C(g, Sum) + C(g, contr.sum) + C(g, levels=['c', 'b', 'a'])",
    "y ~ `a b` + Q('c.d') + I(`a b` * 2) + {x + 1} + I(x > 0) + I(g == 'a') + I(-x / 2 % 3 // 1)",
    "y ~ x + z - 1",
    "y ~ (x + z + g) ** 2",
    "log(w) ~ x:z + x * g",
    "y ~ bs(x, knots=[-1, 0, 1], degree=3) + cc(x, df=4) + cs(z, df=3)",
    "y ~ I(w ** (1 / 3)) + C(g, Treatment(reference='c')) + poly(x, degree=3, raw=True) + scale(x, ddof=1)",
]


@pytest.mark.parametrize("formula", LEGITIMATE)
def test_legitimate_formulas_give_formulaics_matrices(formula):
    g = np.random.default_rng(1)
    n = 80
    df = pd.DataFrame({"x": g.normal(size=n), "z": g.normal(size=n), "y": g.normal(size=n),
                       "w": g.gamma(2.0, size=n), "g": pd.Categorical(g.choice(list("abc"), n)),
                       "a b": g.normal(size=n), "c.d": g.normal(size=n)})
    checked = formulas.check(formula, df.columns)
    assert checked.unknown == []
    ours = formulas.model_matrix(checked.formula, df)
    # formulaic alone, with numpy's functions for the names it does not define itself
    ref = formulaic.model_matrix(formula, df, context={"sqrt": np.sqrt, "log1p": np.log1p,
                                                       "expm1": np.expm1, "abs": np.abs})
    for side in ("lhs", "rhs"):
        a, b = getattr(ours, side), getattr(ref, side)
        assert list(a.columns) == list(b.columns)
        np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    again = formulas.replay(ours.model_spec, df)
    np.testing.assert_array_equal(again.rhs.to_numpy(), ours.rhs.to_numpy())
