"""The run plan: what a training run is, resolved once on the driver and handed to every worker.

A run config says what the user asked for; the plan is what that means on this corpus: which
sessions are streamed, the unit and session vocabularies (in embedding-row order), which
sessions are validated, the readouts with the behaviours they decode and every session's
target statistics (targets.py), the window and latent geometry, the window index and its
fingerprint, and the warm-start weights. Workers, the data service and the exporter read the plan; none of them re-derives any
of it, and the plan holds no model: build.py makes one from it (the tokenizer is built on the plan's frozen vocabularies).

The plan is a plain dataclass: it crosses Ray's serialisation as it is, and `save`/`load`
write it into each checkpoint and the run directory as JSON (`to_dict`/`from_dict`), so a
checkpoint can be exported, resumed or adapted with nothing else.

    plan = build_plan(load_config("configs/demo.yaml"))
    spec = plan.service_spec()            # what the data service needs
    model = build_model(plan)             # build.py: vocabularies and warm start applied
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from data_service.errors import ConfigError, CorpusError
from data_service.reader import Corpus, open_corpus
from data_service.remote import join, read_text, write_text
from data_service.service import ServiceSpec
from data_service.window_index import IndexConfig, WindowIndex, index_fingerprint

from ..model.config import ModelConfig
from ..model.vocab import StaticVocab
from ..tokens.config import TokenizerConfig
from ..tokens.labels import LabelBudget, labelled_intervals, window_stretches
from ..tokens.targets import target_stats
from ..tokens.tokenizer import Tokenizer
from .config import RunConfig, from_dict
from .warm_start import unit_directions

PLAN_FILE = "plan.json"
FORMAT_VERSION = 1


class PlanMismatch(ValueError):
    """A resumed run whose data would not continue where it stopped."""


@dataclass
class Adaptation:
    """A plan that starts from a trained model (adapt.py): its weights, the vocabulary rows it
    adds, and what trains."""

    source: str  # exported model directory (registry.export_model) the weights start from
    units: list[str]  # unit ids of the plan's sessions: the rows that are new (or start afresh)
    trainable: str = "all"  # all | new: only the embedding rows of `units` and of the plan's sessions
    reinit: bool = False  # the plan's sessions are in the source model: their rows start afresh
    new_readouts: list[str] = field(default_factory=list)  # readouts the source model lacks (trainable when new)

    def __post_init__(self) -> None:
        if self.trainable not in ("all", "new"):
            raise ValueError(f"trainable must be all or new, got {self.trainable!r}")


@dataclass(eq=False)
class RunPlan:
    run: RunConfig  # what was asked for (paths absolute)
    model: ModelConfig  # the preset with its overrides
    tokenizer: TokenizerConfig  # geometry, readouts (behaviours, dims), target scales, loss weights
    corpus_fingerprint: str
    sessions: list[str]  # streamed for training, in index order
    unit_vocab: list[str]  # embedding rows: every unit of `sessions`, session by session
    session_vocab: list[str]
    valid_sessions: list[str]
    index: IndexConfig
    index_fingerprint: str
    warm_start: np.ndarray | None = None  # (units, sum of readout dims) float32; NaN rows: left random
    adapt: Adaptation | None = None  # None: trained from scratch

    @property
    def corpus(self) -> str:
        return self.run.data.corpus

    @property
    def causal(self) -> bool:
        """A causal readout: it learns the queries at its windows' ends only, and is validated causally."""
        return self.run.data.augment.query_tail_s is not None

    # ---- what the parts are built from --------------------------------------------------------------
    def make_tokenizer(self) -> Tokenizer:
        return Tokenizer(self.tokenizer, StaticVocab(self.unit_vocab, "unit"),
                         StaticVocab(self.session_vocab, "session"))

    def service_spec(self) -> ServiceSpec:
        d = self.run.data
        return ServiceSpec(corpus=self.corpus, index=self.index, tokenizer=self.make_tokenizer(),
                           global_batch=d.global_batch, seed=d.seed, augment=d.augment,
                           index_fingerprint=self.index_fingerprint, skip_bad_windows=d.skip_bad_windows)

    def index_intervals(self) -> dict[str, np.ndarray | None]:
        """The training index's intervals, read here once and handed to every worker, whose data
        actors (new ones for every Ray dataset) then make the index without opening a session:
        at 10,000 sessions on object storage that is tens of thousands of requests per actor."""
        return WindowIndex.split_intervals(open_corpus(self.corpus), self.index)

    # ---- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able; float32 warm-start values survive the round trip exactly."""
        ws = self.warm_start
        return {"format": "popscale-plan", "format_version": FORMAT_VERSION, "run": self.run.to_dict(),
                "model": self.model.to_dict(), "tokenizer": asdict(self.tokenizer),
                "corpus_fingerprint": self.corpus_fingerprint, "sessions": list(self.sessions),
                "unit_vocab": list(self.unit_vocab), "session_vocab": list(self.session_vocab),
                "valid_sessions": list(self.valid_sessions), "index": asdict(self.index),
                "index_fingerprint": self.index_fingerprint,
                "warm_start": None if ws is None else {"shape": list(ws.shape), "values": ws.reshape(-1).tolist()},
                "adapt": None if self.adapt is None else asdict(self.adapt)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunPlan":
        if d.get("format") != "popscale-plan" or d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a popscale plan of format version {FORMAT_VERSION}: "
                             f"{d.get('format')!r} v{d.get('format_version')!r}")
        ws = d["warm_start"]
        return cls(run=from_dict(d["run"]), model=ModelConfig.from_dict(d["model"]),
                   tokenizer=TokenizerConfig.from_dict(d["tokenizer"]), corpus_fingerprint=d["corpus_fingerprint"],
                   sessions=list(d["sessions"]), unit_vocab=list(d["unit_vocab"]),
                   session_vocab=list(d["session_vocab"]), valid_sessions=list(d["valid_sessions"]),
                   index=IndexConfig(**d["index"]), index_fingerprint=d["index_fingerprint"],
                   warm_start=None if ws is None else np.asarray(ws["values"], dtype=np.float32).reshape(ws["shape"]),
                   adapt=Adaptation(**d["adapt"]) if d.get("adapt") else None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunPlan) and json.dumps(self.to_dict()) == json.dumps(other.to_dict())

    def save(self, directory: str | Path) -> str:
        """Write `plan.json` into `directory` (atomically: a reader never sees half a plan)."""
        path = join(str(directory), PLAN_FILE)  # a local directory or a URL on shared storage
        write_text(path, json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "RunPlan":
        return cls.from_dict(json.loads(read_text(join(str(directory), PLAN_FILE))))


# ---- building a plan on the driver ----------------------------------------------------------------------
def training_sessions(run: RunConfig, corpus: Corpus, tok: TokenizerConfig) -> list[str]:
    """The configured sessions, else every session with a behaviour some readout decodes."""
    if run.data.sessions is not None:
        return list(run.data.sessions)
    wanted = {b for r in tok.readouts for b in r.behaviours}
    sessions = [s for s in corpus.session_ids if wanted & set(corpus.rows[s]["behaviours"])]
    if not sessions:
        have = sorted({b for s in corpus.session_ids for b in corpus.rows[s]["behaviours"]})
        wanted_by = {r.name: r.behaviours for r in tok.readouts}
        raise CorpusError(f"no session has a behaviour the readouts decode ({wanted_by}); the corpus has "
                          f"{have or 'none'} (set data.readouts)", file=str(corpus.root))
    return sessions


def labelled_parts(run: RunConfig, corpus: Corpus, sessions: list[str]) -> dict[str, np.ndarray] | None:
    """Each session's labelled part under `data.labels` (None: the whole train split)."""
    budget = LabelBudget.parse(run.data.labels)
    if budget.everything:
        return None
    decoded = [b for bs in run.data.readouts.values() for b in bs]
    return {s: labelled_intervals(corpus.session(s), budget, run.data.seed, run.data.window_s, file=str(corpus.root),
                                  behaviours=decoded) for s in sessions}


def _stretches(run: RunConfig, corpus: Corpus, within: dict[str, np.ndarray]) -> dict[str, list]:
    """The window index's intervals for labelled parts (labels.window_stretches)."""
    decoded = [b for bs in run.data.readouts.values() for b in bs]
    return {s: window_stretches(corpus.session(s), r, run.data.window_s, decoded).tolist() for s, r in within.items()}


def build_plan(run: RunConfig, *, previous: RunPlan | None = None, progress: bool = False) -> RunPlan:
    """The plan of `run` on its corpus. `previous` (a resumed run's plan) fixes the sessions, the
    target statistics and the warm start; the tokens and the window order must stay what they
    were, or `PlanMismatch`."""
    corpus = open_corpus(run.data.corpus)
    model = run.model_config()
    d = run.data
    try:
        tok = TokenizerConfig.build(model, d.window_s, d.readouts, d.target_scale, d.interval_weights, d.target_rms,
                                    d.readout_kinds, d.readout_columns)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    if previous is not None:
        was = asdict(replace(previous.tokenizer, target_stats={}))
        if was != asdict(tok):
            raise PlanMismatch("its tokens would change: readouts, target scales, loss weights or window geometry "
                               f"differ from the run's plan ({was} -> {asdict(tok)})")
        sessions, tok = list(previous.sessions), previous.tokenizer  # its target statistics: never recomputed
    else:
        sessions = training_sessions(run, corpus, tok)
    within = labelled_parts(run, corpus, sessions)
    if previous is None:
        tok.target_stats = target_stats(corpus, sessions, tok.readouts, tok.target_scale, within=within)
    units = [u for s in sessions for u in corpus.session(s).unit_ids.tolist()]
    valid = [s for s in sessions if len(corpus.session(s).intervals.get("valid", []))]
    valid = valid[: run.train.eval_sessions] if run.train.eval_sessions else valid
    index = IndexConfig(window_s=d.window_s, split="train", seed=d.seed, session_weights=d.session_weights,
                        sessions=sessions, intervals=None if within is None else _stretches(run, corpus, within),
                        block_windows=d.block_windows)
    fingerprint = index_fingerprint(corpus.fingerprint, index)
    if previous is not None and previous.index_fingerprint != fingerprint:
        raise PlanMismatch(f"its data (corpus {d.corpus} or the data config) changed since it started (window-index "
                           f"fingerprint {previous.index_fingerprint} -> {fingerprint}); the window order would not "
                           "continue where it stopped")
    if previous is not None:
        warm = previous.warm_start  # used only at initialisation: never recomputed
    elif run.train.warm_start.method == "ridge":
        warm = unit_directions(corpus, sessions, tok, run.train.warm_start, progress=progress, within=within)
    else:
        warm = None
    return RunPlan(run=run, model=model, tokenizer=tok, corpus_fingerprint=corpus.fingerprint, sessions=sessions,
                   unit_vocab=units, session_vocab=list(sessions), valid_sessions=valid, index=index,
                   index_fingerprint=fingerprint, warm_start=warm)
