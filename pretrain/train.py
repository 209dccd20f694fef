"""Pretraining: Ray Train workers running a DeepSpeed engine on batches from the data service.

Each worker builds the same model (vocabularies = every unit and session of the training
corpus, in a fixed order), wraps it in DeepSpeed (ZeRO stage 1/2; fp32 + gloo on CPU, bf16 +
NCCL on GPU) and consumes its share of every global batch from the data service. The loss is
the weighted MSE normalised by the weight summed over *all* workers, so the gradient is the same
whatever the number of workers. Every `checkpoint_every` steps all workers save the DeepSpeed
state into one Ray checkpoint together with the data-service state (batches consumed + index
fingerprint) and the run config; Ray's FailureConfig restarts a failed worker group from it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_service.reader import open_corpus
from data_service.service import LocalBatches, RayBatches, ServiceSpec
from data_service.window_index import IndexConfig

from .batch import from_numpy
from .evaluate import evaluate, plot_session
from .loss import weighted_mse
from .model import POYO
from .optim import build_optimizer
from .run_config import RunConfig, from_dict
from .tokenizer import Tokenizer, TokenizerConfig

STATE_FILE = "popscale_state.json"


# ---- pieces shared by driver and workers ------------------------------------------------------------
def tokenizer_config(run: RunConfig) -> TokenizerConfig:
    m = run.model_config()
    return TokenizerConfig(window=run.data.window_s, latent_step=m.latent_step, latents_per_step=m.latents_per_step,
                           readouts=run.data.readouts, target_scale=run.data.target_scale,
                           interval_weights=run.data.interval_weights)


def training_sessions(run: RunConfig) -> list[str]:
    """The configured sessions, else every session that has a behaviour some readout decodes."""
    corpus = open_corpus(run.data.corpus)
    if run.data.sessions is not None:
        return list(run.data.sessions)
    wanted = {b for names in run.data.readouts.values() for b in names}
    return [s for s in corpus.session_ids if wanted & set(corpus.rows[s]["behaviours"])]


def vocabulary(run: RunConfig, sessions: list[str]) -> list[str]:
    corpus = open_corpus(run.data.corpus)
    return [u for s in sessions for u in corpus.session(s).unit_ids.tolist()]


def index_config(run: RunConfig, sessions: list[str]) -> IndexConfig:
    return IndexConfig(window_s=run.data.window_s, split="train", seed=run.data.seed,
                       session_weights=run.data.session_weights, sessions=sessions)


def service_spec(run: RunConfig, model: POYO, sessions: list[str]) -> ServiceSpec:
    tok = Tokenizer(tokenizer_config(run), model.unit_emb.frozen(), model.session_emb.frozen(), model.cfg.readouts)
    index = index_config(run, sessions)
    return ServiceSpec(corpus=run.data.corpus, index=index, tokenizer=tok, global_batch=run.data.global_batch,
                       seed=run.data.seed, augment=run.data.augment)


def index_fingerprint(run: RunConfig, sessions: list[str]) -> str:
    """What a checkpoint's data position is relative to (corpus + index config)."""
    from data_service.service import index_for

    return index_for(run.data.corpus, index_config(run, sessions)).fingerprint


