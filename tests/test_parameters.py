"""One definition of the imputation's parameters (dmice.parameters.ImputationConfig): impute()'s
signature, the job file and continuing a written output all hold to it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import dmice
from dmice import job as jobmod
from dmice.errors import InputError
from dmice.parameters import ImputationConfig, defaults, later_settings

#: impute()'s arguments that say how a run goes, not what the chains are
RUN_SETTINGS = {"data", "checkpoint", "checkpoint_every", "storage_options", "client", "progress", "_state"}


def test_impute_takes_exactly_the_parameters_with_their_defaults():
    sig = inspect.signature(dmice.impute).parameters
    assert set(sig) - RUN_SETTINGS == set(defaults())
    for name, default in defaults().items():
        assert sig[name].default == default, name


def test_the_job_file_has_the_same_parameters_and_defaults():
    fields = jobmod.ImputationSpec.model_fields
    assert set(fields) == set(defaults())
    for name, default in defaults().items():
        if name == "seed":  # required in a job file: a re-run must reproduce the output
            assert fields[name].is_required()
            continue
        got = fields[name].get_default(call_default_factory=True)
        assert (None if got in ({}, []) else got) == default, name


def test_a_job_section_becomes_the_config_impute_builds_from_the_same_arguments():
    spec = jobmod.ImputationSpec(m=3, max_iter=4, seed=7, method={"x": "norm"}, donors=3, ridge=0.01,
                                 formulas={"y": "y ~ x + z"}, by="g", delta={"x": 1.5},
                                 where={"x": "flag"}, ignore="held_out", collapse={"c": {"a": "ab"}},
                                 separation="ridge", shrinkage=2.0, min_cell_count=5, min_level_count=3)
    kwargs = spec.arguments()
    assert spec.to_config() == ImputationConfig(**kwargs)
    assert set(kwargs) == set(defaults())


def test_later_settings_are_those_the_first_job_files_lacked():
    assert set(later_settings()) == {"formulas", "passive", "substantive", "substantive_family", "by", "delta",
                                     "post", "min_level_count", "collapse", "separation", "shrinkage",
                                     "where", "ignore", "min_cell_count"}


def test_checked_names_the_parameter_and_draws_a_seed():
    for kw, name in (({"m": 0}, "m"), ({"donors": 1.5}, "donors"), ({"ridge": -1}, "ridge"),
                     ({"until_rhat": 1.0}, "until_rhat"), ({"separation": "x"}, "separation"),
                     ({"shrinkage": 0}, "shrinkage"), ({"min_cell_count": 0}, "min_cell_count"),
                     ({"m": True}, "m"), ({"seed": -1}, "seed")):
        with pytest.raises(InputError, match=name):
            ImputationConfig(**kw).checked()
    c = ImputationConfig().checked()
    assert isinstance(c.seed, int) and c.seed >= 0 and c.m == 5
    assert ImputationConfig(seed=3).checked().seed == 3


def test_a_recorded_config_reads_back_to_itself():
    cfg = ImputationConfig(m=2, max_iter=3, seed=9, method={"x": "pmm"}, visit_sequence=["x", "y"],
                           donor_pool=100, formulas={"y": "y ~ x"}, by="g", where={"x": "flag"},
                           ignore="held_out", delta={"x": 1.0}, collapse={"c": {"a": "ab"}},
                           separation="ridge", shrinkage=None, min_level_count=4).checked()
    rec = cfg.record({}, {"y": "x"})
    assert rec["where"] == {"columns": {"x": "flag"}} and rec["ignore"] == {"column": "held_out"}
    back = ImputationConfig.from_record({**rec, "min_cell_count": cfg.min_cell_count}, "out/")
    assert back.record({}, {"y": "x"}) == rec
    # all but the settings that do not change the chains (None and {} both mean none)
    def same(a, b):
        return a == b or (a in (None, {}) and b in (None, {}))

    assert {f.name for f in dataclasses.fields(cfg) if not same(getattr(back, f.name), getattr(cfg, f.name))} \
        == {"max_iter"}


def test_masks_and_functions_recorded_by_fingerprint_cannot_be_reapplied():
    import numpy as np

    rec = ImputationConfig(seed=1, ignore=np.zeros(4, dtype=bool), post={"x": lambda v: v}).record({}, {})
    assert isinstance(rec["ignore"], str) and isinstance(rec["post"], str)
    with pytest.raises(InputError, match=r"\['ignore', 'post'\]"):
        ImputationConfig.from_record(rec, "out/")
