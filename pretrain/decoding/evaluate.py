"""Validation as the reference does it: 50 %-overlapping windows over whole validation intervals,
predictions of a behaviour sample averaged over the windows that contain it (stitching), and R2
per session over the samples inside both the split and the session's `eval` intervals (reach
periods, ...), averaged uniformly over output dims (metrics.r2_score); the headline is the mean
over sessions. An angular readout is scored by R2 on (cos, sin), a categorical one by accuracy; a
session's figure is the mean over its readouts. Each figure carries a 95 % bootstrap interval over
the split's trials (or 10 s blocks when the session has no trials): metrics.py.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

from data_service import intervals as iv
from data_service.reader import Corpus, SessionReader, open_corpus

from .metrics import bootstrap_accuracy, bootstrap_r2, r2_score, sample_groups
from .causal import causal_decode
from .stitch import decode_session, plot_traces


@dataclass
class SessionResult:
    session_id: str
    r2: float  # averaged over the behaviours scored
    behaviour: str  # the first readout's (what `times`, `target` and `prediction` hold)
    times: np.ndarray  # absolute times of the scored samples
    target: np.ndarray  # (n, d), in the session's units
    prediction: np.ndarray  # (n, d), in the session's units
    per_behaviour: dict[str, float] = field(default_factory=dict)  # behaviour -> R2, every readout scored
    # 95 % bootstrap interval of `r2` over trials / blocks (NaN when fewer than two groups, or
    # when several readouts are averaged), and of each behaviour's figure
    ci: tuple[float, float] = (float("nan"), float("nan"))
    per_behaviour_ci: dict[str, tuple[float, float]] = field(default_factory=dict)


def predict_session(model, tokenizer, reader: SessionReader, split: str = "valid", batch_size: int = 32,
                    device: torch.device | str = "cpu", causal: bool = False,
                    causal_hz: float | None = None) -> SessionResult | None:
    """Stitched predictions (stitch.py) over the session's `split` intervals, scored on the samples
    inside both the split and the session's `eval` intervals, per behaviour; None when nothing scores.
    causal: each sample predicted from the window ending at it instead (causal.py; what `serve` does),
    at most `causal_hz` samples a second of them (None: every one)."""
    if not tokenizer.layout(reader).outputs:
        return None
    rows = iv.normalize(reader.intervals.get(split, iv.EMPTY))
    if not len(rows):
        return None
    if causal:
        decoded = causal_decode(model, tokenizer, reader, rows, batch_size=2 * batch_size, max_hz=causal_hz)
    else:
        decoded = decode_session(model, tokenizer, reader, rows, batch_size=batch_size, device=device)
    scored_in = iv.intersect(rows, reader.intervals.get("eval", rows))
    parts = []
    for d in decoded.values():
        if d.behaviour not in reader.behaviour_names:
            continue
        ok = iv.contains(scored_in, d.times) & (d.windows > 0)
        if not ok.any():
            continue
        target = np.asarray(reader.behaviour(d.behaviour)[1][ok], dtype=np.float64).reshape(int(ok.sum()), -1)
        if d.column is not None:
            target = target[:, d.column]
        parts.append((d.behaviour, d.times[ok], target, d.values[ok], score(d, ok, target)))
    if not parts:
        return None
    trials = reader.intervals.get("trials")
    per, per_ci = {}, {}
    for b_, t_, _, _, (value, ys, ps, kind) in parts:
        per[b_] = value
        per_ci[b_] = interval(ys, ps, kind, sample_groups(t_, scored_in, trials))
    b, t, y, p, _ = parts[0]
    ci = per_ci[b] if len(per) == 1 else (float("nan"), float("nan"))
    return SessionResult(reader.session_id, float(np.mean(list(per.values()))), b, t, y, p, per, ci, per_ci)


def score(d, ok: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, str]:
    """(figure, scored targets, scored predictions, kind): R2 for a continuous readout; R2 on
    (cos, sin) for an angle; accuracy for classes."""
    if d.kind == "angular":
        a = target[:, 0]
        y, p = np.stack([np.cos(a), np.sin(a)], axis=1), d.raw[ok]
        return r2_score(y, p), y, p, d.kind
    if d.kind == "categorical":
        y, p = np.round(target[:, :1]), d.values[ok, :1]
        return float(np.mean(p[:, 0] == y[:, 0])), y, p, d.kind
    return r2_score(target, d.values[ok]), target, d.values[ok], d.kind


def interval(y: np.ndarray, p: np.ndarray, kind: str, groups: np.ndarray) -> tuple[float, float]:
    """95 % bootstrap interval over groups: of R2, or of accuracy for a categorical readout."""
    if kind == "categorical":
        return bootstrap_accuracy(y, p, groups)
    return bootstrap_r2(y, p, groups)


def evaluate(model, tokenizer, corpus: Corpus, sessions: list[str], split: str = "valid",
             device: torch.device | str = "cpu", causal: bool = False, causal_hz: float | None = None
             ) -> dict[str, SessionResult]:
    out = {}
    for sid in sessions:
        res = predict_session(model, tokenizer, corpus.session(sid), split, device=device, causal=causal,
                              causal_hz=causal_hz)
        if res is not None:
            out[sid] = res
    return out


# a causal readout's validation decodes one window per sample scored: at most this many a second (a
# tick every 50 ms, serve's default period) keeps it a few times the stitched decoder's cost
CAUSAL_VALID_HZ = 20.0


class Evaluator:
    """The loop's validation callback: stitched R2 (causal R2 for a causal readout, at most
    CAUSAL_VALID_HZ samples a second) on this worker's share of the plan's validation sessions,
    gathered over workers; logs the mean and every session's R2, and (rank 0) a plot of decoded vs
    true behaviour for the first session. Returns {"valid_r2": mean}."""

    def __init__(self, tokenizer, corpus: str, sessions: list[str], dist, split: str = "valid",
                 causal: bool = False) -> None:
        self.tokenizer, self.corpus, self.dist, self.split, self.causal = tokenizer, corpus, dist, split, causal
        self.mine = sessions[dist.rank::dist.world]

    def __call__(self, model, step: int, sink) -> dict[str, float]:
        corpus = open_corpus(self.corpus)
        results = evaluate(model, self.tokenizer, corpus, self.mine, self.split, device=self.dist.device,
                           causal=self.causal, causal_hz=CAUSAL_VALID_HZ if self.causal else None)
        per_session = {k: v for g in self.dist.gather({k: v.r2 for k, v in results.items()}) for k, v in g.items()}
        mean = float(np.mean(list(per_session.values()))) if per_session else float("nan")
        sink.log({f"{self.split}_r2": mean, **{f"{self.split}_r2.{k}": v for k, v in per_session.items()}}, step)
        if results and self.dist.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                first = results[sorted(results)[0]]
                sink.artifact(plot_session(first, f"{tmp}/decoded_vs_true_step{step:06d}.png"), "plots")
        return {f"{self.split}_r2": mean}


def plot_session(res: SessionResult, path: str, seconds: float = 20.0, split: str = "validation") -> str:
    """Decoded vs true behaviour over the first `seconds` of scored samples (PNG)."""
    keep = res.times < res.times[0] + seconds
    panels = [(f"{res.behaviour}[{k}]", (res.times[keep], res.target[keep, k]), (res.times[keep], res.prediction[keep, k]))
              for k in range(min(res.target.shape[1], res.prediction.shape[1]))]
    return str(plot_traces(path, f"{res.session_id}: decoded vs true ({split}, R2 = {res.r2:.3f})", panels))
