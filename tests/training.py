"""A minimal in-process training loop for model tests (the real loop, with the data service,
DeepSpeed and Ray, is pretrain/train.py's job)."""

from __future__ import annotations

import numpy as np
import torch

from data_service.reader import Corpus
from pretrain.batch import pack
from pretrain.loss import weighted_mse
from pretrain.optim import OptimConfig, build_optimizer


def windows(c: Corpus, split: str, n: int, rng: np.random.Generator, length: float = 1.0) -> list[tuple[str, float]]:
    """n random (session, start) with the whole window inside the session's `split` domain."""
    out = []
    ids = c.session_ids
    while len(out) < n:
        sid = ids[rng.integers(len(ids))]
        rows = c.session(sid).intervals[split]
        rows = rows[rows[:, 1] - rows[:, 0] >= length]
        if not len(rows):
            continue
        a, b = rows[rng.integers(len(rows))]
        out.append((sid, float(rng.uniform(a, b - length))))
    return out


def batches(c: Corpus, tok, wins, batch_size: int):
    for i in range(0, len(wins), batch_size):
        samples = []
        for sid, t0 in wins[i:i + batch_size]:
            r = c.session(sid)
            samples.append(tok(r.read_window(t0, t0 + 1.0), r))
        yield pack(samples)


def sgd_step(model, opt, b) -> float:
    """One optimisation step on batch b; returns the loss."""
    loss, _ = weighted_mse(model(b), b, model.readout_names)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def train(model, tok, c: Corpus, steps: int, batch_size: int = 16, lr: float = 2e-3, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    opt = build_optimizer(model, OptimConfig(lr=lr))
    model.train()
    losses = []
    for _ in range(steps):
        (b,) = batches(c, tok, windows(c, "train", batch_size, rng), batch_size)
        losses.append(sgd_step(model, opt, b))
    return losses


@torch.no_grad()
def r2(model, tok, c: Corpus, n: int = 200, seed: int = 1) -> float:
    """R2 of velocity over n random valid-split windows (pooled over sessions, both dims averaged)."""
    model.eval()
    preds, ys = [], []
    for b in batches(c, tok, windows(c, "valid", n, np.random.default_rng(seed)), 32):
        out = model(b)[model.readout_names[0]]
        preds.append(out)
        ys.append(b.target[:, : out.shape[1]])
    p, y = torch.cat(preds), torch.cat(ys)
    return float((1 - ((y - p) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)).mean())
