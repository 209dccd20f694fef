"""Run configs: typed values from YAML and overrides, and every mistake named by its key or file."""

from __future__ import annotations

import pytest
from conftest import REPO

from data_service.errors import ConfigError
from pretrain.run.config import RunConfig, from_dict, load_config


def test_defaults_and_every_shipped_config_round_trip():
    for cfg in (RunConfig(), *(load_config(p) for p in (REPO / "configs").glob("*.yaml") if p.name != "real_recordings.yaml")):
        assert from_dict(cfg.to_dict()) == cfg
    real = load_config(REPO / "configs" / "real.yaml")  # the single-session recipe (docs/model.md)
    assert not real.data.augment.unit_dropout and real.train.optim.algo == "lamb"
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.train.warm_start.method == "ridge" and demo.model_overrides["locality"] == 6.0


def test_a_corpus_named_by_an_override_is_never_made_synthetically():
    demo = REPO / "configs" / "demo.yaml"
    assert load_config(demo).data.synth is not None  # the embedded default makes its corpus
    assert load_config(demo, ["data.corpus=/data/typo"]).data.synth is None  # a named one must exist
    both = load_config(demo, ["data.corpus=/data/new", "data.synth.sessions=3"])
    assert both.data.synth is not None and both.data.synth.sessions == 3  # unless asked for


def test_overrides_are_typed_yaml_values():
    cfg = load_config(None, ["train.optim.lr=3e-3", "train.steps=12", "data.augment.time_scaling=[0.9, 1.1]",
                             "data.sessions=[a, b]", "cluster.address=auto", "model_overrides.locality=6"])
    assert cfg.train.optim.lr == 0.003 and isinstance(cfg.train.optim.lr, float)  # YAML reads 3e-3 as a string
    assert cfg.train.steps == 12 and cfg.data.augment.time_scaling == (0.9, 1.1)
    assert cfg.data.sessions == ["a", "b"] and cfg.cluster.address == "auto"
    assert cfg.model_config().locality == 6


@pytest.mark.parametrize("overrides,match", [
    (["train.stepz=5"], r"override 'train.stepz=5': train.stepz: unknown key"),
    (["trainsteps"], r"override 'trainsteps' must look like key.sub=value"),
    (["train.steps=many"], r"override 'train.steps=many': train.steps: expected int"),
    (["train.steps.x=1"], r"train.steps is a value, not a section"),
    (["model=poyo-9M"], r"model: unknown model preset 'poyo-9M'"),
    (["model_overrides.dimm=3"], r"model_overrides.dimm: not a model setting"),
    (["train.warm_start.method=pca"], r"train.warm_start: warm_start.method must be none or ridge"),
    (["data.readouts=velocity"], r"data.readouts: expected a mapping"),
    (["data.sessions=s1"], r"data.sessions: expected a list"),
    (["train.optim.trust=layer"], r"train.optim.trust: must be group or tensor"),
    (["train.optim.algo=sgd"], r"train.optim.algo: must be adamw or lamb"),
    (["train.steps=[1"], r"override 'train.steps=\[1': the value is not valid YAML"),
])
def test_bad_overrides_name_the_override_and_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_config_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config .*missing.yaml: No such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 5\n")
    with pytest.raises(ConfigError, match=r"config .*bad.yaml: train.stepz: unknown key"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"config .*bad.yaml is not valid YAML"):
        load_config(bad)


def test_an_elastic_run_is_refused_optimizer_state_it_could_not_resume_at_another_size():
    """ZeRO (stage >= 1) and bf16 partition the optimizer state by the number of workers, which
    DeepSpeed cannot load at another: an elastic run must keep it whole (fp32, or bf16-mixed: fp32
    state, a bf16 forward; `auto` picks that on GPUs). Settings that need each other may come in any
    order."""
    from pretrain.run.config import precision

    ok = load_config(None, ["cluster.min_workers=1", "cluster.num_workers=3", "train.zero_stage=0"])
    assert (ok.cluster.min_workers, ok.cluster.num_workers) == (1, 3)
    assert precision(ok, use_gpu=False) == "fp32" and precision(ok, use_gpu=True) == "bf16-mixed"
    gpu = load_config(None, ["cluster.min_workers=1", "cluster.num_workers=3", "train.zero_stage=0", "cluster.use_gpu=true"])
    assert precision(gpu, use_gpu=True) == "bf16-mixed"
    fixed = load_config(None, ["cluster.use_gpu=true"])
    assert precision(fixed, use_gpu=True) == "bf16" and precision(fixed, use_gpu=False) == "fp32"
    mixed = load_config(None, ["cluster.min_workers=1", "cluster.num_workers=3", "train.zero_stage=0",
                               "train.precision=bf16-mixed"])
    assert precision(mixed, use_gpu=True) == "bf16-mixed"
    for bad, match in [(["train.zero_stage=1"], "zero_stage=0"),
                       (["train.zero_stage=0", "train.precision=bf16"], "bf16-mixed or fp32"),
                       (["train.zero_stage=0", "cluster.min_workers=4"], "at most cluster.num_workers")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["cluster.min_workers=1", "cluster.num_workers=3", *bad])
    with pytest.raises(ConfigError, match="at most data.global_batch"):
        load_config(None, ["data.global_batch=4", "cluster.num_workers=5"])


def test_lamb_per_tensor_trust_is_refused_flat_optimizer_slices():
    """Per-tensor LAMB needs the tensors; ZeRO (stage >= 1) and the bf16 optimizer hand it flat slices."""
    lamb = ["train.optim.algo=lamb", "train.optim.trust=tensor"]
    assert load_config(None, [*lamb, "train.zero_stage=0", "train.precision=fp32"]).train.optim.trust == "tensor"
    for bad in (["train.zero_stage=1"], ["train.zero_stage=0", "train.precision=bf16"]):
        with pytest.raises(ConfigError, match="train.optim.trust: .*zero_stage=0"):
            load_config(None, [*lamb, *bad])
    assert load_config(None, ["train.optim.algo=lamb"]).train.optim.trust == "group"  # any stage
