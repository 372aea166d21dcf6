"""Scheduled data-lake jobs: ``dmice validate``, ``dmice run``, ``dmice verify``.

A job file (YAML or JSON) names an input, an output, the imputation settings, optional
analyses and the cluster::

    version: 1
    input:  {url: "s3://lake/cohort/as_of=2026-11-01/", format: parquet}
    output: {url: "s3://lake/imputed/cohort/as_of=2026-11-01/", layout: full}
    imputation: {m: 20, max_iter: 20, seed: 20261101, method: {bmi: pmm, smoker: logreg}}
    analysis: [{formula: "event ~ age + sbp + smoker", family: binomial}]
    cluster: {address: null, n_workers: 2}

What differs between environments comes from ``DMICE_*`` environment variables
(:data:`ENV_OVERRIDES`); credentials come from the storage library's own environment
(``AWS_ACCESS_KEY_ID``..., ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_...``) and are
refused in the file.

A run writes below ``<output>/runs/<run_id>/`` and commits by replacing ``<output>/_SUCCESS``
(see :mod:`dmice.store`).  Re-running a committed job is a no-op; ``force`` recomputes; another
configuration on the same output is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmice import formulas as _formulas
from dmice import store
from dmice.errors import InputError, OutputError
from dmice.parameters import ImputationConfig, defaults, later_settings
from dmice.schema import ALL_METHODS

log = logging.getLogger("dmice")

#: exit codes of ``dmice validate/run/verify``
EXIT_OK = 0  # done, or nothing to do (the output is already complete)
EXIT_UNEXPECTED = 1  # a bug or an infrastructure failure (storage, cluster)
EXIT_INVALID = 2  # the job file or the input is not valid
EXIT_CONFLICT = 3  # the output belongs to another configuration or changed input, or is locked by a run
EXIT_VERIFY = 4  # the output does not match its manifest

#: environment variables overriding keys of the job file (applied before validation)
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "DMICE_INPUT_URL": ("input", "url"),
    "DMICE_INPUT_STORAGE_OPTIONS": ("input", "storage_options"),
    "DMICE_OUTPUT_URL": ("output", "url"),
    "DMICE_OUTPUT_STORAGE_OPTIONS": ("output", "storage_options"),
    "DMICE_CLUSTER_ADDRESS": ("cluster", "address"),
    "DMICE_CLUSTER_N_WORKERS": ("cluster", "n_workers"),
}

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|account_key|sas_|private|"
                         r"^key$)", re.I)


class JobError(InputError):
    """The job file, its environment overrides or the input it names is not valid."""


class ConflictError(OutputError):
    """The output holds another job's result, or the input changed since it was written."""


# ---------------------------------------------------------------------------------------------
# the schema of the job file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


MethodName = Literal[tuple(ALL_METHODS)]  # type: ignore[valid-type]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class InputSpec(_Strict):
    """Where the incomplete data is."""

    url: Annotated[str, Field(min_length=1, description="fsspec URL of a file or directory")]
    format: Literal["parquet", "csv"] = Field("parquet", description="file format")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="passed to fsspec unchanged; no credentials")


class OutputSpec(_Strict):
    """Where the imputations go."""

    url: Annotated[str, Field(min_length=1, description="fsspec URL of the output directory")]
    layout: Literal["full", "cells"] = Field(
        "full", description="full: m completed data sets; cells: only the imputed cells")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="passed to fsspec unchanged; no credentials")
    checkpoint_every: PositiveInt = Field(
        1, description="save the chains' state every this many iterations; a killed run resumes "
                       "from the last save")


class PostSpec(_Strict):
    """Post-processing of a continuous column's imputed values (``impute(post=)``)."""

    squeeze: Annotated[list[float], Field(min_length=2, max_length=2)] | None = Field(
        None, description="[low, high]: imputed values clipped to this range")
    round_to: Annotated[float, Field(gt=0)] | None = Field(
        None, description="imputed values rounded to a multiple of this step (after squeeze)")

    def functions(self) -> list[Any]:
        from dmice.post import round_to, squeeze

        out = []
        if self.squeeze is not None:
            out.append(squeeze(*self.squeeze))
        if self.round_to is not None:
            out.append(round_to(self.round_to))
        return out


