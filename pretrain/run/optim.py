"""AdamW (default) or LAMB, with lazy updates for the unit and session embeddings; the LR schedule.

With plain AdamW an embedding row that a batch does not touch still moves: its first moment is
non-zero from earlier batches, and weight decay shrinks it. Units and sessions not in a batch
must not drift, so their group is *lazy*: only entries whose gradient is non-zero update their
moments and their value (as torch's SparseAdam and the reference's SparseLamb do), and it has
no weight decay. The rule is per element, so it also holds when DeepSpeed's ZeRO flattens the
group into one partition. LAMB (You et al., 2019) scales each tensor's Adam step by the trust
ratio ||w|| / ||step||, clipped to 10 as in the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    algo: str = "adamw"  # adamw | lamb
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    trust_clip: float = 10.0


class LazyAdamW(torch.optim.Optimizer):
    """AdamW / LAMB; a param group with `lazy=True` leaves entries with zero gradient untouched."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 algo: str = "adamw", trust_clip: float = 10.0) -> None:
        if algo not in ("adamw", "lamb"):
            raise ValueError(f"algo must be adamw or lamb, got {algo!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, algo=algo,
                                      trust_clip=trust_clip, lazy=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                st["step"] += 1
                m, v, t = st["m"], st["v"], st["step"]
                c1, c2 = 1 - b1 ** t, 1 - b2 ** t
                if g["lazy"]:
                    on = grad != 0
                    gs = grad[on]
                    m[on] = m[on] * b1 + gs * (1 - b1)
                    v[on] = v[on] * b2 + gs * gs * (1 - b2)
                    upd = (m[on] / c1) / ((v[on] / c2).sqrt() + g["eps"])
                    if g["algo"] == "lamb":
                        upd = upd * _trust(p[on], upd, g["trust_clip"])
                    p[on] = p[on] - g["lr"] * upd
                    continue
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                upd = (m / c1) / ((v / c2).sqrt_().add_(g["eps"]))
                if g["algo"] == "lamb":
                    if g["weight_decay"]:
                        upd.add_(p, alpha=g["weight_decay"])
                    p.add_(upd, alpha=-g["lr"] * _trust(p, upd, g["trust_clip"]))
                else:
                    if g["weight_decay"]:
                        p.mul_(1 - g["lr"] * g["weight_decay"])
                    p.add_(upd, alpha=-g["lr"])
        return loss


def _trust(w: torch.Tensor, upd: torch.Tensor, clip: float) -> float:
    wn, un = float(w.norm()), float(upd.norm())
    return min(wn / un, clip) if wn > 0 and un > 0 else 1.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Three groups: decayed weights; biases and norms (no decay); embeddings (lazy, no decay):
    the unit and session vocabularies and the readout embedding (a readout absent from a batch
    must not drift either)."""
    emb = list(model.embedding_parameters())
    if getattr(model, "readout_emb", None) is not None:
        emb.append(model.readout_emb.weight)
    lazy = {id(p) for p in emb}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in lazy or not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "name": "biases_norms"},
        {"params": [p for p in emb if p.requires_grad], "weight_decay": 0.0, "lazy": True,
         "name": "embeddings"},
    ]
    return [g for g in groups if g["params"]]  # a frozen model part leaves a group empty (adaptation)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> LazyAdamW:
    return LazyAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, algo=cfg.algo, trust_clip=cfg.trust_clip)


def warmup_cosine(step: int, steps: int, warmup: int, final_ratio: float) -> float:
    """The learning-rate factor at `step`: linear warmup over `warmup` steps, then cosine decay to
    `final_ratio` at the last of `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
