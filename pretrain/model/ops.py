"""Dropout and dropout-attention that are cheap on a CPU.

Measured here (bench/model.py, torch 2.13 CPU): `bernoulli_` draws a dropout mask at ~9 ns per
element and PyTorch's CPU flash-attention kernel has no dropout, so with the reference's
attention dropout (0.2) every attention falls back to the math path, storing float masks:
a quarter of a poyo-11.8M step is mask generation. Here a mask costs one 64-bit random word per
four elements (each 16-bit slice is uniform), drop probability exact to 1/65536, and only a
bool mask is saved for backward. On CUDA, PyTorch's fused dropout is used instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd import Function

_I16_SPAN = 1 << 16


def quantized_p(p: float) -> float:
    """The drop probability the 16-bit mask actually uses."""
    return round(p * _I16_SPAN) / _I16_SPAN


class _MaskStream:
    """Float keep-masks (0 or 1) drawn from a seeded SFC64 stream: ~2x cheaper per element than
    torch.randint's mt19937 here, and a float mask multiplies ~10x faster than masked_fill with a
    bool one (bench/model.py). Re-created from the same seed, it gives the same masks again."""

    def __init__(self, seed: int, p: float) -> None:
        self.bits = np.random.SFC64(seed)
        self.threshold = -(1 << 15) + round(p * _I16_SPAN)

    def next(self, shape: tuple[int, ...], device) -> torch.Tensor:
        n = math.prod(shape)
        words = torch.from_numpy(self.bits.random_raw((n + 3) // 4).view(np.int64))
        keep = words.view(torch.int16)[:n].ge(self.threshold).view(shape)
        return keep.to(device=device, dtype=torch.float32)


class _Dropout(Function):
    """x * mask / (1 - p), the mask regenerated from a seed in backward (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed, ctx.scale = p, seed, 1.0 / (1.0 - quantized_p(p))
        return x * _MaskStream(seed, p).next(x.shape, x.device).to(x.dtype).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * _MaskStream(ctx.seed, ctx.p).next(g.shape, g.device).to(g.dtype).mul_(ctx.scale), None, None


class _GegluDropout(Function):
    """GEGLU (h * gelu(gate), with h and gate the halves of x) followed by dropout, saving only x:
    gelu(gate) and the mask are recomputed in backward (less memory per feed-forward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        h, gate = x.chunk(2, dim=-1)
        y = F.gelu(gate).mul_(h)
        ctx.p, ctx.seed, ctx.scale = p, seed, 1.0 / (1.0 - quantized_p(p))
        if p > 0.0:
            y.mul_(_MaskStream(seed, p).next(y.shape, y.device).to(y.dtype).mul_(ctx.scale))
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        h, gate = x.chunk(2, dim=-1)
        if ctx.p > 0.0:
            g = g * _MaskStream(ctx.seed, ctx.p).next(g.shape, g.device).to(g.dtype).mul_(ctx.scale)
        dx = torch.empty_like(x)  # both halves written in place: no concatenation (~2 % of a step)
        dh, dgate = dx.chunk(2, dim=-1)
        torch.mul(g, F.gelu(gate), out=dh)
        torch.ops.aten.gelu_backward.grad_input(g * h, gate, grad_input=dgate)
        return dx, None, None


def geglu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """h * gelu(gate) then dropout, for x = [h, gate] along the last dim."""
    p = p if training else 0.0
    if x.is_cuda or not torch.is_grad_enabled() or not x.requires_grad:
        h, gate = x.chunk(2, dim=-1)
        return dropout(h * F.gelu(gate), p, training)
    return _GegluDropout.apply(x, p, int(torch.randint(0, 1 << 62, (1,))) if p > 0 else 0)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p <= 0.0:
        return x
    if x.is_cuda:
        return F.dropout(x, p, True)
    return _Dropout.apply(x, p, int(torch.randint(0, 1 << 62, (1,))))


class Dropout(torch.nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


BLOCK_ELEMENTS = 1 << 19  # score-block size (floats) kept in cache: 2 MB


def _blocks(q_lens, k_lens, heads: int):
    """(q offset, q len, k offset, k len, first head, last head) blocks: one sample at a time, with
    as many heads as keep the [heads, lq, lk] score block near BLOCK_ELEMENTS."""
    qo = ko = 0
    for lq, lk in zip(q_lens, k_lens):
        per_head = max(lq * lk, 1)
        hg = max(1, min(heads, BLOCK_ELEMENTS // per_head))
        for h0 in range(0, heads, hg):
            yield qo, lq, ko, lk, h0, min(heads, h0 + hg)
        qo, ko = qo + lq, ko + lk


def _heads_first(x: torch.Tensor, o: int, n: int, h0: int, h1: int) -> torch.Tensor:
    return x[o:o + n, h0:h1].transpose(0, 1)  # [hg, n, D] view of packed [T, H, D]


class _PackedDropoutAttention(Function):
    """Attention with dropout on the probabilities over packed variable-length samples, computed
    block by block (one sample, a group of heads) so every [heads, lq, lk] block stays in cache.

    Nothing of size lq x lk is kept for backward: only q, k and v are saved; scores, probabilities
    and the softmax-gradient row term are recomputed per block, and the dropout masks are regenerated from a seed drawn once
    per call from torch's default generator (so torch.manual_seed makes runs repeatable). On this
    CPU a pass over a [16, 8, 256, 256] float tensor costs ~30 ms from memory; in cache it is a
    fraction of that, which is worth the extra q k^T matmul and softmax in backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_lens, k_lens, p: float, seed: int):
        scale = q.shape[-1] ** -0.5
        drop_scale = 1.0 / (1.0 - quantized_p(p))
        qs, vs = q * scale, v * drop_scale
        out = torch.empty_like(q)
        masks = _MaskStream(seed, p)
        for qo, lq, ko, lk, h0, h1 in _blocks(q_lens, k_lens, q.shape[1]):
            s = torch.bmm(_heads_first(qs, qo, lq, h0, h1), _heads_first(k, ko, lk, h0, h1).transpose(1, 2))
            prob = torch.softmax(s, dim=-1).mul_(masks.next(s.shape, s.device).to(s.dtype))
            _heads_first(out, qo, lq, h0, h1).copy_(torch.bmm(prob, _heads_first(vs, ko, lk, h0, h1)))
        ctx.save_for_backward(qs, k, vs)
        ctx.q_lens, ctx.k_lens, ctx.p, ctx.seed = q_lens, k_lens, p, seed
        ctx.scale, ctx.drop_scale = scale, drop_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qs, k, vs = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(vs)
        masks = _MaskStream(ctx.seed, ctx.p)
        for qo, lq, ko, lk, h0, h1 in _blocks(ctx.q_lens, ctx.k_lens, qs.shape[1]):
            q_b, k_b = _heads_first(qs, qo, lq, h0, h1), _heads_first(k, ko, lk, h0, h1)
            do_b = _heads_first(dout, qo, lq, h0, h1)
            prob = torch.softmax(torch.bmm(q_b, k_b.transpose(1, 2)), dim=-1)
            dropped = prob * masks.next(prob.shape, prob.device).to(prob.dtype)  # P * keep
            _heads_first(dv, ko, lk, h0, h1).copy_(torch.bmm(dropped.transpose(1, 2), do_b))
            dp = torch.bmm(do_b, _heads_first(vs, ko, lk, h0, h1).transpose(1, 2))  # d(P * keep), scaled
            row = (dp * dropped).sum(dim=-1, keepdim=True)  # rowsum(dP * P), without saving the output
            ds = dp.mul_(dropped).addcmul_(prob, row, value=-1.0)  # P * (keep * dP~ - row)
            _heads_first(dq, qo, lq, h0, h1).copy_(torch.bmm(ds, k_b))
            _heads_first(dk, ko, lk, h0, h1).copy_(torch.bmm(ds.transpose(1, 2), q_b))
        # q was used scaled and v scaled by the dropout scale: chain rule back to the inputs
        return dq.mul_(ctx.scale), dk, dv.mul_(ctx.drop_scale), None, None, None, None


def packed_dropout_attention(q, k, v, q_lens, k_lens, p: float) -> torch.Tensor:
    """q [Tq, H, D], k/v [Tk, H, D] packed; attention within samples, dropout p on probabilities."""
    seed = int(torch.randint(0, (1 << 62), (1,)))
    return _PackedDropoutAttention.apply(q, k, v, list(q_lens), list(k_lens), p, seed)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0, training: bool = False,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batched attention [B, H, Lq, D] x [B, H, Lk, D] without dropout on CPU (PyTorch SDPA: its
    fused flash kernel), or with SDPA's own dropout on CUDA. key_mask [B, 1, 1, Lk] (or [B, 1, Lq, Lk]),
    True = attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p if training else 0.0)
