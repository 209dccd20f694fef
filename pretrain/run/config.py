"""A training run's configuration: typed dataclasses, loaded from YAML, overridden from the CLI.

    cfg = load_config("configs/demo.yaml", overrides=["train.steps=50", "cluster.num_workers=2"])

Unknown keys, unknown model presets and model overrides that are not model fields are refused
with their dotted path (`ConfigError`); the config round-trips to a dict (MLflow params, the
run plan in every checkpoint). What the config means on a corpus is the plan's (`plan.py`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from data_service.augment import AugmentConfig
from data_service.errors import ConfigError
from data_service.synth import SynthConfig

from ..model.config import ModelConfig, preset
from ..tokens.config import DEFAULT_BEHAVIOURS, DEFAULT_INTERVAL_WEIGHTS
from ..tracking.config import TrackingConfig
from .optim import TRUST, OptimConfig
from .warm_start import WarmStartConfig


@dataclass
class DataConfig:
    corpus: str = "runs/demo/corpus"
    synth: SynthConfig | None = None  # make this synthetic corpus first if `corpus` does not exist
    window_s: float = 1.0  # seconds per sample (a whole number of the model's latent steps)
    global_batch: int = 32  # windows per micro-step, over all workers
    seed: int = 0
    # readout -> behaviours it decodes (the first one a session has)
    readouts: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_BEHAVIOURS.items()})
    # readout -> continuous (default) | angular | categorical (tokenizer.Readout); its width is model_overrides.readouts
    readout_kinds: dict[str, str] = field(default_factory=dict)
    readout_columns: dict[str, str] = field(default_factory=dict)  # angular/categorical: the column to read
    # behaviour -> a fixed divisor for its targets; a behaviour not here is centred and scaled per session
    # with its own train-split statistics to an RMS of target_rms (pretrain/tokens/targets.py)
    target_scale: dict[str, float] = field(default_factory=dict)
    target_rms: float = 0.5
    interval_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_INTERVAL_WEIGHTS))
    session_weights: dict[str, float] = field(default_factory=dict)
    sessions: list[str] | None = None  # train on these (default: every session with a readout behaviour)
    # shuffle blocks of this many consecutive windows of a train interval instead of single windows: each
    # worker's batch then reads fewer sessions and chunks, but a global batch holds ~global_batch/k blocks
    # (bench/index_scale.py); 1 = off (the default order). Best at most global_batch / workers.
    block_windows: int = 1
    # the label budget of every training session (labels.py: 10%, 2m): a from-scratch reference for adaptation
    labels: str = "100%"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # ray: a pool of long-lived Ray actors per worker (data_service.actors.ActorBatches); ray-data: Ray Data,
    # one dataset after another (data_service.service.RayBatches: 0.55x the windows/s and a dip at each
    # dataset's start in the soak, bench/RESULTS.md issue 28); local: in the worker's process. Same sequence.
    loader: str = "ray"
    data_actors: int = 1  # data actors (batch builders) per training worker
    # logical CPUs each data actor asks of Ray. 0 by default: with data.loader=ray-data, Ray Data 2.60 splits every node's CPUs among
    # all live pipelines (one per worker) by integer division, so with more pipelines than a node has CPUs,
    # or after a restart while the dead pipelines' claims last (180 s), a pipeline that asks any CPU gets
    # none and never starts (runbooks/cluster.md). data_actors bounds the actors instead.
    actor_cpus: float = 0.0
    # custom Ray resources each data actor takes (e.g. {data: 1} on nodes that offer it); empty: each
    # worker's actors run on its own node when that node has room (no batch crosses the network)
    actor_resources: dict[str, float] = field(default_factory=dict)
    prefetch: int = 4  # batches buffered per worker
    # consecutive batches a data actor builds into one Ray Data block: Ray's cost a block (a task, an
    # object, its stats) is paid once per block_batches batches (RayBatches; bench/RESULTS.md, the soak)
    block_batches: int = 8
    buffer_mb: float | None = 256  # object-store memory the data pipeline of one worker may hold (None: Ray's default)
    # an unreadable window (corrupt chunk, missing shard, deleted session) stops the run naming it;
    # true drops it from its batch instead, and every window dropped is logged (the sequence changes)
    skip_bad_windows: bool = False


@dataclass
class TrainConfig:
    steps: int = 300
    grad_accum: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup_steps: int = 30
    final_lr_ratio: float = 0.1  # cosine decay to lr * this at the last step
    zero_stage: int = 1
    # auto: fp32 on CPU; on GPU bf16, or bf16-mixed for an elastic run (cluster.min_workers) | fp32 |
    # bf16: DeepSpeed's bf16 optimizer (bf16 weights, fp32 master copy partitioned by the number of workers) |
    # bf16-mixed: fp32 weights, gradients and optimizer state, the training forward in bf16 under
    # torch.autocast (the state any number of workers loads: what elastic runs use; validation in fp32)
    precision: str = "auto"
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    max_failures: int = 1
    seed: int = 0
    eval_sessions: int | None = None  # validate on at most this many sessions (default: all)
    stop_at: int | None = None  # stop (after checkpointing) at this step, as a pre-emption would; resume later
    # unit embeddings initialised from per-session linear decoders (pretrain/run/warm_start.py); none = random
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class ClusterConfig:
    address: str | None = None  # None: start an embedded local Ray; "auto" or ray://... for a cluster
    num_workers: int = 1
    # elastic scaling: > 0 lets Ray Train run between min_workers and num_workers workers, going on with
    # the survivors when a node is lost (every global batch still whole; runbooks/cluster.md). It needs
    # optimizer state that does not depend on the world size: train.zero_stage 0 and fp32. 0: fixed
    min_workers: int = 0
    cpus_per_worker: float = 1.0
    # custom Ray resources each training worker takes: {trainer: 1} with nodes that offer trainer: 1
    # puts at most one worker on each of them (runbooks/cluster.md)
    worker_resources: dict[str, float] = field(default_factory=dict)
    use_gpu: bool = False
    local_cpus: int | None = None  # logical CPUs of the embedded Ray (default: 2 x cores, so data tasks fit)
    storage_path: str = "runs/ray"


@dataclass
class RunConfig:
    name: str = "pretrain"
    model: str = "poyo-1.3M"
    model_overrides: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def model_config(self) -> ModelConfig:
        return preset(self.model, **self.model_overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, data, path: str):
    """Recursively turn plain data into the annotated dataclass type, refusing unknown keys."""
    if data is None:
        optional = typing.get_origin(cls) in (typing.Union, types.UnionType) and type(None) in typing.get_args(cls)
        if optional or cls is typing.Any or not path:
            return None
        raise ConfigError(f"{path}: expected {getattr(cls, '__name__', cls)}, got null (an empty value)")
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{path + '.' if path else ''}{unknown[0]}: unknown key (known: {sorted(names)})")
        kw = {k: _build(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
        try:
            return cls(**kw)
        except ConfigError:
            raise
        except ValueError as e:  # a dataclass's own check (__post_init__)
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    origin = typing.get_origin(cls)
    if (origin is dict or cls is dict) and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    if (origin is list or cls is list) and not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list, got {data!r}")
    if origin is dict and len(typing.get_args(cls)) == 2:  # each value typed too: a bad one is named by its key
        return {k: _build(typing.get_args(cls)[1], v, f"{path}.{k}") for k, v in data.items()}
    if origin is list and typing.get_args(cls):
        return [_build(typing.get_args(cls)[0], v, f"{path}[{i}]") for i, v in enumerate(data)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        return _build(args[0], data, path)
    if origin is tuple and isinstance(data, (list, tuple)):
        return tuple(data)
    if cls is str and not isinstance(data, str):
        raise ConfigError(f"{path}: expected a string, got {data!r} (quote it in YAML)")
    if cls in (int, float) and isinstance(data, bool):  # YAML's true/false are ints to Python, not to us
        raise ConfigError(f"{path}: expected {cls.__name__}, got {data!r}")
    if cls in (int, float, bool) and not isinstance(data, cls):
        if cls is float and isinstance(data, int) and not isinstance(data, bool):
            try:
                return float(data)
            except OverflowError:  # an integer of hundreds of digits
                raise ConfigError(f"{path}: {data} is too large for a float") from None
        if isinstance(data, str) and cls is not bool:
            try:
                return cls(data)  # YAML reads "3e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected {cls.__name__}, got {data!r}")
    return data


def _at_least(n):
    return (lambda v: v >= n), f"at least {n}"


LOADERS = ("ray", "ray-data", "local")  # data.loader
PRECISIONS = ("fp32", "bf16", "bf16-mixed")  # train.precision besides auto

# values a config may type correctly and still not run with: refused at load, before Ray or a corpus
_RANGES: dict[str, tuple] = {
    "data.window_s": ((lambda v: v > 0), "a positive number of seconds"),
    "data.global_batch": _at_least(1), "data.data_actors": _at_least(1),
    "data.actor_cpus": ((lambda v: v >= 0), "zero or more"), "data.prefetch": _at_least(1),
    "data.block_batches": _at_least(1),
    "data.block_windows": ((lambda v: v >= 1), "a whole number of windows >= 1 (1: no blocks)"),
    "data.target_rms": ((lambda v: v > 0), "positive"),
    "data.loader": ((lambda v: v in LOADERS), " or ".join(LOADERS)),
    "train.steps": _at_least(1), "train.grad_accum": _at_least(1), "train.warmup_steps": _at_least(0),
    "train.log_every": _at_least(1), "train.eval_every": _at_least(1), "train.checkpoint_every": _at_least(1),
    "train.max_failures": _at_least(0), "train.eval_sessions": _at_least(1), "train.stop_at": _at_least(1),
    "train.final_lr_ratio": ((lambda v: 0 <= v <= 1), "between 0 and 1"),
    "train.grad_clip": ((lambda v: v > 0), "positive"),
    "train.zero_stage": ((lambda v: v in (0, 1, 2, 3)), "0, 1, 2 or 3"),
    "train.precision": ((lambda v: v in ("auto", *PRECISIONS)), "auto, fp32, bf16 or bf16-mixed"),
    "train.optim.lr": ((lambda v: v > 0), "positive"),
    "train.optim.algo": ((lambda v: v in ("adamw", "lamb")), "adamw or lamb"),
    "train.optim.trust": ((lambda v: v in TRUST), " or ".join(TRUST)),
    "cluster.num_workers": _at_least(1), "cluster.cpus_per_worker": ((lambda v: v > 0), "positive"),
    "cluster.min_workers": _at_least(0),
    "cluster.local_cpus": _at_least(1),
}


def _check_ranges(run: RunConfig) -> None:
    for key, (ok, want) in _RANGES.items():
        v = run
        for part in key.split("."):
            v = getattr(v, part)
        if v is None:  # an optional setting left unset
            continue
        if (isinstance(v, float) and not math.isfinite(v)) or not ok(v):
            raise ConfigError(f"{key}: must be {want}, got {v!r}")


def precision(run: RunConfig, use_gpu: bool) -> str:
    """train.precision with `auto` resolved: fp32 on CPU; on GPU bf16, or bf16-mixed when the run is
    elastic (DeepSpeed's bf16 optimizer partitions its state by the number of workers)."""
    if run.train.precision != "auto":
        return run.train.precision
    if not use_gpu:
        return "fp32"
    return "bf16-mixed" if run.cluster.min_workers else "bf16"


def _check_together(run: RunConfig) -> None:
    """LAMB's per-tensor trust ratio needs whole tensors, which ZeRO and the bf16 optimizer flatten away.
    Workers share every global batch. Elastic scaling restarts the worker group at another size
    from a checkpoint: DeepSpeed 0.19 refuses ZeRO optimizer state saved at another world size, and
    its bf16 optimizer partitions its state the same way, so an elastic run keeps whole (stage 0)
    fp32 state, which any number of workers loads (fp32 or bf16-mixed)."""
    c, t = run.cluster, run.train
    bf16 = precision(run, c.use_gpu) == "bf16"
    if t.optim.algo == "lamb" and t.optim.trust == "tensor" and (t.zero_stage != 0 or bf16):
        raise ConfigError("train.optim.trust: LAMB's per-tensor trust needs the tensors, and ZeRO (train.zero_stage "
                          f"{t.zero_stage}) or the bf16 optimizer hand it flat slices: set train.zero_stage=0 and "
                          "train.precision=fp32 or bf16-mixed, or train.optim.trust=group")
    if c.num_workers > run.data.global_batch:
        raise ConfigError(f"cluster.num_workers: at most data.global_batch ({run.data.global_batch}) workers share "
                          f"a global batch, got {c.num_workers}")
    if not c.min_workers:
        return
    if c.min_workers > c.num_workers:
        raise ConfigError(f"cluster.min_workers: must be at most cluster.num_workers ({c.num_workers}), "
                          f"got {c.min_workers}")
    if t.zero_stage != 0:
        raise ConfigError(f"cluster.min_workers: an elastic run needs train.zero_stage=0 (got {t.zero_stage}): "
                          "ZeRO's partitioned optimizer state cannot be loaded at another number of workers")
    if bf16:
        raise ConfigError("cluster.min_workers: an elastic run needs train.precision=bf16-mixed or fp32: DeepSpeed's "
                          "bf16 optimizer partitions its state by the number of workers")


def from_dict(d: dict, settings_together: bool = True) -> RunConfig:
    """The config in `d`, checked; `settings_together=False` leaves out the checks across settings (one
    override of several may need another that comes after it)."""
    run = _build(RunConfig, d, "")
    _check_ranges(run)
    if settings_together:
        _check_together(run)
    try:
        run.model_config()
    except KeyError as e:
        raise ConfigError(f"model: {e.args[0]}") from None
    except TypeError:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        bad = sorted(set(run.model_overrides) - fields)
        raise ConfigError(f"model_overrides.{bad[0] if bad else '?'}: not a model setting (known: {sorted(fields)})"
                          ) from None
    return run


def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for i, k in enumerate(keys[:-1]):
        if d.get(k) is None:
            d[k] = {}
        if not isinstance(d[k], dict):
            raise ConfigError(f"{'.'.join(keys[:i + 1])} is a value, not a section: {dotted} cannot be set")
        d = d[k]
    d[keys[-1]] = value


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """A YAML file's top-level mapping, or one clear ConfigError naming the file."""
    try:
        d = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not a text file (byte {e.start} is not UTF-8)") from None
    except (yaml.YAMLError, ValueError) as e:  # (PyYAML's int() raises ValueError on huge integers)
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {path}: expected a mapping at the top")
    return d


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) with `key.sub=value` overrides (YAML values).
    A corpus named by an override must exist: it clears the file's `data.synth` (unless an override
    sets that too), so a typo in a path never makes a new synthetic corpus."""
    d: dict = read_yaml(path) if path is not None else {}
    try:
        d = asdict(from_dict(d))  # validate the file first, then apply overrides on full defaults
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None
    _apply(d, overrides)
    keys = {o.partition("=")[0].strip() for o in overrides}
    if "data.corpus" in keys and not any(k == "data.synth" or k.startswith("data.synth.") for k in keys):
        d.setdefault("data", {})["synth"] = None
    return from_dict(d)


def with_overrides(run: RunConfig, overrides: list[str], prefix: str = "") -> RunConfig:
    """`run` with `key.sub=value` overrides, checked as load_config checks them; each key must start
    with `prefix` (a command that builds the rest of the run itself takes only some settings)."""
    bad = [o for o in overrides if not o.partition("=")[0].strip().startswith(prefix)]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: only {prefix}* settings can be set here")
    d = asdict(run)
    _apply(d, overrides)
    return from_dict(d)


def _apply(d: dict, overrides: list[str]) -> None:
    """Set each `key.sub=value` (a YAML value) in `d`; an error names the override."""
    for o in overrides:
        k, eq, v = o.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"override {o!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(v)
        except (yaml.YAMLError, ValueError):  # (PyYAML's int() raises ValueError on huge integers)
            raise ConfigError(f"override {o!r}: the value is not valid YAML") from None
        try:
            _set(d, k.strip(), value)
            from_dict(d, settings_together=False)  # so that an error names the override that caused it
        except ConfigError as e:
            raise ConfigError(f"override {o!r}: {e}") from None
