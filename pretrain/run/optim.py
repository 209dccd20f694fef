"""AdamW (default) or LAMB, with lazy updates for the unit and session embeddings; the LR schedule.

With plain AdamW an embedding row that a batch does not touch still moves: its first moment is
non-zero from earlier batches, and weight decay shrinks it. Units and sessions not in a batch
must not drift, so their group is *lazy*: only entries whose gradient is non-zero update their
moments and their value (as torch's SparseAdam and the reference's SparseLamb do), and it has
no weight decay. The rule is per element, so it also holds when DeepSpeed's ZeRO flattens the
group into one partition. LAMB (You et al., 2019) scales the Adam step by the trust ratio
||w|| / ||step||, clipped to 10 as in the reference, taken over each param group by default (what
ZeRO's flat groups gave every LAMB run before the choice was made explicit) or per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

TRUST = ("group", "tensor")  # LAMB's trust ratio: over a param group, or per tensor (layer)


@dataclass
class OptimConfig:
    algo: str = "adamw"  # adamw | lamb
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    trust_clip: float = 10.0
    # LAMB's trust ratio over each param group (the recipe's: configs/real.yaml) or per tensor (You et al.'s;
    # needs train.zero_stage=0 and fp32): bench/RESULTS.md, issue 27
    trust: str = "group"


class LazyAdamW(torch.optim.Optimizer):
    """AdamW / LAMB; a param group with `lazy=True` leaves entries with zero gradient untouched.

    LAMB's trust ratio is taken per param group (`trust="group"`: ||w|| / ||step|| over all of a
    group's tensors, the recipe's and the default) or per tensor (`"tensor"`: each layer's own, as
    in You et al.). DeepSpeed's ZeRO (stage >= 1) and bf16 optimizers hand this optimizer one flat
    slice of each group per worker, so a group's norms are summed over the slices of every worker
    (one all-reduce of two numbers a group): the step does not depend on the number of workers or
    on how the group is laid out. Per-tensor trust needs the tensors themselves (ZeRO stage 0, fp32)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 algo: str = "adamw", trust_clip: float = 10.0, trust: str = "group") -> None:
        if algo not in ("adamw", "lamb"):
            raise ValueError(f"algo must be adamw or lamb, got {algo!r}")
        if trust not in TRUST:
            raise ValueError(f"trust must be one of {TRUST}, got {trust!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, algo=algo,
                                      trust_clip=trust_clip, trust=trust, lazy=False))
        # the tensors as the model has them: anything else this optimizer is asked to step is a flat slice
        self._own = {id(p) for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if g["algo"] == "lamb" and g["trust"] == "group":  # every step first: the ratio is the group's
                steps = [(p, *self._direction(p, g)) for p in params]
                for (p, on, upd), r in zip(steps, self._group_ratio(g, steps)):
                    self._apply(p, on, upd, g, r)
                continue
            for p in params:  # one tensor at a time: no more than one step held
                on, upd = self._direction(p, g)
                self._apply(p, on, upd, g, self._tensor_ratio(p, on, upd, g) if g["algo"] == "lamb" else 1.0)
        return loss

    @staticmethod
    def _apply(p: torch.Tensor, on: torch.Tensor | None, upd: torch.Tensor, g: dict, r: float) -> None:
        lamb = g["algo"] == "lamb"
        if on is not None:
            p[on] = p[on] - g["lr"] * (upd * r if lamb else upd)
            return
        if not lamb and g["weight_decay"]:
            p.mul_(1 - g["lr"] * g["weight_decay"])
        p.add_(upd, alpha=-g["lr"] * r)

    def _direction(self, p: torch.Tensor, g: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Adam's bias-corrected step for `p` (LAMB's with its weight decay): (None, step), or in a lazy
        group (the touched entries, their step); the moments are updated."""
        grad, st = p.grad, self.state[p]
        b1, b2 = g["betas"]
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
            return on, (m[on] / c1) / ((v[on] / c2).sqrt() + g["eps"])
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        upd = (m / c1) / ((v / c2).sqrt_().add_(g["eps"]))
        if g["algo"] == "lamb" and g["weight_decay"]:
            upd.add_(p, alpha=g["weight_decay"])
        return None, upd

    def _tensor_ratio(self, p: torch.Tensor, on: torch.Tensor | None, upd: torch.Tensor, g: dict) -> float:
        """LAMB's trust ratio of one tensor (You et al.'s per-layer rule)."""
        if id(p) not in self._own:
            raise RuntimeError("LAMB with per-tensor trust is stepping a flattened slice of its group (DeepSpeed "
                               "ZeRO stage >= 1 or its bf16 optimizer): run it with train.zero_stage=0 and fp32")
        return _trust(p if on is None else p[on], upd, g["trust_clip"])

    def _group_ratio(self, g: dict, steps: list) -> list[float]:
        """LAMB's trust ratio over the whole group, for each of its steps."""
        flat = any(id(p) not in self._own for p in g["params"])
        pairs = [(p if on is None else p[on], upd) for p, on, upd in steps]
        world = dist.get_world_size() if flat and dist.is_available() and dist.is_initialized() else 1
        if len(pairs) == 1 and world == 1:  # one tensor (a group ZeRO flattened on one worker): its norms as such
            return [_trust(*pairs[0], g["trust_clip"])]
        sq = torch.tensor([sum(float(w.double().square().sum()) for w, _ in pairs),
                           sum(float(u.double().square().sum()) for _, u in pairs)], dtype=torch.float64)
        if world > 1:  # each worker holds a slice of the group (ZeRO's padding is zeros: it adds nothing)
            dist.all_reduce(sq)
        wn, un = sq.sqrt().tolist()
        r = min(wn / un, g["trust_clip"]) if wn > 0 and un > 0 else 1.0
        return [r] * len(steps)


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
                     weight_decay=cfg.weight_decay, algo=cfg.algo, trust_clip=cfg.trust_clip,
                     trust=cfg.trust)


def warmup_cosine(step: int, steps: int, warmup: int, final_ratio: float) -> float:
    """The learning-rate factor at `step`: linear warmup over `warmup` steps, then cosine decay to
    `final_ratio` at the last of `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
