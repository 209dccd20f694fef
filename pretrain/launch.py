"""`popscale pretrain`: the driver. Makes the corpus if needed, starts (or joins) Ray, opens the
MLflow run, runs the Ray Train job with a live progress bar, then exports the final weights
(safetensors + config + vocabularies) and registers them in MLflow under an alias.

A run is named `<config name>-<timestamp>`; `resume=<that name>` continues it from its last
checkpoint (same Ray storage, same MLflow run).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .run_config import RunConfig

RUN_FILE = "popscale_run.json"


@dataclass
class PretrainResult:
    name: str
    valid_r2: float
    steps: int
    model_uri: str
    model_version: str
    mlflow_run_id: str
    tracking_uri: str
    seconds: float
    checkpoint: str


def ensure_corpus(run: RunConfig) -> None:
    from data_service.synth import synth_corpus

    if (Path(run.data.corpus) / "manifest.json").exists():
        return
    if run.data.synth is None:
        raise FileNotFoundError(f"no corpus at {run.data.corpus} and no `data.synth` config to make one")
    synth_corpus(run.data.synth, run.data.corpus, workers=os.cpu_count() or 1)


def init_ray(run: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if not run.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    os.environ.update(env)
    if run.cluster.address:
        ray.init(address=run.cluster.address, runtime_env={"env_vars": env}, log_to_driver=True)
        return
    # Logical CPUs above the physical count: training workers take one CPU each and Ray Data's
    # actors must still be schedulable, or Ray waits forever (the 2-core hang).
    cpus = run.cluster.local_cpus or max(4, 2 * (os.cpu_count() or 1))
    # Worker logs stay in Ray's session directory unless asked for: the progress bar is the display.
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env={"env_vars": env}, object_store_memory=1 << 30,
             log_to_driver=bool(os.environ.get("POPSCALE_RAY_LOGS")), configure_logging=True, logging_level="WARNING")


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self) -> None:
            self.step, self.metrics = 0, {}

        def update(self, step: int, metrics: dict) -> None:
            self.step, self.metrics = step, dict(metrics)

        def get(self) -> tuple[int, dict]:
            return self.step, self.metrics

    return Progress.remote()


def _fit_with_progress(trainer, progress, total: int, show: bool):
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    out: dict = {}

    def fit() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver thread below
            out["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    with Progress(TextColumn("pretraining"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not show) as bar:
        task = bar.add_task("", total=total, info="starting workers")
        while thread.is_alive():
            thread.join(timeout=2.0)
            try:
                step, m = ray.get(progress.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort
                continue
            info = f"loss {m['train_loss']:.3f}" if "train_loss" in m else "starting workers"
            if "samples_per_s" in m:
                info += f"  {m['samples_per_s']:.1f} samples/s"
            if "valid_r2" in m:
                info += f"  valid R2 {m['valid_r2']:.3f}"
            bar.update(task, completed=step, info=info)
    if "error" in out:
        raise out["error"]
    return out["result"]


def export_checkpoint(run: RunConfig, checkpoint_dir: str, out: Path, provenance: dict) -> Path:
    """Consolidate a DeepSpeed checkpoint into fp32 weights and export them (registry format)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .model import POYO
    from .registry import export_model
    from .train import STATE_FILE, tokenizer_config, vocabulary

    state = json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())
    units = vocabulary(run, state["sessions"])
    model = POYO(run.model_config(), units, state["sessions"])
    weights = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=state["tag"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return export_model(model, tokenizer_config(run), out, {**provenance, "step": state["step"]})


def test_hooks() -> dict:
    """Fault-injection and window-recording hooks for the workers, from the driver's environment:
    POPSCALE_TRAIN_FAULT="<rank>:<step>:<marker>" kills that worker once; POPSCALE_RECORD_WINDOWS=<dir>
    records each consumed window's stream position."""
    env = {"fault": "POPSCALE_TRAIN_FAULT", "record_windows": "POPSCALE_RECORD_WINDOWS"}
    return {k: os.environ[v] for k, v in env.items() if os.environ.get(v)}


def pretrain(run: RunConfig, *, resume: str | None = None, show_progress: bool = True,
             hooks: dict | None = None) -> PretrainResult:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .registry import register
    from .tracking import start_run, tracking_uri
    from .train import train_loop, training_sessions, vocabulary

    t0 = time.time()
    # Workers run in their own directories: every path they see must be absolute.
    run.data.corpus = str(Path(run.data.corpus).resolve())
    run.tracking.uri = tracking_uri(run.tracking)
    ensure_corpus(run)
    storage = Path(run.cluster.storage_path).resolve()
    name = resume or f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    meta_file = storage / name / RUN_FILE
    if resume:
        if not meta_file.exists():
            raise FileNotFoundError(f"no run {resume!r} under {storage} to resume")
        meta = json.loads(meta_file.read_text())
    else:
        meta = {}
    from data_service.reader import open_corpus

    corpus = open_corpus(run.data.corpus)
    sessions = meta.get("sessions") or training_sessions(run)
    units = vocabulary(run, sessions)
    valid = [s for s in sessions if len(corpus.session(s).intervals.get("valid", []))]
    valid = valid[: run.train.eval_sessions] if run.train.eval_sessions else valid
    from .train import index_fingerprint

    fingerprint = index_fingerprint(run, sessions)
    if meta and meta.get("index_fingerprint") not in (None, fingerprint):
        raise ValueError(f"cannot resume {name}: its data (corpus {run.data.corpus} or the data config) changed since "
                         f"it started (window-index fingerprint {meta['index_fingerprint']} -> {fingerprint}); "
                         "the window order would not continue where it stopped")
    init_ray(run)
    if not meta:
        from .flops import forward_flops, parameters

        mcfg = run.model_config()
        tags = {"corpus": str(Path(run.data.corpus).resolve()), "corpus_fingerprint": corpus.fingerprint,
                "ray_run": name, "n_sessions": str(len(sessions)), "n_units": str(len(units)),
                "n_params": str(parameters(mcfg)), "train_gflops_per_sample_2k_spikes": f"{3 * forward_flops(mcfg, 2000, 100) / 1e9:.2f}"}
        meta = {"name": name, "mlflow_run_id": start_run(run, tags), "sessions": sessions,
                "index_fingerprint": fingerprint}
        meta_file.parent.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(meta))
    warm = None
    if run.train.warm_start.method == "ridge":  # deterministic: recomputed on resume, used only at init
        from .warm_start import unit_directions

        warm = unit_directions(corpus, sessions, run.data.readouts, run.model_config().readouts, run.data.target_scale,
                               run.train.warm_start, progress=show_progress)
    progress = _progress_actor()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"run": run.to_dict(), "sessions": sessions, "units": units, "valid_sessions": valid,
                           "warm_start": warm,
                           "mlflow_run_id": meta["mlflow_run_id"], "progress": progress,
                           "hooks": {**(test_hooks() if hooks is None else hooks), "run_dir": str(storage / name)}},
        torch_config=TorchConfig(backend="nccl" if run.cluster.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=run.cluster.num_workers, use_gpu=run.cluster.use_gpu,
                                               resources_per_worker={"CPU": run.cluster.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=run.train.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = _fit_with_progress(trainer, progress, run.train.stop_at or run.train.steps, show_progress)
        error = result.error
    except Exception as e:  # noqa: BLE001 - Ray Train raises worker errors from fit()
        error = e
    if error:
        raise RuntimeError(f"pretraining run {name} failed (resume it with --resume {name}): {error}") from error
    metrics = result.metrics or {}
    uri = tracking_uri(run.tracking)
    version, model_uri = "", ""
    stopped_early = run.train.stop_at is not None and run.train.stop_at < run.train.steps
    with result.checkpoint.as_directory() as d:
        if not stopped_early:
            export = export_checkpoint(run, d, storage / name / "export",
                                       {"mlflow_run_id": meta["mlflow_run_id"], "ray_run": name,
                                        "corpus_fingerprint": corpus.fingerprint})
            version, model_uri = register(uri, meta["mlflow_run_id"], export, run.tracking.registered_model,
                                          run.tracking.alias)
    return PretrainResult(name=name, valid_r2=float(metrics.get("valid_r2", float("nan"))),
                          steps=int(metrics.get("step", 0)), model_uri=model_uri, model_version=version,
                          mlflow_run_id=meta["mlflow_run_id"], tracking_uri=uri, seconds=time.time() - t0,
                          checkpoint=result.checkpoint.path)