#: the defaults of the imputation's parameters (one definition: dmice.parameters)
_D = defaults()


class ImputationSpec(_Strict):
    """Arguments of :func:`dmice.impute`."""

    m: PositiveInt = _D["m"]
    max_iter: NonNegativeInt = _D["max_iter"]
    seed: NonNegativeInt = Field(description="required: a re-run must reproduce the output")
    method: dict[str, MethodName] = Field(default_factory=dict,
                                          description="method per column; '' leaves it as is")
    predictors: dict[str, list[str]] | None = Field(
        None, description="predictor columns per imputed column (default: all other columns)")
    visit_sequence: Literal["roman", "arabic", "monotone"] | list[str] = _D["visit_sequence"]
    donors: PositiveInt = _D["donors"]
    donor_pool: PositiveInt | None = Field(
        None, description="pmm: match against a fixed sample of this many observed rows instead of "
                          "all of them (the former default, 10000)")
    ridge: Annotated[float, Field(ge=0)] = _D["ridge"]
    until_rhat: Annotated[float, Field(gt=1)] | None = Field(
        None, description="stop before max_iter once every R-hat is below this value")
    formulas: dict[str, str] = Field(
        default_factory=dict, description="imputation model of a column as a formula, e.g. "
                                          "{chol: 'chol ~ age * smoker + bs(sbp, df=3)'}")
    passive: dict[str, str] = Field(
        default_factory=dict, description="derived columns kept in sync with the imputations, e.g. "
                                          "{bmi: 'weight / (height / 100) ** 2'}")
    substantive: str | None = Field(
        None, description="analysis model whose continuous covariates are imputed compatibly (SMC-FCS)")
    substantive_family: Literal["gaussian", "binomial"] = _D["substantive_family"]
    by: str | None = Field(None, description="complete categorical column: models fitted within each level")
    where: dict[str, str] = Field(
        default_factory=dict, description="{column: boolean marker column}: observed cells of the "
                                          "column marked true are imputed too (over-imputation)")
    ignore: str | None = Field(
        None, description="boolean marker column: rows marked true are left out of every model fit "
                          "(e.g. a validation set); their missing cells are still imputed")
    delta: dict[str, float] = Field(
        default_factory=dict, description="shift added to a column's imputed values (MNAR sensitivity)")
    post: dict[str, PostSpec] = Field(default_factory=dict,
                                      description="post-processing of a continuous column's imputed values")
    min_level_count: NonNegativeInt = Field(
        _D["min_level_count"], description="predictor levels observed fewer times share one design column")
    collapse: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="{column: {level: group}} merges of predictor levels "
                                          "(levels of string or categorical columns)")
    separation: Literal["firth", "ridge", "error", "none"] = _D["separation"]
    shrinkage: Literal["auto"] | Annotated[float, Field(gt=0)] | None = Field(
        _D["shrinkage"], description="prior on polyreg coefficients: auto (empirical Bayes for rare levels), "
                            "a prior standard deviation, or null")
    min_cell_count: PositiveInt = Field(
        _D["min_cell_count"], description="small-cell rule of what is written about the data (manifest, "
                                    "diagnostics): levels seen fewer times are not named, smaller "
                                    "counts are merged; 1 switches it off")

    def to_config(self) -> ImputationConfig:
        """The imputation's :class:`~dmice.parameters.ImputationConfig`."""
        return ImputationConfig(**self.arguments())

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of :func:`dmice.impute` (``checkpoint`` and the rest excepted)."""
        return dict(m=self.m, max_iter=self.max_iter, seed=self.seed, method=dict(self.method) or None,
                    predictors=self.predictors, visit_sequence=self.visit_sequence, donors=self.donors,
                    donor_pool=self.donor_pool, ridge=self.ridge, until_rhat=self.until_rhat,
                    formulas=dict(self.formulas) or None, passive=dict(self.passive) or None,
                    substantive=self.substantive, substantive_family=self.substantive_family,
                    by=self.by, delta=dict(self.delta) or None,
                    where=dict(self.where) or None, ignore=self.ignore,
                    post={c: p.functions() for c, p in self.post.items()} or None,
                    min_level_count=self.min_level_count,
                    collapse={c: dict(m) for c, m in self.collapse.items()} or None,
                    separation=self.separation, shrinkage=self.shrinkage,
                    min_cell_count=self.min_cell_count)


#: imputation settings added after the first job files were written: left out of the
#: configuration hash while at their defaults, so existing jobs keep their hash (and outputs)
_LATER_SETTINGS = later_settings()


class AnalysisSpec(_Strict):
    """One analysis model fitted on every imputation and pooled (:func:`dmice.analyze`)."""

    formula: Annotated[str, Field(min_length=3)]
    family: Literal["gaussian", "binomial", "poisson"] = "gaussian"
    link: Literal["identity", "logit", "probit", "cloglog", "log"] | None = None
    weights: str | None = None
    offset: str | None = None
    cov_type: Literal["nonrobust", "HC0", "HC1"] = "nonrobust"
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = Field(
        None, description="file name of the pooled tables (default analysis_<position>)")


class ClusterSpec(_Strict):
    """The Dask cluster: a scheduler address, or null for an embedded LocalCluster."""

    address: str | None = None
    n_workers: PositiveInt | None = None


class JobSpec(_Strict):
    """A dmice job file."""

    model_config = ConfigDict(extra="forbid", strict=True, title="dmice job")

    version: Literal[1]
    input: InputSpec
    output: OutputSpec
    imputation: ImputationSpec
    analysis: list[AnalysisSpec] = Field(default_factory=list)
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)

    def config(self) -> dict[str, Any]:
        """What determines the output's content (no URLs of the output, no storage options,
        no cluster): its hash identifies the job on its output."""
        return {"version": self.version,
                "input": {"url": self.input.url, "format": self.input.format},
                "output": {"layout": self.output.layout},
                "imputation": _pool_as_before(_without_defaults(self.imputation, _LATER_SETTINGS)),
                "analysis": [a.model_dump(mode="json") for a in self.analysis]}

    def config_hash(self) -> str:
        return _hash(self.config())

    def section_hashes(self) -> dict[str, str]:
        return {k: _hash(v) for k, v in self.config().items()}


def _without_defaults(spec: BaseModel, names: tuple[str, ...]) -> dict[str, Any]:
    """``spec`` as JSON data without the settings ``names`` that are at their default."""
    data = spec.model_dump(mode="json")
    for name in names:
        if data.get(name) == type(spec).model_fields[name].get_default(call_default_factory=True):
            data.pop(name, None)
    return data


def _pool_as_before(data: dict[str, Any]) -> dict[str, Any]:
    """The imputation settings with ``donor_pool`` hashed as the 10000 it defaulted to before pmm
    matched on all observed rows: an unchanged job file keeps its configuration hash (a re-run of it
    stays a no-op on an output written before).  An explicit ``donor_pool`` (sample-based matching,
    which imputes differently) is hashed with a marker, so ``donor_pool: 10000`` and no
    ``donor_pool`` never share a hash."""
    if data.get("donor_pool") is None:
        return {**data, "donor_pool": 10_000}
    return {**data, "donor_matching": "sample"}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def json_schema() -> dict[str, Any]:
    """JSON Schema of the job file (for editors; committed as ``dmice/job.schema.json``)."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# loading and validating


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith(("function-",
                                                                                       "literal["))))


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function"))))
    key = _loc(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        return f"{key}: unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    if kind == "missing":
        return f"{key}: required key is missing"
    if key == "version" and kind == "literal_error":
        return "version: expected 1 (the job file versions this dmice reads)"
    if kind == "literal_error" and err.get("ctx", {}).get("expected"):
        return f"{key}: expected {err['ctx']['expected']}"
    msg = err["msg"]
    if msg.startswith("Input should be"):
        msg = "expected" + msg[len("Input should be"):]
    return f"{key}: {msg}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    cur: Any = model
    for p in loc:
        if isinstance(p, int):
            continue
        field = getattr(cur, "model_fields", {}).get(p)
        if field is None:
            return []
        ann = field.annotation
        cur = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type)
                    and issubclass(a, BaseModel)), ann)
    return list(getattr(cur, "model_fields", {}))