def lr_factor(step: int, run: RunConfig) -> float:
    """Linear warmup, then cosine decay to `final_lr_ratio` at the last step."""
    t = run.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.final_lr_ratio + (1 - t.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(run: RunConfig, world: int, bf16: bool) -> dict:
    t = run.train
    return {
        "train_batch_size": run.data.global_batch * t.grad_accum,
        "train_micro_batch_size_per_gpu": max(1, run.data.global_batch // world),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _skip_cpu_shm_kernel() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce kernel on first use on CPU (~33 s here)
    and documents that it hangs on CPUs without AVX2/AVX-512; gloo's all-reduce is plenty for one
    node of CPU workers, so popscale uses that."""
    import deepspeed.comm.torch as ds_torch

    ds_torch.build_shm_op = lambda: None


def _await_registered_checkpoint(run_dir: str | None, step: int, timeout_s: float = 120.0) -> None:
    """Ray Train learns of a reported checkpoint when its controller next polls the workers
    (every 2 s); a crash before that loses it. The fault hook waits until the controller has
    recorded the last checkpoint, so a test knows which step the restart must resume from."""
    if not run_dir or step == 0:
        return
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("step") == step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"Ray Train did not register the step-{step} checkpoint in {timeout_s:.0f} s")


def _fault(hooks: dict, rank: int, step: int, last_checkpoint_step: int) -> None:
    """Test hook `fault` = "<rank>:<step>:<marker file>": SIGKILLs that worker once, before that step."""
    spec = hooks.get("fault")
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if int(r) == rank and int(s) == step and not os.path.exists(marker):
        _await_registered_checkpoint(hooks.get("run_dir"), last_checkpoint_step)
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def _record(hooks: dict, rank: int, step: int, positions: np.ndarray) -> None:
    """Test hook `record_windows` = <dir>: appends every consumed window's stream position."""
    d = hooks.get("record_windows")
    if d:
        with open(Path(d) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": step, "positions": positions.tolist()}) + "\n")


# ---- the worker loop -------------------------------------------------------------------------------------
def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist

    run = from_dict(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = run.cluster.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
    bf16 = run.train.precision == "bf16" or (run.train.precision == "auto" and use_gpu)
    if not use_gpu:
        torch.set_num_threads(max(1, int(run.cluster.cpus_per_worker)))
        _skip_cpu_shm_kernel()
    torch.manual_seed(run.train.seed)

    sessions, units = config["sessions"], config["units"]
    model = POYO(run.model_config(), units, sessions, device=device)
    if config.get("warm_start") is not None:
        from .warm_start import apply_warm_start

        apply_warm_start(model, config["warm_start"])
    spec = service_spec(run, model, sessions)
    optimizer = build_optimizer(model, run.train.optim)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(run, world, bf16),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, run)))

    from data_service.service import window_index

    fingerprint = window_index(spec).fingerprint
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            if state["index_fingerprint"] != fingerprint:
                raise RuntimeError(f"checkpoint was taken on data with index fingerprint {state['index_fingerprint']}, "
                                   f"this run's is {fingerprint}: corpus or data config changed, refusing to resume")
            engine.load_checkpoint(d, tag=state["tag"])
            start = state["step"]

    logger = None
    if rank == 0 and config.get("mlflow_run_id"):
        from .tracking import MetricLogger

        logger = MetricLogger(run.tracking, config["mlflow_run_id"])
    progress = config.get("progress")
    hooks = config.get("hooks") or {}
    accum, steps = run.train.grad_accum, run.train.stop_at or run.train.steps
    if run.data.loader == "ray":
        loader = RayBatches(spec, rank, world, actors=run.data.data_actors, prefetch=run.data.prefetch,
                            buffer_mb=run.data.buffer_mb)
    else:
        loader = LocalBatches(spec, rank, world)
    batches = loader.iterate(start * accum, steps * accum)
    eval_ids = config["valid_sessions"][rank::world]
    window_loss = window_weight = window_tokens = 0.0
    window_t = time.perf_counter()
    last_metrics: dict = {}

    def all_sum(*values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    last_checkpoint = logged_at = start
    for step in range(start, steps):
        _fault(hooks, rank, step, last_checkpoint)
        # dropout masks are a function of (seed, step, rank), so a resumed run draws what an
        # uninterrupted one would have (DeepSpeed checkpoints do not hold RNG state)
        torch.manual_seed(run.train.seed * 1_000_003 + step * 1_009 + rank)
        engine.train()
        for _ in range(accum):
            d = next(batches)
            _record(hooks, rank, step, d["positions"])
            b = from_numpy(d).to(device)
            (wsum,) = all_sum(float(b.weight.sum()))
            preds = engine(b)
            loss, _ = weighted_mse(preds, b, model.readout_names)
            local_w = float(b.weight.sum())
            # normalise by the weight of the whole global batch: DeepSpeed averages gradients over workers
            engine.backward(loss * (local_w / max(wsum, 1e-12)) * world)
            engine.step()
            window_loss += float(loss) * local_w
            window_weight += local_w
            window_tokens += float((b.token_type == 0).sum())
        done = step + 1
        if done % run.train.log_every == 0 or done == steps:
            wl, ww, wt = all_sum(window_loss, window_weight, window_tokens)
            dt = time.perf_counter() - window_t
            train_metrics = {"train_loss": wl / max(ww, 1e-12), "lr": scheduler.get_last_lr()[0],
                             "samples_per_s": (done - logged_at) * accum * run.data.global_batch / dt,
                             "spike_tokens_per_s": wt / dt}
            last_metrics.update(train_metrics)
            logged_at = done
            if logger:
                logger.log(train_metrics, done)
                logger.flush()
            if progress is not None and rank == 0:
                progress.update.remote(done, last_metrics)
            window_loss = window_weight = window_tokens = 0.0
            window_t = time.perf_counter()
        paused = time.perf_counter()
        if done % run.train.eval_every == 0 or done == steps:
            results = evaluate(engine.module, spec.tokenizer, open_corpus(run.data.corpus), eval_ids, device=device)
            gathered = [None] * world
            if world > 1:
                dist.all_gather_object(gathered, {k: v.r2 for k, v in results.items()})
            else:
                gathered = [{k: v.r2 for k, v in results.items()}]
            per_session = {k: v for g in gathered for k, v in g.items()}
            last_metrics["valid_r2"] = float(np.mean(list(per_session.values()))) if per_session else float("nan")
            if logger:
                logger.log({"valid_r2": last_metrics["valid_r2"],
                            **{f"valid_r2.{k}": v for k, v in per_session.items()}}, done)
                logger.flush()
                if results:
                    first = results[sorted(results)[0]]
                    with tempfile.TemporaryDirectory() as tmp:
                        logger.artifact(plot_session(first, f"{tmp}/decoded_vs_true_step{done:06d}.png"), "plots")
            if progress is not None and rank == 0:
                progress.update.remote(done, last_metrics)
            window_t += time.perf_counter() - paused  # evaluation time is not training throughput
        paused = time.perf_counter()
        if done % run.train.checkpoint_every == 0 or done == steps:
            with tempfile.TemporaryDirectory() as tmp:
                tag = f"step{done:07d}"
                engine.save_checkpoint(tmp, tag=tag)
                if rank == 0:
                    (Path(tmp) / STATE_FILE).write_text(json.dumps({
                        "step": done, "tag": tag, "batches_consumed": done * accum,
                        "samples_consumed": done * accum * run.data.global_batch,
                        "index_fingerprint": fingerprint, "run": config["run"],
                        "sessions": sessions, "valid_sessions": config["valid_sessions"]}))
                if world > 1:
                    dist.barrier()
                ray.train.report({**last_metrics, "step": done}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            last_checkpoint = done
            window_t += time.perf_counter() - paused  # nor is checkpointing
