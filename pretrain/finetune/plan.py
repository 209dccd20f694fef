"""An adaptation as a run plan (pretrain/run/plan.py with `adapt` set): the source model's
vocabularies grown by the new sessions' units, its readouts (and any new ones), the label budget's
windows, the targets normalised by the labelled part; checked before anything is written."""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from data_service.errors import ConfigError, CorpusError
from data_service.reader import Corpus
from data_service.window_index import IndexConfig, index_fingerprint

from ..run.config import RunConfig, from_dict, with_overrides
from ..run.plan import PLAN_FILE, Adaptation, RunPlan
from ..run.warm_start import WarmStartConfig, unit_directions
from ..tokens.config import TokenizerConfig
from ..tokens.labels import LabelBudget, labelled_intervals, window_stretches
from ..tokens.targets import target_stats
from ..tracking.export import load_exported
from .config import FinetuneConfig, parse_readout, rates


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
        absent = [b for b in cfg.behaviours if b not in have]
        if absent:
            raise CorpusError(f"--behaviour {absent[0]}: the session has no such behaviour (it has {have or 'none'})",
                              file=str(corpus.root), session=sid, field="behaviour")
        if cfg.behaviours:
            have = [b for b in have if b in cfg.behaviours]
        if not any(b in have for bs in wanted.values() for b in bs):
            raise CorpusError(f"the session has no behaviour the model decodes (readouts {wanted}; the session "
                              f"has {have or 'none'}); add a readout for one: --readout NAME:KIND:DIMS=BEHAVIOUR",
                              file=str(corpus.root), session=sid, field="behaviour")


def _base_run(src: Path) -> RunConfig:
    """The run config the source model was trained with (its plan), else the defaults."""
    if (src / PLAN_FILE).exists():
        return copy.deepcopy(RunPlan.load(src).run)
    return from_dict({})


def phase_run(base: RunConfig, cfg: FinetuneConfig, tok: TokenizerConfig, corpus: str, steps: int, lr: float,
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
    # a causal readout learns only the queries at its windows' ends (augment.tail_queries); half the window by
    # default: on valid it beat one latent step (0.125 s) and kept the stitched R2 (bench/RESULTS.md, live decoding).
    # A model masked by time predicts causally everywhere in the window: all of it by default
    tail = cfg.causal_tail_s or tok.geometry.window_s / (1 if cfg.causal_mask else 2)
    d.augment = replace(d.augment, query_tail_s=tail if cfg.causal else None)
    t.steps, t.stop_at, t.grad_accum, t.seed = steps, None, 1, cfg.seed
    t.optim = replace(t.optim, lr=lr)
    t.warmup_steps = min(10, max(1, steps // 10))
    t.eval_every, t.checkpoint_every, t.log_every = cfg.eval_every, steps, max(1, min(5, steps // 10))
    t.eval_sessions = None
    t.warm_start = replace(t.warm_start, method=warm) if warm != "none" else WarmStartConfig("none")
    run.cluster = replace(run.cluster, num_workers=1, cpus_per_worker=float(os.cpu_count() or 1), use_gpu=False)
    return with_overrides(run, cfg.train_settings, "train.") if cfg.train_settings else run


def plan_adaptation(cfg: FinetuneConfig, src: Path, corpus: Corpus, progress: bool = False
                    ) -> tuple[RunPlan, dict[str, np.ndarray]]:
    """The plan of the first phase, and the labelled intervals of each session. Raises on any bad
    input before anything is written."""
    model, source_tok = load_exported(src)
    tok = copy.deepcopy(source_tok.cfg)
    added = [parse_readout(x) for x in cfg.readouts]
    clash = [r.name for r in added if r.name in model.readouts]
    if clash:
        raise ConfigError(f"--readout: the model already has readout(s) {clash}")
    tok.readouts += added
    model_cfg = replace(model.cfg, readouts={**model.cfg.readouts, **{r.name: r.dims for r in added}},
                        causal=model.cfg.causal or cfg.causal_mask)
    _check_sessions(corpus, cfg, tok, set(model.session_emb.ids))
    if cfg.behaviours:  # the sessions' other behaviours are not decoded and their labels not used
        tok.not_decoded.update({s: [b for b in corpus.session(s).behaviour_names if b not in cfg.behaviours]
                                for s in cfg.sessions})
    budget = LabelBudget.parse(cfg.labels)
    window = tok.geometry.window_s
    decoded = {s: [b for r in tok.readouts for b in r.behaviours if tok.decodes(s, b)] for s in cfg.sessions}
    labelled = {s: labelled_intervals(corpus.session(s), budget, cfg.seed, window, file=str(corpus.root),
                                      behaviours=decoded[s]) for s in cfg.sessions}
    tok.target_stats.update(target_stats(corpus, cfg.sessions, tok.readouts, tok.target_scale, within=labelled,
                                         not_decoded=tok.not_decoded))
    base = _base_run(src)
    warm = cfg.warm_start if cfg.warm_start != "auto" else base.train.warm_start.method
    first_mode = "new" if cfg.mode.startswith("unit-id") else "all"
    lr_unit, lr_full = rates(cfg, base.train.optim.algo)
    if cfg.mode == "unit-id":
        steps, lr = cfg.steps, lr_unit
    elif cfg.mode == "full":
        steps, lr = cfg.steps, lr_full
    else:
        steps, lr = (cfg.steps // 2 if cfg.unfreeze_after is None else cfg.unfreeze_after), lr_unit
    run = phase_run(base, cfg, tok, str(corpus.root), steps, lr, 0, warm)
    new_units = [u for s in cfg.sessions for u in corpus.session(s).unit_ids.tolist()]
    units = list(model.unit_emb.ids) + [u for u in dict.fromkeys(new_units) if u not in model.unit_emb.index]
    sessions = list(model.session_emb.ids) + [s for s in cfg.sessions if s not in model.session_emb.index]
    index = IndexConfig(window_s=window, split="train", seed=run.data.seed, sessions=list(cfg.sessions),
                        intervals={s: window_stretches(corpus.session(s), labelled[s], window, decoded[s]).tolist()
                                   for s in cfg.sessions})
    table = None
    if warm == "ridge":
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