def _find_secrets(obj: Any, where: str) -> str | None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_KEY.search(k):
                return f"{where}.{k}"
            hit = _find_secrets(v, f"{where}.{k}")
            if hit:
                return hit
    return None


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> list[str]:
    used = []
    for var, (section, key) in ENV_OVERRIDES.items():
        if var not in environ:
            continue
        value: Any = environ[var]
        if key == "storage_options":
            try:
                value = json.loads(value)
            except ValueError:
                raise JobError(f"{var}: expected a JSON object of storage options") from None
        elif key == "n_workers":
            try:
                value = int(value)
            except ValueError:
                raise JobError(f"{var}: expected an integer number of workers") from None
        elif key == "address" and value == "":
            value = None
        sec = raw.setdefault(section, {})
        if not isinstance(sec, dict):
            raise JobError(f"{section}: expected a mapping")
        sec[key] = value
        used.append(var)
    return used


def load_job(path: str, environ: dict[str, str] | None = None) -> JobSpec:
    """Read, override from the environment and validate a job file.

    Parameters
    ----------
    path : str
        Job file (YAML or JSON; fsspec URL or local path).
    environ : dict, optional
        Environment for the ``DMICE_*`` overrides (default ``os.environ``).

    Raises
    ------
    JobError
        One line naming each bad key and what was expected.
    """
    import fsspec
    import yaml

    environ = dict(os.environ if environ is None else environ)
    try:
        with fsspec.open(path, "r") as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise JobError(f"job file {path!r} not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise JobError(f"job file {path!r} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise JobError(f"job file {path!r}: expected a mapping with keys version, input, output, "
                       "imputation, analysis, cluster")
    for section in ("input", "output"):
        sec = raw.get(section)
        if isinstance(sec, dict):
            hit = _find_secrets(sec.get("storage_options"), f"{section}.storage_options")
            if hit:
                raise JobError(f"{hit}: credentials do not belong in the job file; set them in the "
                               "storage library's environment (e.g. AWS_ACCESS_KEY_ID, "
                               "GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY)")
    used = _apply_env(raw, environ)
    try:
        job = JobSpec.model_validate(raw)
    except ValidationError as e:
        errs = [_describe(err, JobSpec) for err in e.errors()]
        more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
        env = f" [overrides from {', '.join(used)}]" if used else ""
        raise JobError("; ".join(errs[:3]) + more + env) from None
    return job


@dataclass
class InputInfo:
    """What the job's input holds: its files and its columns (no data)."""

    files: list[dict[str, Any]]
    meta: Any  # empty pandas frame with the columns and dtypes

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.meta.columns]


