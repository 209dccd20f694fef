"""Linear warm start of the unit embeddings, from the training split.

Why: POYO starts at a saddle. A unit's embedding is useful only once the layers above it read
it, and those layers learn only from embeddings that already say something, so from random
embeddings the loss sits at "predict the mean" for a long time (bench/RESULTS.md: hundreds to
thousands of steps on our synthetic corpora, the whole of a 10-minute CPU run). Writing into
each unit's embedding, before training, the weights of a per-session linear decoder (its recent
spike counts -> the behaviour the readouts decode) gives the shared layers a direction to read at
once; everything, these coordinates included, is then trained as usual.

    table = unit_directions(corpus, sessions, plan.tokenizer, WarmStartConfig("ridge"))
    apply_warm_start(model, table)

(`pretrain.run.plan.build_plan` does this once on the driver; the table travels in the plan.)

The decoder is a ridge regression per session on square-rooted spike counts in `bin_s` bins,
summed over the `history_s` before each bin (activity leads movement), fitted only on bins
inside the session's `train` intervals; its weights are scaled per session so that the largest
is `scale`, and written into the first coordinates of the embedding (one per readout output,
in the model's readout order). Units of sessions without a decodable behaviour keep their random
embedding. Cost: one pass over each training session's spikes (seconds for the demo corpus;
for thousands of sessions prefer `none`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from data_service import intervals as iv
from data_service.reader import Corpus, SessionReader

from ..tokens.config import TokenizerConfig


@dataclass
class WarmStartConfig:
    method: str = "none"  # none | ridge
    scale: float = 0.5  # largest |coordinate| written per session (embeddings start at ~0.02)
    bin_s: float = 0.05
    history_s: float = 0.2
    ridge: float = 100.0  # on standardised features

    def __post_init__(self) -> None:
        if self.method not in ("none", "ridge"):
            raise ValueError(f"warm_start.method must be none or ridge, got {self.method!r}")


def _session_directions(r: SessionReader, columns: list[tuple[str, int, np.ndarray, np.ndarray]],
                        cfg: WarmStartConfig, train: np.ndarray | None = None) -> np.ndarray | None:
    """(units, sum of dims) ridge weights for one session fitted on `train` (default: its train
    split), or None if it has no training data."""
    train = r.intervals.get("train") if train is None else train
    if train is None or not len(train):
        return None
    train = iv.normalize(train)
    lo, hi = float(r.domain[0, 0]), float(r.domain[-1, 1])
    n_bins = int((hi - lo) // cfg.bin_s)
    history = max(1, int(round(cfg.history_s / cfg.bin_s)))
    if n_bins <= history + 1:
        return None
    times, units = r.spikes()
    counts = np.zeros((n_bins, len(r.unit_ids)))
    b = ((times - lo) // cfg.bin_s).astype(np.int64)
    ok = (b >= 0) & (b < n_bins)
    np.add.at(counts, (b[ok], units[ok]), 1.0)
    csum = np.cumsum(np.sqrt(counts), axis=0)
    feats = np.zeros_like(csum)  # bin i: the `history` bins before it
    feats[history + 1:] = csum[history:-1] - csum[:-history - 1]
    feats[1:history + 1] = csum[:history]
    centres = lo + (np.arange(n_bins) + 0.5) * cfg.bin_s
    use = iv.contains(train, centres)
    use[:history] = False
    if use.sum() < 10:
        return None
    targets = []
    for name, dims, shift, scale, kind, col in columns:
        if name is None or kind == "categorical":  # no direction to write for it: zeros
            targets.append(np.zeros((int(use.sum()), dims)))
            continue
        t, v = r.behaviour(name)
        inside = iv.contains(train, t)  # interpolate from train samples only: no label leaks in at edges
        t, v = t[inside], np.asarray(v[inside], dtype=np.float64).reshape(int(inside.sum()), -1)
        if len(t) < 2:
            return None
        if col is not None:
            v = v[:, col]
        if kind == "angular":
            v = np.stack([np.cos(v[:, 0]), np.sin(v[:, 0])], axis=1)
        y = np.stack([np.interp(centres[use], t, v[:, d]) for d in range(dims)], axis=1)
        targets.append((y - shift[:dims]) / scale[:dims])  # the scale the model is trained on
    y = np.concatenate(targets, axis=1)
    x = feats[use]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    w = np.linalg.solve(x.T @ x + cfg.ridge * np.eye(x.shape[1]), x.T @ (y - y.mean(0)))
    peak = np.abs(w).max()
    return w / peak * cfg.scale if peak > 0 else None


def unit_directions(corpus: Corpus, sessions: Iterable[str], tokenizer: TokenizerConfig, cfg: WarmStartConfig,
                    progress: bool = False, within: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(units of `sessions` in vocabulary order, sum of readout dims) float32; NaN rows: left random.
    The readouts' behaviours and target scales are the tokenizer's, so the directions are in the
    units the model is trained in; `within` (session -> intervals) replaces a session's train split
    (the labelled part, when adapting)."""
    sessions = list(sessions)
    it = sessions
    if progress:
        # deferred: importing rich only when used keeps start-up light
        from rich.progress import track

        it = track(sessions, description="warm start (ridge per session)", transient=True)
    rows = []
    width = sum(ro.dims for ro in tokenizer.readouts)
    for sid in it:
        r = corpus.session(sid)
        columns = []
        for ro in tokenizer.readouts:
            b = ro.pick(r.behaviour_names, tokenizer.not_decoded.get(sid, ()))
            if b is None:
                columns.append((None, ro.dims, None, None, ro.kind, None))
                continue
            col = ro.select(list(r.attrs["behaviour"][b]["columns"]), sid, b)
            columns.append((b, ro.dims, *tokenizer.normaliser(sid, b, ro.dims, ro.dims, ro.kind), ro.kind, col))
        train = within.get(sid) if within else None
        usable = any(c[0] is not None and c[4] != "categorical" for c in columns)
        w = _session_directions(r, columns, cfg, train) if usable else None
        rows.append(np.full((len(r.unit_ids), width), np.nan) if w is None else w)
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32)


@torch.no_grad()
def apply_warm_start(model, table: np.ndarray) -> None:
    """Write the table into the first coordinates of the unit embeddings (rows in vocabulary order)."""
    weight = model.unit_emb.weight
    if table.shape[0] != weight.shape[0] or table.shape[1] > weight.shape[1]:
        raise ValueError(f"warm-start table {table.shape} does not fit the unit embeddings {tuple(weight.shape)}")
    ok = ~np.isnan(table).any(axis=1)
    idx = torch.from_numpy(np.flatnonzero(ok)).to(weight.device)
    weight[idx, :table.shape[1]] = torch.from_numpy(table[ok]).to(weight.device, weight.dtype)
