"""What users had before pretrain/ was split into sub-packages (issue 26) still works: a run
checkpointed by the old layout resumes where it stopped and ends as an uninterrupted run does, and
a version registered with the old pyfunc module (MLflow copied it into the model, and it imports
`pretrain.registry` and `pretrain.batch`) loads and predicts. The fixtures in
tests/fixtures/before-issue26/ were written by the code before the move (commit 7cf8649)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import packed, random_samples

from data_service.synth import SynthConfig, synth_corpus
from pretrain.run.config import load_config
from pretrain.run.plan import build_plan
from pretrain.run.sinks import MemorySink
from pretrain.run.train import train_in_process

FIX = Path(__file__).parent / "fixtures" / "before-issue26"
TINY = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 1, "self_heads": 2, "latents_per_step": 4}


def _plan(corpus: Path):
    """The run the fixture's checkpoint was taken from (4 steps, stopped after 2)."""
    cfg = load_config(None, [f"data.corpus={corpus}", "data.global_batch=4", "data.loader=local", "train.steps=4",
                             "train.eval_every=4", "train.checkpoint_every=2", "train.warmup_steps=1",
                             "train.log_every=1", "cluster.cpus_per_worker=1"])
    cfg.model_overrides = dict(TINY)
    return build_plan(cfg)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_a_run_checkpointed_before_the_move_resumes(tmp_path):
    synth_corpus(SynthConfig(sessions=2, subjects=1, minutes=1.0, min_units=10, max_units=15, seed=5),
                 tmp_path / "corpus")
    old = tmp_path / "old"
    shutil.copytree(FIX / "checkpoint", old / "step0000002")
    assert json.loads((old / "step0000002" / "popscale_state.json").read_text())["step"] == 2
    sink = MemorySink()
    resumed = train_in_process(_plan(tmp_path / "corpus"), old, sink=sink)
    assert [s for s, _ in sink.series("train_loss")] == [3, 4]  # continued from step 2, not restarted
    fresh = train_in_process(_plan(tmp_path / "corpus"), tmp_path / "fresh")
    a, b = _weights(resumed.model), _weights(fresh.model)
    # the fixture's first two steps ran on another machine, whose float rounding (SIMD width) can differ:
    # ~3e-5 on a 2026-12-05 host after two more steps, well below one AdamW step (lr 1e-3 an element); a restart
    # shows in the steps logged above
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4) for k in a)


def test_a_version_registered_with_the_old_pyfunc_loads_and_predicts(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from pretrain.model.config import ModelConfig
    from pretrain.model.poyo import POYO
    from pretrain.tokens.tokenizer import TokenizerConfig
    from pretrain.tracking.export import export_model

    cfg = ModelConfig(**TINY)
    torch.manual_seed(0)
    model = POYO(cfg, [f"u{i}" for i in range(30)], ["s0", "s1", "s2"])
    tok = TokenizerConfig.build(cfg, window_s=1.0, behaviours={"velocity": ["hand_vel"]})
    export = export_model(model, tok, tmp_path / "export")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(FIX / "mlflow_pyfunc.py"),
                                       artifacts={"model": str(export)}, pip_requirements=["popscale"])
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    batch = packed(random_samples(3, np.random.default_rng(0)))
    got = loaded.predict(batch)
    with torch.no_grad():
        want = model.eval()(batch)
    assert got.keys() == want.keys() and all(np.allclose(got[k], want[k].numpy(), atol=1e-6) for k in got)