def inspect_input(job: JobSpec) -> InputInfo:
    """List the input files and read the column names and dtypes (schema only)."""
    files = store.list_input(job.input.url, job.input.format, job.input.storage_options)
    try:
        meta = store.input_meta(job.input.url, job.input.format, files[0]["path"],
                                job.input.storage_options)
    except (ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise JobError(f"input.url: the first {job.input.format} file cannot be read as "
                       f"{job.input.format} ({type(e).__name__})") from None
    return InputInfo(files=files, meta=meta)


def check_against_input(job: JobSpec, info: InputInfo) -> None:
    """Every column the job names exists in the input."""
    cols = set(info.columns)
    if len(cols) != len(info.columns):
        raise JobError("input: column names must be unique")
    imp = job.imputation

    def need(key: str, name: str) -> None:
        if name not in cols:
            raise JobError(f"{key}: unknown column {name!r}; the input has {len(cols)} columns")

    for name in imp.method:
        need(f"imputation.method.{name}", name)
    for name, preds in (imp.predictors or {}).items():
        need(f"imputation.predictors.{name}", name)
        for p in preds:
            need(f"imputation.predictors.{name}", p)
    if isinstance(imp.visit_sequence, list):
        for name in imp.visit_sequence:
            need("imputation.visit_sequence", name)
    def marker(key: str, name: str) -> None:
        from pandas.api.types import is_bool_dtype

        need(key, name)
        dtype = info.meta.dtypes[name]
        if not is_bool_dtype(dtype):
            raise JobError(f"{key}: column {name!r} has dtype {dtype}; a marker column must be boolean")

    for name, mark in imp.where.items():
        need(f"imputation.where.{name}", name)
        marker(f"imputation.where.{name}", mark)
    if imp.ignore:
        marker("imputation.ignore", imp.ignore)
    for i, a in enumerate(job.analysis):
        for key in ("weights", "offset"):
            if getattr(a, key):
                need(f"analysis.{i}.{key}", getattr(a, key))
        for name in _formula_columns(a.formula, f"analysis.{i}.formula", info.columns):
            need(f"analysis.{i}.formula", name)
    # every formula is checked against the formula rules here, before a cluster starts
    for name, text in imp.formulas.items():
        try:
            _formulas.parse({name: text}, info.columns)
        except InputError as e:
            raise JobError(f"imputation.formulas.{name}: {e}") from None
    if imp.substantive is not None:
        for name in _formula_columns(imp.substantive, "imputation.substantive", info.columns):
            need("imputation.substantive", name)


def _formula_columns(formula: str, key: str, columns: list[str]) -> list[str]:
    """The columns a formula names (the unknown ones last), after :func:`dmice.formulas.check`."""
    try:
        checked = _formulas.check(formula, columns, label=key)
    except InputError as e:
        raise JobError(str(e)) from None
    return checked.columns + checked.unknown


def validate(path: str, environ: dict[str, str] | None = None) -> tuple[JobSpec, InputInfo]:
    """``dmice validate``: the job file, then the input's files and columns."""
    job = load_job(path, environ)
    info = inspect_input(job)
    check_against_input(job, info)
    return job, info


# ---------------------------------------------------------------------------------------------
# running


def new_run_id() -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


@dataclass
class RunOutcome:
    """What ``run_job`` did: ``status`` is ``"done"`` or ``"noop"``."""

    status: str
    run_id: str
    url: str


def output_state(job: JobSpec) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The commit record and manifest of the output, or ``(None, None)`` when nothing is
    committed.  Refuses a non-empty output that is not a job output."""
    url, so = job.output.url, job.output.storage_options
    pointer = store.read_pointer(url, so)
    if pointer is None:
        fs, root = store.filesystem(url, so)
        if fs.exists(root):
            names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
            other = {n for n in names - {store.RUNS} if not n.startswith(store.LOCK)}
            if other:
                raise ConflictError(f"output.url: {url!r} is not empty ({len(other)} entries other "
                                    f"than {store.RUNS}/) and holds no committed dmice job output")
        return None, None
    if not pointer:
        raise ConflictError(f"output.url: {url!r} holds a dmice output not written by a job; "
                            "write the job to another output URL")
    return pointer, store.read_manifest(url, so)


def _check_committed(job: JobSpec, manifest: dict[str, Any], files: list[dict[str, Any]],
                     force: bool) -> bool:
    """True when the committed output is this job's result for this input (nothing to do)."""
    committed = manifest.get("job") or {}
    if committed.get("config_hash") != job.config_hash():
        theirs = committed.get("section_hashes", {})
        differ = [k for k, h in job.section_hashes().items() if theirs.get(k) != h]
        raise ConflictError(f"output.url: {job.output.url!r} holds the result of another job "
                            f"configuration (differs in: {', '.join(differ) or 'all'}); write to "
                            "another output URL or delete the output first")
    snap = manifest.get("input_snapshot") or {}
    was = [(f["path"], f["bytes"]) for f in snap.get("files", [])]
    now = [(f["path"], f["bytes"]) for f in files]
    if was != now and not force:
        n = len(set(was) ^ set(now))
        raise ConflictError(f"input.url: the input changed since the committed run "
                            f"{manifest.get('run_id')!r} ({n} files added, removed or resized); "
                            "re-run with --force to recompute")
    return not force


def run_job(job: JobSpec, run_id: str | None = None, force: bool = False) -> RunOutcome:
    """Run a job: impute, write under a run-scoped prefix, commit; or do nothing when done.

    Parameters
    ----------
    job : JobSpec
        A validated job (:func:`load_job`).
    run_id : str, optional
        Name of the run's prefix ``runs/<run_id>/``: letters, digits, ``._-`` (at most 128),
        starting with a letter or digit, without ``..``.  Default: UTC time and a random
        suffix.  A retry with the same run id replaces that run's uncommitted files.
    force : bool, default False
        Recompute a committed output of the same job.

    Returns
    -------
    RunOutcome

    Raises
    ------
    JobError
        Invalid job or input (exit code 2).
    ConflictError
        The output holds another configuration, or the input changed (exit code 3).
    dmice.store.LockedError
        Another run holds the output's lock (exit code 3); nothing is changed.
    """
    run_id = store.check_run_id(run_id or new_run_id(), "--run-id")
    url, so = job.output.url, job.output.storage_options
    info = inspect_input(job)
    check_against_input(job, info)
    with store.output_lock(url, so, run_id) as lock:
        return _run_locked(job, info, run_id, force, lock)


def _run_locked(job: JobSpec, info: InputInfo, run_id: str, force: bool,
                lock: store.OutputLock) -> RunOutcome:
    url, so = job.output.url, job.output.storage_options
    pointer, manifest = output_state(job)
    if manifest is not None and _check_committed(job, manifest, info.files, force):
        log.info("%s is already complete (run %s); nothing to do", url, pointer["run_id"])
        return RunOutcome("noop", pointer["run_id"], url)
    if pointer and pointer["run_id"] == run_id:
        raise ConflictError(f"--run-id: run {run_id!r} is the committed run of {url!r}; a forced "
                            "re-run needs a new run id")
    prefix = store.run_prefix(run_id)
    fs, root = store.filesystem(url, so)
    staging = posixpath.join(root, prefix)
    if fs.exists(staging):
        # an earlier, uncommitted attempt of this run id: its files are rewritten (the chains
        # resume from the job's checkpoint, which lives outside the run prefix)
        log.info("replacing the uncommitted files of an earlier attempt of run %s", run_id)
        store.remove_run_prefix(fs, root, staging)
    written = _compute_and_write(job, info, run_id, prefix)
    if not lock.held():
        raise ConflictError(f"output.url: the lock of {url!r} was taken over while run {run_id!r} "
                            "was computing (no heartbeat for longer than its TTL); nothing committed")
    store.commit(url, so, written, run_id=run_id)
    if pointer and pointer.get("run_id") != run_id:
        old = posixpath.join(root, store.run_prefix(pointer["run_id"]))
        if fs.exists(old):
            store.remove_run_prefix(fs, root, old)  # superseded: nothing names it any more
    cfs, croot = store.filesystem(checkpoint_url(job), so)
    if cfs.exists(croot):
        store.remove_run_prefix(cfs, root, croot)  # the committed output supersedes it
    log.info("committed run %s to %s", run_id, url)
    return RunOutcome("done", run_id, url)


def _read_input(job: JobSpec, snapshot: dict[str, Any], meta: Any) -> Any:
    """The input as a dask DataFrame, one partition per file, each checked against its
    snapshot checksum when read."""
    import dask.dataframe as dd

    dtypes = {str(c): str(t) for c, t in meta.dtypes.items()}
    reader = _ReadFile(job.input.url, job.input.format, job.input.storage_options, dtypes)
    return dd.from_map(reader, [(f["path"], f["sha256"]) for f in snapshot["files"]], meta=meta,
                       enforce_metadata=False)


class _ReadFile:
    def __init__(self, url: str, fmt: str, storage_options: dict[str, Any], dtypes: dict[str, str]):
        self.url, self.fmt, self.so, self.dtypes = url, fmt, storage_options, dtypes

    def __call__(self, item: tuple[str, str]) -> Any:
        rel, sha = item
        return store.read_input_file(self.url, rel, self.fmt, self.so, sha, self.dtypes)


def checkpoint_url(job: JobSpec) -> str:
    """Where the chains of this job's configuration are checkpointed: below ``runs/`` of the
    output, keyed by the configuration hash, so that any later run of the same job (whatever its
    run id) resumes from it; removed once a run is committed."""
    return posixpath.join(job.output.url.rstrip("/"), store.RUNS, f"{store.CHECKPOINT}-{job.config_hash()[:16]}")


def impute_step(job: JobSpec, ddf: Any, client: Any, checkpoint: str) -> Any:
    """The imputation of a run, checkpointed every ``output.checkpoint_every`` iterations to
    ``checkpoint``; when that holds the state of an earlier, killed run of the same job, the
    chains resume from it and the result equals an uninterrupted run."""
    from dmice.api import run

    return run(ddf, job.imputation.to_config(), checkpoint=checkpoint,
               checkpoint_every=job.output.checkpoint_every,
               storage_options=job.output.storage_options, client=client, progress="log")


def _compute_and_write(job: JobSpec, info: InputInfo, run_id: str, prefix: str) -> dict[str, Any]:
    """Impute, write every file below ``prefix`` and return the run's manifest."""
    from dmice.runtime import cluster as _cluster

    url, so = job.output.url, job.output.storage_options
    snapshot = store.snapshot_input(job.input.url, job.input.format, job.input.storage_options)
    if [(f["path"], f["bytes"]) for f in snapshot["files"]] != [(f["path"], f["bytes"]) for f in info.files]:
        raise InputError("input.url: the input changed while it was being read; try again")
    ddf = _read_input(job, snapshot, info.meta)
    client, cluster = _cluster.get_client(job.cluster.address, job.cluster.n_workers)
    own_client = cluster is not None or job.cluster.address is not None
    try:
        with impute_step(job, ddf, client, checkpoint_url(job)) as imp:
            rows = imp.schema.partition_rows
            offsets = [sum(rows[:i]) for i in range(len(rows))]
            for f, n, o in zip(snapshot["files"], rows, offsets):
                f["rows"], f["offset"] = n, o
            files, diag = imp.write_data(url, storage_options=so, prefix=prefix,
                                         layout=job.output.layout, row_offsets=offsets)
            aux = [diag] + imp.state_files
            analyses = []
            for i, a in enumerate(job.analysis):
                entry, written = _analysis(imp, a, i, url, so, prefix, client)
                analyses.append(entry)
                aux += written
            manifest = imp.manifest_dict(files, ddf.npartitions)
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    config = job.config()
    if "collapse" in config["imputation"]:  # as in parameters: no level seen fewer than min_cell_count times
        config["imputation"]["collapse"] = manifest["parameters"].get("collapse") or {}
    manifest.update({
        "layout": job.output.layout, "run_id": run_id, "data_prefix": prefix,
        "aux_files": aux, "analysis": analyses,
        "input_snapshot": snapshot,
        "input_dtypes": {str(c): str(t) for c, t in info.meta.dtypes.items()},
        "job": {"config_hash": job.config_hash(), "section_hashes": job.section_hashes(),
                "config": config},
    })
    return manifest


def _analysis(imp: Any, spec: AnalysisSpec, i: int, url: str, so: dict[str, Any], prefix: str,
              client: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from dmice.analysis import analyze

    res = analyze(imp, spec.formula, family=spec.family, link=spec.link, weights=spec.weights,
                  offset=spec.offset, cov_type=spec.cov_type, client=client)
    table = pooled_table(res)
    name = spec.name or f"analysis_{i}"
    fs, root = store.filesystem(url, so)
    base = posixpath.join(prefix, store.ANALYSIS, name)
    body = {"formula": spec.formula, "family": spec.family, "m": res.m, "nobs": res.nobs,
            "dfcom": res.dfcom, "table": table.to_dict(orient="records")}
    csv_info = store.put_bytes(fs, posixpath.join(root, base + ".csv"), table.to_csv(index=False).encode())
    json_info = store.put_bytes(fs, posixpath.join(root, base + ".json"),
                                json.dumps(body, indent=1, default=float).encode())
    files = [{"path": base + ".csv", **csv_info}, {"path": base + ".json", **json_info}]
    return {"name": name, "formula": spec.formula, "family": spec.family,
            "csv": base + ".csv", "json": base + ".json"}, files


def pooled_table(res: Any) -> Any:
    """The pooled table with confidence intervals and Rubin's-rules columns."""
    table = res.summary(conf_int=True)
    pooled = res.pooled
    return table.merge(pooled.drop(columns=[c for c in table.columns if c != "term" and c in pooled]),
                       on="term")
