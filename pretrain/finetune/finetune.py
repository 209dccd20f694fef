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

import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import numpy as np

from data_service import intervals as iv
from data_service.reader import open_corpus
from data_service.window_index import index_fingerprint

from ..decoding.evaluate import evaluate, plot_session
from ..run.plan import Adaptation, RunPlan
from ..run.progress import progress_bar
from ..run.sinks import MemorySink, Sinks
from ..run.train import train_in_process
from ..tracking.config import TrackingConfig
from ..tracking.export import export_model, model_card, provenance
from ..tracking.mlflow_runs import tracking_uri
from ..tracking.registry import locate
from ..tracking.tracked_run import TrackedRun
from .config import FinetuneConfig, FinetuneResult, rates
from .plan import phase_run, plan_adaptation
from .select import BestValid


class _Bar:
    """A metrics sink that moves a rich progress bar (in-process runs have no progress actor)."""

    def __init__(self, bar) -> None:
        self.bar, self.info = bar, {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.info.update({k: v for k, v in metrics.items() if k in ("train_loss", "valid_r2")})
        text = "  ".join(f"{k} {v:.3f}" for k, v in self.info.items())
        self.bar.update(completed=step, info=text)

    def artifact(self, path: str, folder: str) -> None:
        pass


# ---- running it ---------------------------------------------------------------------------------------------
def _source(cfg: FinetuneConfig, tracking_uri: str) -> tuple[str, str, str, Path]:
    """(name, version, uri, local directory) of the source model."""
    ref, path = locate(cfg.model, tracking_uri, cfg.cache)
    return ref.name, ref.version, ref.uri, path


def _phases(plan: RunPlan, cfg: FinetuneConfig) -> list[RunPlan]:
    """One training phase, or two for unit-id-then-full (the second everything trainable)."""
    if cfg.mode != "unit-id-then-full":
        return [plan]
    k = plan.run.train.steps
    return [plan, replace(plan, run=phase_run(plan.run, cfg, plan.tokenizer, plan.corpus, cfg.steps - k,
                                              rates(cfg, plan.run.train.optim.algo)[1], 1, "none"))]


def _train(phases: list[RunPlan], cfg: FinetuneConfig, out: Path, tracked, show_progress: bool):
    """Train the phases in turn, each from the best weights so far; returns the model at its best
    validation step and the selector that chose it."""
    memory = MemorySink()
    with progress_bar(f"finetune ({cfg.mode})", cfg.steps, info="starting", remaining=False,
                      show=show_progress) as bar:
        selector, offset, model = None, 0, None
        for i, p in enumerate(phases):
            if i:  # the next phase starts from the best weights so far, everything trainable
                model.load_state_dict(selector.state)
                start = export_model(model, p.tokenizer, out / f"phase{i}-start")
                p = replace(p, warm_start=None, index=replace(p.index, seed=p.run.data.seed),
                            adapt=Adaptation(str(start), p.adapt.units, "all", False, p.adapt.new_readouts))
                p.index_fingerprint = index_fingerprint(p.corpus_fingerprint, p.index)
            sink = Sinks(memory, tracked, _Bar(bar))

            def select(evaluator, prev=selector, off=offset):
                return BestValid(evaluator, prev.best if prev else -np.inf, prev.state if prev else None, off)

            res = train_in_process(p, out / f"phase{i}", sink=_Offset(sink, offset), wrap_evaluator=select)
            selector, model = res.evaluator, res.model
            offset += p.run.train.steps
        model.load_state_dict(selector.state)
    model.eval()
    return model, selector


def _score(model, plan: RunPlan, corpus, sessions: list[str]) -> tuple[dict, dict]:
    """Test and valid R2 per session (test with its interval), and the test results to plot; a
    causal readout's by causal decoding, every sample."""
    tokenizer = plan.make_tokenizer()
    test = evaluate(model, tokenizer, corpus, sessions, "test", causal=plan.causal)
    valid = evaluate(model, tokenizer, corpus, sessions, "valid", causal=plan.causal)
    nan2 = (float("nan"), float("nan"))
    per = {s: {"test": test[s].r2 if s in test else float("nan"),
               "test_ci": list(test[s].ci if s in test else nan2),
               "valid": valid[s].r2 if s in valid else float("nan"),
               "valid_s": _scored_seconds(corpus.session(s), "valid")} for s in sessions}
    return per, test


def finetune(cfg: FinetuneConfig, notify: Callable[[str], None] = print, show_progress: bool = True
             ) -> FinetuneResult:
    """Adapt a model to `cfg.sessions`, keep its best validation step, score it once on test,
    export it (and register it when asked), all in one tracked run."""
    t0 = time.time()
    tracking = TrackingConfig(uri=cfg.tracking_uri, experiment=cfg.experiment)
    src_name, src_version, src_uri, src = _source(cfg, tracking_uri(tracking))
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
                                 "causal": str(plan.causal).lower(), **cfg.tags})
    tracked = run.sink()
    phases = _phases(plan, cfg)
    ok = False
    try:
        model, selector = _train(phases, cfg, out, tracked, show_progress)
        per, test = _score(model, plan, corpus, cfg.sessions)
        test_r2 = float(np.nanmean([v["test"] for v in per.values()]))
        valid_r2 = float(np.nanmean([v["valid"] for v in per.values()]))
        tracked.log({"test_r2": test_r2, "valid_r2_best": valid_r2, "best_step": float(selector.best_step),
                     **{f"test_r2.{s}": v["test"] for s, v in per.items()}}, cfg.steps)
        with tempfile.TemporaryDirectory() as tmp:
            for s, r in test.items():
                run.artifact(plot_session(r, f"{tmp}/test_decoded_vs_true_{s}.png", split="test"), "plots")
        final = plan if len(phases) == 1 else replace(plan, adapt=replace(plan.adapt, trainable="all"))
        prov = provenance({"corpus": plan.corpus, "corpus_fingerprint": plan.corpus_fingerprint,
                           "mlflow_run_id": run.run_id or "", "source_model": src_uri, "mode": cfg.mode,
                           "labels": cfg.labels, "adapted_sessions": list(cfg.sessions),
                           "causal_tail_s": plan.run.data.augment.query_tail_s, "causal_mask": plan.model.causal})
        export = export_model(model, plan.tokenizer, out / "export", prov)
        final.save(export)
        model_card(export, title=f"{cfg.register or name}: {src_uri} adapted to {', '.join(cfg.sessions)}",
                   data=f"Adapted ({cfg.mode}, {cfg.steps} steps) to {', '.join(cfg.sessions)} of {plan.corpus} with "
                        f"{cfg.labels} of the train split's labels."
                        + (f" A causal readout: trained on the last {plan.run.data.augment.query_tail_s:g} s of each "
                           "window, R2 by causal decoding (each sample from the window ending at it)." if plan.causal else "")
                        + (" Attention masked by time: no prediction sees a later spike." if plan.model.causal else ""),
                   metrics={"test_r2": test_r2, "valid_r2": valid_r2},
                   lineage=f"from {src_uri}")
        # registered and the run set FINISHED; with the server away, both left to the one command printed
        fin = run.finish(export=export if cfg.register else None, model_name=cfg.register or "", alias=cfg.alias,
                         tags={"kind": "finetuned", "source_model": src_uri, "mode": cfg.mode, "labels": cfg.labels,
                               "sessions": ",".join(cfg.sessions), "test_r2": f"{test_r2:.4f}",
                               "git_commit": prov["git_commit"]})
        ok = True
    finally:
        if not ok:
            run.failed()
    return FinetuneResult(name=name, mode=cfg.mode, labels=cfg.labels, test_r2=test_r2, valid_r2=valid_r2,
                          per_session=per, model_uri=fin.model_uri or str(export), source=src_uri, export=export,
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
