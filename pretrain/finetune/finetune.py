"""`popscale finetune`: adapt a trained model to sessions it has never seen.

The paper's use of a pretrained POYO: a new session brings new neurons with no correspondence
to any the model knows, so its units (and the session) get new embedding rows, and either only
those rows are learned ("unit identification", `unit-id`: every other weight stays bit-identical),
or everything is (`full`), or the first then the second (`unit-id-then-full`, unfreezing after
`unfreeze_after` steps: full fine-tuning from random rows disturbs the shared layers before the
rows mean anything). The session's labels are a budget (labels.py) drawn from its train split
only, and the targets are normalised with the statistics of that labelled part.

Adaptation is a run plan like pretraining's (plan.py, with `adapt` set: the source weights, the
rows that are new, what trains) run through the same loop (`train.train_in_process`, one process:
a session is small, and Ray's start-up would be most of the wall time). The model kept is the one
with the best validation R² (validation split only; test is scored once, at the end).

    result = finetune(FinetuneConfig(model="models:/popscale-poyo@pretrained", corpus="C",
                                     sessions=["S"], mode="unit-id", labels="10%"))
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from data_service import intervals as iv
from data_service.errors import ConfigError, CorpusError
from data_service.reader import Corpus, open_corpus
from data_service.window_index import IndexConfig, index_fingerprint

from ..run.config import RunConfig, from_dict
from ..run.plan import Adaptation, RunPlan
from ..run.warm_start import WarmStartConfig
from ..tokens.labels import LabelBudget, labelled_intervals, window_stretches
from ..tokens.targets import target_stats
from ..tokens.tokenizer import Readout, TokenizerConfig

MODES = ("unit-id", "full", "unit-id-then-full")


@dataclass
class FinetuneConfig:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, or an exported model directory
    corpus: str
    sessions: list[str]
    mode: str = "unit-id"  # unit-id | full | unit-id-then-full
    labels: str = "100%"  # a fraction of the labelled train time (10%) or a duration (2m, 90s)
    steps: int = 100
    unfreeze_after: int | None = None  # unit-id-then-full: steps of unit-id first (default: half)
    lr_unit_id: float = 1e-2  # new embedding rows alone can move fast
    lr_full: float = 1e-3
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
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow run tags (a sweep nests it: mlflow.parentRunId)

    def __post_init__(self) -> None:
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


def improves(r2: float, best: float) -> bool:
    """Whether a validation figure replaces the best so far: a NaN (a diverged model) never
    replaces a finite best; while nothing finite has been seen (no validation data) the latest
    weights are kept."""
    if np.isfinite(best):
        return bool(np.isfinite(r2) and r2 > best)
    return True


class BestValid:
    """Model selection on the validation split: stands in front of the loop's evaluator and keeps
    a copy of the weights whenever the validation R² is the best so far."""

    def __init__(self, evaluator, best: float = -np.inf, state: dict | None = None, step_offset: int = 0) -> None:
        self.evaluator, self.best, self.state, self.best_step = evaluator, best, state, 0
        self.step_offset = step_offset

    def __call__(self, model, step: int, sink) -> dict[str, float]:
        m = self.evaluator(model, step, sink)
        r2 = m.get("valid_r2", float("nan"))
        if self.state is None or improves(r2, self.best):
            self.best, self.best_step = r2, step + self.step_offset
            self.state = {k: v.detach().clone() if hasattr(v, "detach") else copy.deepcopy(v)
                          for k, v in model.state_dict().items()}
        return m


class _Bar:
    """A metrics sink that moves a rich progress bar (in-process runs have no progress actor)."""

    def __init__(self, bar, task) -> None:
        self.bar, self.task, self.info = bar, task, {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.info.update({k: v for k, v in metrics.items() if k in ("train_loss", "valid_r2")})
        text = "  ".join(f"{k} {v:.3f}" for k, v in self.info.items())
        self.bar.update(self.task, completed=step, info=text)

    def artifact(self, path: str, folder: str) -> None:
        pass


# ---- checking what was asked, before anything is written -------------------------------------------------
def _check_sessions(corpus: Corpus, cfg: FinetuneConfig, tok: TokenizerConfig, known: set[str]) -> None:
    missing = [s for s in cfg.sessions if s not in corpus.rows]
    if missing:
        raise CorpusError(f"session(s) {missing} are not in the corpus (it has {corpus.session_ids[:8]}"
                          f"{' ...' if len(corpus.session_ids) > 8 else ''})", file=str(corpus.root))
    seen = [s for s in cfg.sessions if s in known]
    if seen and not cfg.replace_session:
        raise ConfigError(f"session(s) {seen} are already in the model's vocabulary: it was trained on them "
                          "(--replace-session adapts afresh, replacing their rows)")
    wanted = {r.name: r.behaviours for r in tok.readouts}
    for sid in cfg.sessions:
        have = corpus.session(sid).behaviour_names
        if not any(b in have for bs in wanted.values() for b in bs):
            raise CorpusError(f"the session has no behaviour the model decodes (readouts {wanted}; the session "
                              f"has {have or 'none'}); add a readout for one: --readout NAME:KIND:DIMS=BEHAVIOUR",
                              file=str(corpus.root), session=sid, field="behaviour")


def _base_run(src: Path) -> RunConfig:
    """The run config the source model was trained with (its plan), else the defaults."""
    from ..run.plan import PLAN_FILE

    if (src / PLAN_FILE).exists():
        return copy.deepcopy(RunPlan.load(src).run)
    return from_dict({})


def _phase_run(base: RunConfig, cfg: FinetuneConfig, tok: TokenizerConfig, corpus: str, steps: int, lr: float,
               seed_offset: int, warm: str) -> RunConfig:
    run = copy.deepcopy(base)
    run.name = cfg.name or "finetune"
    d, t = run.data, run.train
    d.corpus, d.synth, d.sessions, d.loader = corpus, None, list(cfg.sessions), "local"
    d.window_s, d.global_batch, d.seed = tok.geometry.window_s, cfg.batch, cfg.seed + seed_offset
    d.readouts = {r.name: list(r.behaviours) for r in tok.readouts}
    d.readout_kinds = {r.name: r.kind for r in tok.readouts if r.kind != "continuous"}
    d.readout_columns = {r.name: r.column for r in tok.readouts if r.column is not None}
    run.model_overrides = {**run.model_overrides, "readouts": {r.name: r.dims for r in tok.readouts}}
    d.target_scale, d.target_rms, d.interval_weights = dict(tok.target_scale), tok.target_rms, dict(tok.interval_weights)
    d.session_weights = {}
    t.steps, t.stop_at, t.grad_accum, t.seed = steps, None, 1, cfg.seed
    t.optim = replace(t.optim, lr=lr)
    t.warmup_steps = min(10, max(1, steps // 10))
    t.eval_every, t.checkpoint_every, t.log_every = cfg.eval_every, steps, max(1, min(5, steps // 10))
    t.eval_sessions = None
    t.warm_start = replace(t.warm_start, method=warm) if warm != "none" else WarmStartConfig("none")
    run.cluster = replace(run.cluster, num_workers=1, cpus_per_worker=float(os.cpu_count() or 1), use_gpu=False)
    return run


def plan_adaptation(cfg: FinetuneConfig, src: Path, corpus: Corpus, progress: bool = False
                    ) -> tuple[RunPlan, dict[str, np.ndarray]]:
    """The plan of the first phase, and the labelled intervals of each session. Raises on any bad
    input before anything is written."""
    from ..tracking.export import load_exported

    model, source_tok = load_exported(src)
    tok = copy.deepcopy(source_tok.cfg)
    added = [parse_readout(x) for x in cfg.readouts]
    clash = [r.name for r in added if r.name in model.readouts]
    if clash:
        raise ConfigError(f"--readout: the model already has readout(s) {clash}")
    tok.readouts += added
    model_cfg = replace(model.cfg, readouts={**model.cfg.readouts, **{r.name: r.dims for r in added}})
    _check_sessions(corpus, cfg, tok, set(model.session_emb.ids))
    budget = LabelBudget.parse(cfg.labels)
    window = tok.geometry.window_s
    decoded = [b for r in tok.readouts for b in r.behaviours]
    labelled = {s: labelled_intervals(corpus.session(s), budget, cfg.seed, window, file=str(corpus.root),
                                      behaviours=decoded) for s in cfg.sessions}
    tok.target_stats.update(target_stats(corpus, cfg.sessions, tok.readouts, tok.target_scale, within=labelled))
    base = _base_run(src)
    warm = cfg.warm_start if cfg.warm_start != "auto" else base.train.warm_start.method
    first_mode = "new" if cfg.mode.startswith("unit-id") else "all"
    if cfg.mode == "unit-id":
        steps, lr = cfg.steps, cfg.lr_unit_id
    elif cfg.mode == "full":
        steps, lr = cfg.steps, cfg.lr_full
    else:
        steps, lr = (cfg.steps // 2 if cfg.unfreeze_after is None else cfg.unfreeze_after), cfg.lr_unit_id
    run = _phase_run(base, cfg, tok, str(corpus.root), steps, lr, 0, warm)
    new_units = [u for s in cfg.sessions for u in corpus.session(s).unit_ids.tolist()]
    units = list(model.unit_emb.ids) + [u for u in dict.fromkeys(new_units) if u not in model.unit_emb.index]
    sessions = list(model.session_emb.ids) + [s for s in cfg.sessions if s not in model.session_emb.index]
    index = IndexConfig(window_s=window, split="train", seed=run.data.seed, sessions=list(cfg.sessions),
                        intervals={s: window_stretches(corpus.session(s), labelled[s], window, decoded).tolist()
                                   for s in cfg.sessions})
    table = None
    if warm == "ridge":
        from ..run.warm_start import unit_directions

        rows = unit_directions(corpus, cfg.sessions, tok, run.train.warm_start, progress=progress, within=labelled)
        table = np.full((len(units), rows.shape[1]), np.nan, dtype=np.float32)
        pos = {u: k for k, u in enumerate(units)}
        table[[pos[u] for u in new_units]] = rows
    valid = [s for s in cfg.sessions if len(corpus.session(s).intervals.get("valid", []))]
    plan = RunPlan(run=run, model=model_cfg, tokenizer=tok, corpus_fingerprint=corpus.fingerprint,
                   sessions=list(cfg.sessions), unit_vocab=units, session_vocab=sessions, valid_sessions=valid,
                   index=index, index_fingerprint=index_fingerprint(corpus.fingerprint, index), warm_start=table,
                   adapt=Adaptation(source=str(src), units=new_units, trainable=first_mode,
                                    reinit=cfg.replace_session, new_readouts=[r.name for r in added]))
    return plan, labelled


# ---- running it ---------------------------------------------------------------------------------------------
def _source(cfg: FinetuneConfig, tracking_uri: str) -> tuple[str, str, str, Path]:
    """(name, version, uri, local directory) of the source model."""
    from ..tracking.registry import locate

    ref, path = locate(cfg.model, tracking_uri, cfg.cache)
    return ref.name, ref.version, ref.uri, path


def finetune(cfg: FinetuneConfig, notify: Callable[[str], None] = print, show_progress: bool = True
             ) -> FinetuneResult:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..decoding.evaluate import evaluate, plot_session
    from ..run.sinks import MemorySink, Sinks
    from ..run.train import train_in_process
    from ..tracking.config import TrackingConfig
    from ..tracking.export import export_model, model_card, provenance
    from ..tracking.mlflow_runs import tracking_uri
    from ..tracking.tracked_run import TrackedRun

    t0 = time.time()
    tracking = TrackingConfig(uri=cfg.tracking_uri, experiment=cfg.experiment)
    uri = tracking_uri(tracking)
    src_name, src_version, src_uri, src = _source(cfg, uri)
    corpus = open_corpus(cfg.corpus)
    plan, labelled = plan_adaptation(cfg, src, corpus, progress=show_progress)
    name = cfg.name or f"{'-'.join(cfg.sessions)[:60]}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.out).resolve() / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    labelled_s = {s: iv.total(r) for s, r in labelled.items()}
    notify(f"finetune {name}: {cfg.mode} from {src_uri} on {', '.join(cfg.sessions)} "
           f"({len(plan.adapt.units)} new units; labels {cfg.labels}: "
           + ", ".join(f"{s} {v:.0f} s" for s, v in labelled_s.items()) + ")")

    # with the server away the run is kept in `out` and sent later (`popscale tracking-sync OUT`)
    run = TrackedRun.start(tracking, out, name, asdict(cfg), "finetune", notify=notify,
                           tags={"source_model": src_name, "source_version": src_version, "source_uri": src_uri,
                                 "mode": cfg.mode, "labels": cfg.labels, "sessions": ",".join(cfg.sessions),
                                 **cfg.tags})
    tracked = run.sink()
    memory = MemorySink()
    phases = [plan]
    if cfg.mode == "unit-id-then-full":
        k = plan.run.train.steps
        phases.append(replace(plan, run=_phase_run(plan.run, cfg, plan.tokenizer, plan.corpus, cfg.steps - k,
                                                   cfg.lr_full, 1, "none")))
    ok = False
    try:
        with Progress(TextColumn(f"finetune ({cfg.mode})"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=Console(stderr=True),
                      disable=not show_progress) as bar:
            task = bar.add_task("", total=cfg.steps, info="starting")
            selector, offset, model = None, 0, None
            for i, p in enumerate(phases):
                if i:  # the next phase starts from the best weights so far, everything trainable
                    model.load_state_dict(selector.state)
                    start = export_model(model, p.tokenizer, out / f"phase{i}-start")
                    p = replace(p, warm_start=None, index=replace(p.index, seed=p.run.data.seed),
                                adapt=Adaptation(str(start), p.adapt.units, "all", False, p.adapt.new_readouts))
                    p.index_fingerprint = index_fingerprint(p.corpus_fingerprint, p.index)
                sink = Sinks(memory, tracked, _Bar(bar, task))

                def select(evaluator, prev=selector, off=offset):
                    return BestValid(evaluator, prev.best if prev else -np.inf, prev.state if prev else None, off)

                res = train_in_process(p, out / f"phase{i}", sink=_Offset(sink, offset), wrap_evaluator=select)
                selector, model = res.evaluator, res.model
                offset += p.run.train.steps
            model.load_state_dict(selector.state)
        model.eval()
        tokenizer = plan.make_tokenizer()
        test = evaluate(model, tokenizer, corpus, cfg.sessions, "test")
        valid = evaluate(model, tokenizer, corpus, cfg.sessions, "valid")
        nan2 = (float("nan"), float("nan"))
        per = {s: {"test": test[s].r2 if s in test else float("nan"),
                   "test_ci": list(test[s].ci if s in test else nan2),
                   "valid": valid[s].r2 if s in valid else float("nan"),
                   "valid_s": _scored_seconds(corpus.session(s), "valid")} for s in cfg.sessions}
        test_r2 = float(np.nanmean([v["test"] for v in per.values()]))
        valid_r2 = float(np.nanmean([v["valid"] for v in per.values()]))
        metrics = {"test_r2": test_r2, "valid_r2_best": valid_r2, "best_step": float(selector.best_step),
                   **{f"test_r2.{s}": v["test"] for s, v in per.items()}}
        tracked.log(metrics, cfg.steps)
        with tempfile.TemporaryDirectory() as tmp:
            for s, r in test.items():
                run.artifact(plot_session(r, f"{tmp}/test_decoded_vs_true_{s}.png", split="test"), "plots")
        final = plan if len(phases) == 1 else replace(plan, adapt=replace(plan.adapt, trainable="all"))
        prov = provenance({"corpus": plan.corpus, "corpus_fingerprint": plan.corpus_fingerprint, "mlflow_run_id": run.run_id or "",
                           "source_model": src_uri, "mode": cfg.mode, "labels": cfg.labels,
                           "adapted_sessions": list(cfg.sessions)})
        export = export_model(model, plan.tokenizer, out / "export", prov)
        final.save(export)
        model_card(export, title=f"{cfg.register or name}: {src_uri} adapted to {', '.join(cfg.sessions)}",
                   data=f"Adapted ({cfg.mode}, {cfg.steps} steps) to {', '.join(cfg.sessions)} of {plan.corpus} with "
                        f"{cfg.labels} of the train split's labels.", metrics={"test_r2": test_r2, "valid_r2": valid_r2},
                   lineage=f"from {src_uri}")
        # registered and the run set FINISHED; with the server away, both left to the one command printed
        fin = run.finish(export=export if cfg.register else None, model_name=cfg.register or "", alias=cfg.alias,
                         tags={"kind": "finetuned", "source_model": src_uri, "mode": cfg.mode, "labels": cfg.labels,
                               "sessions": ",".join(cfg.sessions), "test_r2": f"{test_r2:.4f}",
                               "git_commit": prov["git_commit"]})
        model_uri = fin.model_uri or str(export)
        ok = True
    finally:
        if not ok:
            run.failed()
    return FinetuneResult(name=name, mode=cfg.mode, labels=cfg.labels, test_r2=test_r2, valid_r2=valid_r2,
                          per_session=per, model_uri=model_uri, source=src_uri, export=export,
                          seconds=time.time() - t0, best_step=selector.best_step, labelled_s=labelled_s)


def _scored_seconds(reader, split: str) -> float:
    """Seconds of `split` inside the session's eval intervals: what model selection scored on."""
    rows = iv.normalize(reader.intervals.get(split, iv.EMPTY))
    ev = reader.intervals.get("eval")
    return float(iv.total(iv.intersect(rows, ev) if ev is not None else rows))


class _Offset:
    """A sink whose steps continue from `offset` (the second phase logs after the first)."""

    def __init__(self, sink, offset: int) -> None:
        self.sink, self.offset = sink, offset

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.sink.log(metrics, step + self.offset)

    def artifact(self, path: str, folder: str) -> None:
        self.sink.artifact(path, folder)
