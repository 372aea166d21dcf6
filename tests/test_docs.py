"""The public API (dmice.__all__) is documented: numpydoc docstrings that name every parameter."""

from __future__ import annotations

import inspect
import re

import dmice


def _problems(obj: object, name: str) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    if not doc:
        return [f"{name}: no docstring"]
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    params = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")
              and not p.name.startswith("_") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not params:
        return []
    if "Parameters\n----------" not in doc:
        return [f"{name}: no Parameters section for {params}"]
    section = doc.split("Parameters\n----------", 1)[1]
    return [f"{name}: parameter {p!r} not documented" for p in params
            if not re.search(rf"^(\w+, )*{re.escape(p)}(, \w+)*\s*(:|$)", section, re.M)]


def test_every_public_function_and_method_documents_its_parameters():
    problems = []
    for name in dmice.__all__:
        obj = getattr(dmice, name)
        if inspect.isfunction(obj):
            problems += _problems(obj, name)
        elif inspect.isclass(obj) and not issubclass(obj, Exception):
            if not inspect.getdoc(obj):
                problems.append(f"{name}: no docstring")
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if inspect.isfunction(member):
                    problems += _problems(member, f"{name}.{attr}")
                elif isinstance(member, property) and not member.__doc__:
                    problems.append(f"{name}.{attr}: no docstring")
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_undocumented_parameter():
    def f(a: int, b: int) -> int:
        """Add.

        Parameters
        ----------
        a : int
            One.
        """
        return a + b

    assert _problems(f, "f") == ["f: parameter 'b' not documented"]
