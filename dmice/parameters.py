"""The parameters of an imputation, defined once: :class:`ImputationConfig`.

:func:`dmice.impute` builds one from its keyword arguments, a job file's ``imputation``
section builds one (:meth:`dmice.job.ImputationSpec.to_config`), and continuing a written
output builds one from the parameters its manifest recorded (:meth:`ImputationConfig.from_record`).
Each is checked once (:meth:`ImputationConfig.checked`) and recorded once
(:meth:`ImputationConfig.record`: the manifest's ``parameters`` and the input of the
configuration hash that checkpoints carry).  Tests hold :func:`dmice.impute`'s signature and the
job file's defaults to these fields.

Arguments that describe how a run goes rather than the chains (``client``, ``progress``,
``checkpoint``, ``checkpoint_every``, ``storage_options``) are not part of it.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from dmice import disclosure as _disclosure
from dmice import predictors as _pred
from dmice import rng as _rng
from dmice.disclosure import MIN_CELL_COUNT
from dmice.errors import InputError, check_int
from dmice.models import SEPARATION
from dmice.schema import MIN_LEVEL_COUNT

#: ``metadata`` of the fields added after the first job files were written: a job's configuration
#: hash leaves them out while they are at their defaults (see :func:`later_settings`)
LATER = {"later": True}


@dataclass(frozen=True)
class ImputationConfig:
    """Everything the chains of an imputation depend on, with their defaults.

    The fields are the keyword arguments of :func:`dmice.impute` of the same names (see there
    for their meaning).  ``seed`` None draws a fresh seed when checked.
    """

    m: int = 5
    max_iter: int = 10
    seed: int | None = None
    method: dict[str, str] | None = None
    visit_sequence: str | list[str] = "roman"
    donors: int = 5
    donor_pool: int | None = None
    ridge: float = 1e-5
    formulas: dict[str, str] | None = field(default=None, metadata=LATER)
    passive: dict[str, str] | None = field(default=None, metadata=LATER)
    substantive: str | None = field(default=None, metadata=LATER)
    substantive_family: str = field(default="gaussian", metadata=LATER)
    predictors: Any = None
    where: Any = field(default=None, metadata=LATER)
    ignore: Any = field(default=None, metadata=LATER)
    post: dict[str, Any] | None = field(default=None, metadata=LATER)
    delta: dict[str, float] | None = field(default=None, metadata=LATER)
    by: str | None = field(default=None, metadata=LATER)
    until_rhat: float | None = None
    min_level_count: int = field(default=MIN_LEVEL_COUNT, metadata=LATER)
    collapse: dict[str, dict[Any, Any]] | None = field(default=None, metadata=LATER)
    separation: str = field(default="firth", metadata=LATER)
    shrinkage: str | float | None = field(default="auto", metadata=LATER)
    min_cell_count: int = field(default=MIN_CELL_COUNT, metadata=LATER)

    # -- checking ---------------------------------------------------------------------------
    def checked(self) -> ImputationConfig:
        """This configuration with its numbers as plain ints and floats and a seed drawn when
        none is given; an :class:`~dmice.errors.InputError` naming the parameter for a value that
        is not what it must be.  (Column names are checked against the data by the run.)"""
        m = check_int("m", self.m, 1)
        max_iter = check_int("max_iter", self.max_iter, 0)
        donors = check_int("donors", self.donors, 1)
        donor_pool = None if self.donor_pool is None else check_int("donor_pool", self.donor_pool, 1)
        seed = check_int("seed", _rng.fresh_seed() if self.seed is None else self.seed, 0)
        if self.method is not None and not isinstance(self.method, dict):
            raise InputError(f"method must be a dict of column -> method name, got {type(self.method).__name__}")
        ridge = self.ridge
        if not isinstance(ridge, numbers.Real) or not ridge >= 0:
            raise InputError(f"ridge must be a number >= 0, got {ridge!r}")
        rhat = self.until_rhat
        if rhat is not None and (isinstance(rhat, bool) or not isinstance(rhat, numbers.Real) or not rhat > 1):
            raise InputError(f"until_rhat must be a number > 1 (e.g. 1.05), got {rhat!r}")
        if rhat is not None and m < 2:
            raise InputError("until_rhat needs at least two chains (m >= 2)")
        min_level_count = check_int("min_level_count", self.min_level_count, 0)
        min_cell_count = _disclosure.check(self.min_cell_count)
        if self.collapse is not None and not isinstance(self.collapse, dict):
            raise InputError(f"collapse must be a dict of column -> {{level: group}}, got "
                             f"{type(self.collapse).__name__}")
        if self.separation not in SEPARATION:
            raise InputError(f"separation must be one of {list(SEPARATION)}, got {self.separation!r}")
        s = self.shrinkage
        if not (s is None or s == "auto" or (isinstance(s, numbers.Real) and not isinstance(s, bool) and s > 0)):
            raise InputError(f"shrinkage must be 'auto', a prior standard deviation > 0 or None, got {s!r}")
        return dataclasses.replace(self, m=m, max_iter=max_iter, donors=donors, donor_pool=donor_pool,
                                   seed=seed, min_level_count=min_level_count, min_cell_count=min_cell_count)

    # -- recording --------------------------------------------------------------------------
    def record(self, passive: dict[str, str], formulas: dict[str, str]) -> dict[str, Any]:
        """The parameters as recorded in the manifest and hashed for checkpoints (JSON data):
        ``passive`` and ``formulas`` as parsed against the data (column -> expression,
        column -> right-hand side).  Masks given as marker columns are recorded by name (a
        continued run applies them again); other masks and ``post`` only by a fingerprint, so
        that a checkpoint must come from the same ones.  ``max_iter``, ``until_rhat`` and
        ``min_cell_count`` are not recorded here: they do not change the chains."""
        vs = self.visit_sequence
        return {"m": self.m, "seed": self.seed, "method": dict(self.method or {}),
                "visit_sequence": vs if isinstance(vs, str) else list(vs),
                "donors": self.donors, "donor_pool": self.donor_pool, "ridge": float(self.ridge),
                "passive": dict(passive),
                "formulas": {k: f"{k} ~ {v}" for k, v in formulas.items()},
                "substantive": self.substantive, "substantive_family": self.substantive_family,
                "predictors": _pred.as_json(self.predictors), "delta": dict(self.delta or {}), "by": self.by,
                "min_level_count": self.min_level_count, "collapse": self.collapse,
                "separation": self.separation, "shrinkage": self.shrinkage,
                "where": _mask_record(self.where), "ignore": _mask_record(self.ignore),
                "post": _fingerprint(self.post)}

    @classmethod
    def from_record(cls, params: dict[str, Any], where: str) -> ImputationConfig:
        """The configuration recorded as ``params`` (:meth:`record`, plus ``min_cell_count``), to
        continue the chains of the output at ``where`` (named in errors): masks recorded by
        marker column are applied again; masks and ``post`` recorded by fingerprint only cannot
        be, and are refused."""
        named = {k: params[k] for k in ("where", "ignore") if isinstance(params.get(k), dict)}
        kept = [k for k in ("where", "ignore", "post") if params.get(k) and k not in named]
        if kept:
            raise InputError(f"the output {where!r} was imputed with {kept}, which are not stored with "
                             "it; continue the chains in the session that made them")
        known = {f.name for f in dataclasses.fields(cls)}
        args = {k: v for k, v in params.items() if k in known and k not in ("where", "ignore", "post")}
        args.update({k: v.get("column", v.get("columns")) for k, v in named.items()})
        return cls(**args)


def later_settings() -> tuple[str, ...]:
    """The fields added after the first job files were written (``metadata`` :data:`LATER`)."""
    return tuple(f.name for f in dataclasses.fields(ImputationConfig) if f.metadata.get("later"))


def defaults() -> dict[str, Any]:
    """Each field's default."""
    return {f.name: f.default for f in dataclasses.fields(ImputationConfig)}


def _mask_record(mask: Any) -> Any:
    """The record of ``where`` or ``ignore``: the names of marker columns (``{"column": ...}`` or
    ``{"columns": {...}}``), else a fingerprint of the data given."""
    if isinstance(mask, str):
        return {"column": mask}
    if isinstance(mask, dict) and mask and all(isinstance(v, str) for v in mask.values()):
        return {"columns": {str(k): v for k, v in mask.items()}}
    return _fingerprint(mask)


def _fingerprint(obj: Any) -> str | None:
    """A deterministic token of an argument that cannot be recorded as it is (None if unset)."""
    if obj is None:
        return None
    from dask.base import tokenize

    return tokenize(obj)
