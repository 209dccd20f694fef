"""The training loop run in this process (in-process data service, DeepSpeed on a one-rank gloo
group, metrics in memory; no Ray): what it logs, evaluates and checkpoints, that a stop and a
resume from its checkpoints equals an uninterrupted run, and that hooks see every step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

from data_service.synth import SynthConfig, synth_corpus  # noqa: E402
from pretrain.run.checkpoint import read_state  # noqa: E402
from pretrain.run.config import load_config  # noqa: E402
from pretrain.run.export import export_checkpoint  # noqa: E402
from pretrain.run.hooks import FaultAndRecord, LoopHooks  # noqa: E402
from pretrain.run.plan import RunPlan, build_plan  # noqa: E402
from pretrain.run.sinks import MemorySink  # noqa: E402
from pretrain.run.train import train_in_process  # noqa: E402
from pretrain.tracking.export import load_exported

TINY = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 1, "self_heads": 2, "latents_per_step": 4}
STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop") / "corpus"
    synth_corpus(SynthConfig(sessions=2, subjects=1, minutes=1.0, min_units=20, max_units=40, seed=9), root)
    return root


def plan_for(corpus, *overrides) -> RunPlan:
    cfg = load_config(None, [f"data.corpus={corpus}", "data.global_batch=4", "data.loader=local",
                             f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=2",
                             "train.checkpoint_every=2", "train.warmup_steps=1", "cluster.cpus_per_worker=1",
                             *overrides])
    cfg.model_overrides = dict(TINY)
    return build_plan(cfg)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_loop_logs_evaluates_and_checkpoints(corpus, tmp_path):
    plan, sink = plan_for(corpus), MemorySink()
    r = train_in_process(plan, tmp_path / "ckpt", sink)
    assert [s for s, _ in sink.series("train_loss")] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for _, v in sink.series("train_loss"))
    assert {"lr", "samples_per_s", "spike_tokens_per_s"} <= set(sink.history[0][1])
    assert [s for s, _ in sink.series("valid_r2")] == [2, 4]
    per_session = {k for _, m in sink.history for k in m if k.startswith("valid_r2.")}
    assert per_session == {f"valid_r2.{s}" for s in plan.valid_sessions}
    assert sink.artifacts == [("plots", "decoded_vs_true_step000002.png"), ("plots", "decoded_vs_true_step000004.png")]
    assert r.metrics["valid_r2"] == sink.series("valid_r2")[-1][1]
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept == ["step0000002", "step0000004"]  # complete checkpoints only, the newest two
    assert read_state(r.checkpoint)["step"] == STEPS and RunPlan.load(r.checkpoint) == plan
    # a checkpoint exports with nothing but itself, and the export predicts what the loop's model does
    model, tok = load_exported(export_checkpoint(r.checkpoint, tmp_path / "export", {}))
    for k, v in weights(r.model).items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    c = __import__("data_service.reader", fromlist=["open_corpus"]).open_corpus(corpus)
    s = c.session(plan.valid_sessions[0])
    b = tok.pack([(s.read_window(10.0, 11.0), s, None)]).to("cpu")
    r.model.eval()
    with torch.no_grad():
        assert torch.equal(model(b)["velocity"], r.model(b)["velocity"])


def test_stop_and_resume_in_process_equals_uninterrupted(corpus, tmp_path):
    rec_a, rec_b = tmp_path / "a", tmp_path / "b"
    rec_a.mkdir(), rec_b.mkdir()
    full = train_in_process(plan_for(corpus), tmp_path / "full", hooks=FaultAndRecord(record_windows=str(rec_a)))
    first = train_in_process(plan_for(corpus, "train.stop_at=2"), tmp_path / "part",
                             hooks=FaultAndRecord(record_windows=str(rec_b)))
    assert read_state(first.checkpoint)["step"] == 2
    sink = MemorySink()
    second = train_in_process(plan_for(corpus), tmp_path / "part", sink, FaultAndRecord(record_windows=str(rec_b)))
    assert [s for s, _ in sink.series("train_loss")] == [3, 4]  # resumed after step 2, nothing redone

    def seq(d):
        return [json.loads(line)["positions"] for line in (d / "rank0.jsonl").read_text().splitlines()]

    assert seq(rec_b) == seq(rec_a)
    a, b = weights(full.model), weights(second.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_hooks_see_every_step_and_its_batches(corpus, tmp_path):
    class Recorder(LoopHooks):
        def __init__(self):
            self.before, self.batches = [], []

        def before_step(self, rank, step, last_checkpoint):
            self.before.append((rank, step, last_checkpoint))

        def on_batches(self, rank, step, served):
            self.batches.append((step, [b.number for b in served], sum(len(b.positions) for b in served)))

    h = Recorder()
    train_in_process(plan_for(corpus, "train.grad_accum=2"), tmp_path / "ckpt", hooks=h)
    assert h.before == [(0, 0, 0), (0, 1, 0), (0, 2, 2), (0, 3, 2)]
    assert h.batches == [(s, [2 * s, 2 * s + 1], 8) for s in range(STEPS)]  # two micro-batches of 4 per step


def test_deepspeed_cpu_engine_never_compiles_the_shm_kernel():
    """DeepSpeed JIT-compiles a shared-memory all-reduce kernel for CPU (35-85 s on 2 cores);
    popscale uses gloo instead. The skip once patched the wrong module and did nothing."""
    import importlib

    from pretrain.run.engine import skip_cpu_shm_kernel

    skip_cpu_shm_kernel()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None


def test_a_worker_that_holds_the_others_up_is_named_with_its_data_wait_and_a_stall_is_counted():
    """Three workers; the meter sees its own rank's times and the all-reduce brings the others'
    (stubbed here: what ranks 0 and 2 put in their slots). Rank 1 waits 0.6 s a step for data:
    it is the slowest, the progress line says so; a group in step says nothing."""
    from pretrain.run.launch import progress_info
    from pretrain.run.loop import Dist, Meter, StepStats

    class ThreeWorkers(Dist):
        others: list[float] = []

        def all_sum(self, *values: float) -> list[float]:
            return [v + o for v, o in zip(values, self.others)]

    d = ThreeWorkers(rank=1, world=3)
    # after loss, weight, tokens: own-time slots of ranks 0..2, then data-wait slots of ranks 0..2
    d.others = [3.0, 3.0, 300.0, 0.10, 0.0, 0.12, 0.01, 0.0, 0.02]
    m = Meter(d, samples_per_step=8)
    for _ in range(2):
        m.add(StepStats(loss_x_weight=1.0, weight=2.0, spike_tokens=100, forward_s=0.05), wait_s=0.6)
    out = m.read(lr=1e-3)
    assert out["slowest_rank"] == 1 and out["own_s_max"] == pytest.approx(0.65)
    assert out["own_s_median"] == pytest.approx(0.12) and out["slowest_data_wait_s"] == pytest.approx(0.6)
    assert out["train_loss"] == pytest.approx((2.0 + 3.0) / (4.0 + 3.0))
    assert "slow: rank 1 0.65 s/step (median 0.12; 0.60 of it waiting for data)" in progress_info(out)
    assert "slow" not in progress_info({**out, "own_s_max": 0.13})
    # a wait without a new step (a restart, slots not yet reserved) is counted once it lasts
    assert "no new step" not in progress_info(out, idle_s=29.0)
    assert progress_info(out, idle_s=95.4).endswith("  no new step for 95 s")
    assert progress_info({}, idle_s=5.0) == "starting workers"
    assert progress_info({}, idle_s=140.0) == "starting workers, 140 s"


def test_the_stall_clock_counts_only_past_three_of_the_usual_gaps():
    """Rank 0 reports every log_every steps: with 20 s between reports, 50 s without one is not a
    stall yet, 61 s is; the start-up is counted from the start."""
    from pretrain.run.launch import StallClock

    c = StallClock(now=0.0)
    assert c.idle(None, 40.0) == 40.0  # nothing reported yet
    assert c.idle(0, 45.0) == 0.0 and c.idle(0, 90.0) == 45.0  # the first report at 45 s; nothing since
    assert c.idle(10, 110.0) == 0.0  # a report 65 s after the one before: the gap is 65 s (then 20 s:)
    assert c.idle(20, 130.0) == 0.0  # 20 s: the gap is now 20 s
    assert c.idle(20, 180.0) == 0.0 and c.idle(20, 191.0) == 61.0
    assert c.idle(12, 200.0) == 0.0  # a restart went back to a checkpoint: a new step all the same


def test_bf16_mixed_runs_a_bf16_forward_over_fp32_state_and_resumes(corpus, tmp_path):
    """train.precision=bf16-mixed (what an elastic run on GPUs gets): the forward's matrix products run
    in bf16 under torch.autocast while the weights and the optimizer state stay fp32, the state that
    any number of workers loads (zero stage 0); the losses follow fp32's within bf16 rounding; and a
    stop and resume equals the uninterrupted bf16-mixed run, as in fp32."""
    dtypes: list[torch.dtype] = []

    def note(module, args, out):
        if isinstance(module, torch.nn.Linear) and module.training:
            dtypes.append(out.dtype)

    mixed = ["train.precision=bf16-mixed", "train.zero_stage=0"]
    hook = torch.nn.modules.module.register_module_forward_hook(note)
    try:
        sink = MemorySink()
        full = train_in_process(plan_for(corpus, *mixed), tmp_path / "full", sink)
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # every training Linear computed in bf16
    assert all(p.dtype == torch.float32 for p in full.model.parameters())
    state = torch.load(full.checkpoint / f"step{STEPS:07d}" / "mp_rank_00_model_states.pt", weights_only=False)
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    assert moments and all(t.dtype == torch.float32 for t in moments)

    fp32 = MemorySink()
    train_in_process(plan_for(corpus, "train.precision=fp32", "train.zero_stage=0"), tmp_path / "fp32", fp32)
    got, want = [v for _, v in sink.series("train_loss")], [v for _, v in fp32.series("train_loss")]
    assert got != want  # the forward did run in another precision
    np.testing.assert_allclose(got, want, rtol=0.05)

    train_in_process(plan_for(corpus, *mixed, "train.stop_at=2"), tmp_path / "part")
    second = train_in_process(plan_for(corpus, *mixed), tmp_path / "part")
    a, b = weights(full.model), weights(second.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
