"""What `popscale finetune` is asked (FinetuneConfig) and what it answers (FinetuneResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_service.errors import ConfigError

from ..tokens.config import Readout

MODES = ("unit-id", "full", "unit-id-then-full")

# (unit-id, full) learning rates by the source model's optimizer. AdamW: set on the demo's models. LAMB
# scales every step by each layer's weight norm, so its rates are another scale: the median of the rates
# chosen on the validation splits of poyo-real-1's five evaluation sessions (bench/RESULTS.md, issue 27)
DEFAULT_RATES = {"adamw": (1e-2, 1e-3), "lamb": (0.1, 4e-3)}


def rates(cfg: "FinetuneConfig", algo: str) -> tuple[float, float]:
    """(unit-id, full) learning rates: the ones asked for, else DEFAULT_RATES of the source's optimizer."""
    unit, full = DEFAULT_RATES.get(algo, DEFAULT_RATES["adamw"])
    return (cfg.lr_unit_id if cfg.lr_unit_id is not None else unit, cfg.lr_full if cfg.lr_full is not None else full)


@dataclass
class FinetuneConfig:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, or an exported model directory
    corpus: str
    sessions: list[str]
    mode: str = "unit-id"  # unit-id | full | unit-id-then-full
    labels: str = "100%"  # a fraction of the labelled train time (10%) or a duration (2m, 90s)
    steps: int = 100
    unfreeze_after: int | None = None  # unit-id-then-full: steps of unit-id first (default: half)
    # None: by the optimizer the source model was pretrained with (DEFAULT_RATES)
    lr_unit_id: float | None = None
    lr_full: float | None = None
    batch: int = 16
    seed: int = 0  # the label draw and the training
    eval_every: int = 25
    warm_start: str = "auto"  # auto: as the source model was pretrained | ridge | none
    replace_session: bool = False  # adapt to a session already in the model (its rows start afresh)
    register: str | None = None  # register the adapted model under this name
    alias: str | None = None  # and point this alias at it
    tracking_uri: str | None = None
    experiment: str = "popscale-finetune"
    out: str = "runs/finetune"
    name: str | None = None
    cache: str = "runs/models"
    # readouts to add, for behaviours the model was not pretrained on: NAME:KIND:DIMS=BEHAVIOUR[,BEHAVIOUR...]
    readouts: list[str] = field(default_factory=list)
    # decode only these behaviours of the sessions (default: every one a readout of the model takes);
    # the others' labels are not used (a comparison with a decoder of one behaviour gives both the same labels)
    behaviours: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow run tags (a sweep nests it: mlflow.parentRunId)
    # a causal readout (what `popscale serve` runs): trained on the behaviour samples in the last causal_tail_s
    # of each window only (default: half the window, chosen on valid: bench/RESULTS.md, live decoding), selected and
    # scored by causal decoding (decoding/causal.py)
    causal: bool = False
    causal_tail_s: float | None = None
    # the model's attention masked by time (ModelConfig.causal): every query's prediction is causal wherever it
    # sits in the window, so every sample is learned (the tail is the whole window unless causal_tail_s); implies causal
    causal_mask: bool = False
    # training settings of the adaptation, `train.key=value` as `popscale pretrain --set` takes them (e.g.
    # train.optim.trust=tensor train.zero_stage=0); applied to each phase's run last
    train_settings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.causal_mask:
            self.causal = True
        for spec in self.readouts:
            parse_readout(spec)
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.steps < 1 or self.batch < 1 or self.eval_every < 1:
            raise ConfigError("--steps, --batch and --eval-every must be at least 1")
        if self.warm_start not in ("auto", "ridge", "none"):
            raise ConfigError(f"--warm-start {self.warm_start!r}: expected auto, ridge or none")
        if self.mode == "unit-id-then-full":
            k = self.steps // 2 if self.unfreeze_after is None else self.unfreeze_after
            if not 0 < k < self.steps:
                raise ConfigError(f"--unfreeze-after {k}: must be between 1 and --steps - 1 ({self.steps - 1})")
        elif self.unfreeze_after is not None:
            raise ConfigError("--unfreeze-after applies to --mode unit-id-then-full only")
        if not self.sessions:
            raise ConfigError("name at least one --session to adapt to")
        if self.causal_tail_s is not None and not (self.causal and self.causal_tail_s > 0):
            raise ConfigError(f"--causal-tail {self.causal_tail_s}: must be > 0 seconds, and goes with --causal")


@dataclass
class FinetuneResult:
    name: str
    mode: str
    labels: str
    test_r2: float
    valid_r2: float
    # session -> {"test": r2, "test_ci": [low, high] (95 % bootstrap over trials / blocks), "valid": r2,
    # "valid_s": seconds of validation the model selection scored on (the whole valid split, whatever the budget)}
    per_session: dict[str, dict]
    model_uri: str  # models:/NAME/VERSION when registered, else the exported directory
    source: str  # the source model's models:/ URI (or directory)
    export: Path
    seconds: float
    best_step: int
    labelled_s: dict[str, float] = field(default_factory=dict)


def parse_readout(spec: str) -> Readout:
    """`head_direction:angular:2=compass_direction` -> Readout (kinds: tokenizer.KINDS)."""
    head, eq, behaviours = spec.partition("=")
    parts = head.split(":")
    if not eq or len(parts) != 3 or not behaviours or not parts[2].strip().isdigit():
        raise ConfigError(f"--readout {spec!r}: expected NAME:KIND:DIMS=BEHAVIOUR[,BEHAVIOUR...], e.g. "
                          "head_direction:angular:2=compass_direction[ry] or target:categorical:8=target_id")
    names, column = [], None
    for b in (x.strip() for x in behaviours.split(",") if x.strip()):
        if b.endswith("]") and "[" in b:  # compass_direction[ry]: one column of a multi-column behaviour
            b, column = b[:-1].split("[", 1)
        names.append(b)
    try:
        return Readout(parts[0].strip(), int(parts[2]), names, parts[1].strip(), column)
    except ValueError as e:
        raise ConfigError(f"--readout {spec!r}: {e}") from None
