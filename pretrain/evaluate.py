"""Validation as the reference does it: 50 %-overlapping windows over whole validation intervals,
predictions of a behaviour sample averaged over the windows that contain it (stitching), and R2
per session over the samples inside both the split and the session's `eval` intervals (reach
periods, ...), averaged uniformly over output dims; the headline is the mean over sessions.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from data_service import intervals as iv
from data_service.reader import Corpus, SessionReader, open_corpus


@dataclass
class SessionResult:
    session_id: str
    r2: float
    behaviour: str
    times: np.ndarray  # absolute times of the scored samples
    target: np.ndarray  # (n, d), in the session's units
    prediction: np.ndarray  # (n, d), in the session's units


def window_starts(rows: np.ndarray, window: float, domain: tuple[float, float]) -> np.ndarray:
    """Starts of windows, stride window/2, covering every interval (the last flush with its end);
    an interval shorter than a window gets one window centred on it, kept inside the session."""
    starts = []
    for a, b in rows:
        if b - a <= window:
            starts.append(min(max(a - (window - (b - a)) / 2, domain[0]), domain[1] - window))
        else:
            s = np.arange(a, b - window, window / 2)
            starts.extend(s.tolist() + [b - window])
    return np.unique(np.round(np.asarray(starts, dtype=np.float64), 9))


def r2_score(y: np.ndarray, p: np.ndarray) -> float:
    ss_res = ((y - p) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return float(np.mean(1 - ss_res / np.maximum(ss_tot, 1e-12)))


@torch.no_grad()
def predict_session(model, tokenizer, reader: SessionReader, split: str = "valid", batch_size: int = 32,
                    device: torch.device | str = "cpu") -> SessionResult | None:
    """Stitched predictions of the session's first readout behaviour over its `split` intervals."""
    layout = tokenizer.layout(reader)
    if not layout.outputs:
        return None
    readout, name, dims, shift, scale = layout.outputs[0]
    window = tokenizer.cfg.geometry.window_s
    rows = iv.normalize(reader.intervals[split])
    if not len(rows):
        return None
    times, values = reader.behaviour(name)
    scored = iv.contains(iv.intersect(rows, reader.intervals.get("eval", rows)), times)
    if not scored.any():
        return None
    total = np.zeros((len(times), dims))
    count = np.zeros(len(times))
    starts = window_starts(rows, window, (float(reader.domain[0, 0]), float(reader.domain[-1, 1])))
    was_training = model.training
    model.eval()
    for i in range(0, len(starts), batch_size):
        host = tokenizer.pack([(reader.read_window(t0, t0 + window), reader, None) for t0 in starts[i:i + batch_size]])
        pred = model(host.to(device))[model.readout_names[readout]].float().cpu().numpy()
        mine = host.output_readout == readout
        sel = mine if len(model.readout_names) > 1 else slice(None)
        out_t = host.output_time[sel].astype(np.float64)
        per_window = np.bincount(np.repeat(np.arange(host.size), host.output_lens)[mine], minlength=host.size)
        first = np.repeat(host.t_starts, per_window)
        idx = np.clip(np.searchsorted(times, first + out_t - 1e-6), 0, len(times) - 1)
        np.add.at(total, idx, pred)
        np.add.at(count, idx, 1)
    model.train(was_training)
    ok = scored & (count > 0)
    pred = total[ok] / count[ok, None] * scale[:dims] + shift[:dims]  # back to the session's units
    target = np.asarray(values[ok], dtype=np.float64)
    return SessionResult(reader.session_id, r2_score(target, pred), name, times[ok], target, pred)


def evaluate(model, tokenizer, corpus: Corpus, sessions: list[str], split: str = "valid",
             device: torch.device | str = "cpu") -> dict[str, SessionResult]:
    out = {}
    for sid in sessions:
        res = predict_session(model, tokenizer, corpus.session(sid), split, device=device)
        if res is not None:
            out[sid] = res
    return out


class Evaluator:
    """The loop's validation callback: stitched R2 on this worker's share of the plan's validation
    sessions, gathered over workers; logs the mean and every session's R2, and (rank 0) a plot of
    decoded vs true behaviour for the first session. Returns {"valid_r2": mean}."""

    def __init__(self, tokenizer, corpus: str, sessions: list[str], dist, split: str = "valid") -> None:
        self.tokenizer, self.corpus, self.dist, self.split = tokenizer, corpus, dist, split
        self.mine = sessions[dist.rank::dist.world]

    def __call__(self, model, step: int, sink) -> dict[str, float]:
        corpus = open_corpus(self.corpus)
        results = evaluate(model, self.tokenizer, corpus, self.mine, self.split, device=self.dist.device)
        per_session = {k: v for g in self.dist.gather({k: v.r2 for k, v in results.items()}) for k, v in g.items()}
        mean = float(np.mean(list(per_session.values()))) if per_session else float("nan")
        sink.log({f"{self.split}_r2": mean, **{f"{self.split}_r2.{k}": v for k, v in per_session.items()}}, step)
        if results and self.dist.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                first = results[sorted(results)[0]]
                sink.artifact(plot_session(first, f"{tmp}/decoded_vs_true_step{step:06d}.png"), "plots")
        return {f"{self.split}_r2": mean}


def plot_session(res: SessionResult, path: str, seconds: float = 20.0) -> str:
    """Decoded vs true behaviour over the first `seconds` of scored samples (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = res.times < res.times[0] + seconds
    d = res.target.shape[1]
    fig, axes = plt.subplots(d, 1, figsize=(10, 2.2 * d), sharex=True)
    axes = np.atleast_1d(axes)
    for k, ax in enumerate(axes):
        ax.plot(res.times[keep], res.target[keep, k], ".", ms=2, color="0.3", label="true")
        ax.plot(res.times[keep], res.prediction[keep, k], ".", ms=2, color="tab:red", label="decoded")
        ax.set_ylabel(f"{res.behaviour}[{k}]")
    axes[0].set_title(f"{res.session_id}: decoded vs true (validation, R2 = {res.r2:.3f})")
    axes[0].legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
