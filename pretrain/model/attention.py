"""Attention backends over packed sequences: q [Tq, H, D], k/v [Tk, H, D] and per-sample lengths
in, packed [Tq, H, D] out, with attention only within each sample (block-diagonal). Nothing
else in the model knows which backend runs.

- `xformers`: `memory_efficient_attention` with a `BlockDiagonalMask` built from the lengths
  (CUDA; its dropout is fused).
- `sdpa`: PyTorch. When every sample has the same lengths (the latents: always) the packed
  tensors are a plain batch and no mask is needed. Otherwise (spikes) the form was chosen by
  measurement (bench/attention.py, fwd+bwd, medians of interleaved runs on this CPU):
  one padded batch with a key mask is 12 % slower than a per-sample loop at batch 16 x 256
  latents (531 vs 470 ms) and 3x faster at batch 32 x 128 (539 vs 1626 ms, the loop's
  per-call overhead); a block-diagonal boolean mask over all tokens (4.4-5.8 s) and nested
  jagged tensors (3.0-3.4 s) are far slower. With attention dropout in training on CPU, the
  blocked kernel of ops.py is used instead (3.8-4.4x faster than SDPA's math path).
- `naive`: explicit softmax per sample, for tests only.

Any backend, given `times` (a causal model: ModelConfig.causal), masks by time: a query sees only
the keys stamped at or before it (`SDPA._padded` with a full mask: one SDPA call, on CPU and
CUDA alike; the dropout kernel and xformers' block-diagonal masks do not take one).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from .ops import attend, packed_dropout_attention

Lens = list[int]
Times = tuple[torch.Tensor, torch.Tensor]  # (query times [Tq], key times [Tk]) of a time-causal attention
CAUSAL_EPS = 1e-6  # seconds: a key stamped this little after a query still counts as at its time (float rounding)


class Backend(Protocol):
    name: str

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: Lens, k_lens: Lens, *,
                 dropout_p: float = 0.0, training: bool = False, times: Times | None = None) -> torch.Tensor: ...


def naive(q, k, v, q_lens: Lens, k_lens: Lens, *, dropout_p: float = 0.0, training: bool = False,
          times: Times | None = None) -> torch.Tensor:
    """The definition, sample by sample (no dropout); with `times`, each query over the keys at or
    before it only, and zeros where there is none."""
    out, qo, ko = [], 0, 0
    for lq, lk in zip(q_lens, k_lens):
        qi, ki, vi = q[qo:qo + lq].transpose(0, 1), k[ko:ko + lk].transpose(0, 1), v[ko:ko + lk].transpose(0, 1)
        s = qi @ ki.transpose(-1, -2) / qi.shape[-1] ** 0.5
        if times is None:
            out.append((torch.softmax(s, dim=-1) @ vi).transpose(0, 1))
        else:
            seen = times[1][None, ko:ko + lk] <= times[0][qo:qo + lq, None] + CAUSAL_EPS  # [lq, lk]
            w = torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1).nan_to_num(0.0)
            out.append((w @ vi).transpose(0, 1))
        qo, ko = qo + lq, ko + lk
    return torch.cat(out)


naive.name = "naive"  # type: ignore[attr-defined]


def _batched(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B*L, H, D] -> [B, H, L, D] (a view)."""
    return x.view(b, x.shape[0] // b, *x.shape[1:]).transpose(1, 2)


def _pad_index(lens: Lens, width: int, device) -> torch.Tensor:
    """Positions of the packed tokens in a [B, width] padded layout."""
    return torch.cat([torch.arange(n, device=device) + i * width for i, n in enumerate(lens)])


class SDPA:
    name = "sdpa"

    def __init__(self, varlen: str = "padded") -> None:
        if varlen not in ("padded", "loop"):
            raise ValueError(f"varlen must be 'padded' or 'loop', got {varlen!r}")
        self.varlen = varlen

    def __call__(self, q, k, v, q_lens: Lens, k_lens: Lens, *, dropout_p: float = 0.0,
                 training: bool = False, times: Times | None = None) -> torch.Tensor:
        b = len(q_lens)
        if times is not None:  # a mask by time: the padded form with a full mask, whatever the lengths
            return self._padded(q, k, v, q_lens, k_lens, times, dropout_p=dropout_p, training=training)
        if training and dropout_p > 0.0 and not q.is_cuda:  # CPU has no fused dropout kernel: ops.py
            return packed_dropout_attention(q, k, v, q_lens, k_lens, dropout_p)
        kw = dict(dropout_p=dropout_p, training=training)
        if min(q_lens) == max(q_lens) and min(k_lens) == max(k_lens):
            o = attend(_batched(q, b), _batched(k, b), _batched(v, b), **kw)
            return o.transpose(1, 2).reshape(q.shape)
        if self.varlen == "loop":
            out, qo, ko = [], 0, 0
            for lq, lk in zip(q_lens, k_lens):
                o = attend(q[None, qo:qo + lq].transpose(1, 2), k[None, ko:ko + lk].transpose(1, 2),
                           v[None, ko:ko + lk].transpose(1, 2), **kw)
                out.append(o[0].transpose(0, 1))
                qo, ko = qo + lq, ko + lk
            return torch.cat(out)
        return self._padded(q, k, v, q_lens, k_lens, **kw)

    @staticmethod
    def _padded(q, k, v, q_lens: Lens, k_lens: Lens, times: Times | None = None, **kw) -> torch.Tensor:
        """One padded batch with a key mask ([B, 1, 1, Lk]); with `times`, a [B, 1, Lq, Lk] mask where
        query i sees key j only when key j's time is at or before query i's. A query that then sees no
        key (a latent before the first spike) gets zeros: it attends to every key inside the kernel so
        that nothing is NaN, and the zeroing stops any gradient from that."""
        b, h, d = len(q_lens), q.shape[1], q.shape[2]
        mq, mk = max(q_lens), max(k_lens)
        qi, ki = _pad_index(q_lens, mq, q.device), _pad_index(k_lens, mk, k.device)
        qp = q.new_zeros(b * mq, h, d).index_copy(0, qi, q) if mq * b != q.shape[0] else q
        kp = k.new_zeros(b * mk, h, d).index_copy(0, ki, k)
        vp = v.new_zeros(b * mk, h, d).index_copy(0, ki, v)
        mask = torch.zeros(b * mk, dtype=torch.bool, device=k.device).index_fill_(0, ki, True).view(b, 1, 1, mk)
        if times is not None:
            # in fp32 whatever the compute dtype: bf16 cannot tell milliseconds apart near 1 s
            q_t = torch.zeros(b * mq, device=q.device).index_copy(0, qi, times[0].float()).view(b, 1, mq, 1)
            k_t = torch.zeros(b * mk, device=k.device).index_copy(0, ki, times[1].float()).view(b, 1, 1, mk)
            mask = mask & (k_t <= q_t + CAUSAL_EPS)
            some = mask.any(-1, keepdim=True)
            mask = mask | ~some
        o = attend(_batched(qp, b), _batched(kp, b), _batched(vp, b), key_mask=mask, **kw)
        if times is not None:
            o = o * some.to(o.dtype)
        o = o.transpose(1, 2).reshape(b * mq, h, d)
        return o if mq * b == q.shape[0] else o.index_select(0, qi)


class XFormers:
    name = "xformers"

    def __init__(self) -> None:
        # deferred: xformers is the optional gpu extra, absent on CPU installs
        import xformers.ops  # noqa: F401  (fails here, not mid-training, when unavailable)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _mask(q_lens: tuple[int, ...], k_lens: tuple[int, ...]):
        # deferred: xformers is the optional gpu extra, absent on CPU installs
        from xformers.ops import fmha

        return fmha.BlockDiagonalMask.from_seqlens(list(q_lens), list(k_lens))

    def __call__(self, q, k, v, q_lens: Lens, k_lens: Lens, *, dropout_p: float = 0.0,
                 training: bool = False, times: Times | None = None) -> torch.Tensor:
        if times is not None:  # a mask by time is not block-diagonal: SDPA's masked kernel
            return SDPA._padded(q, k, v, q_lens, k_lens, times, dropout_p=dropout_p, training=training)
        # deferred: xformers is the optional gpu extra, absent on CPU installs
        import xformers.ops as xops

        bias = self._mask(tuple(q_lens), tuple(k_lens))
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias,
                                               p=dropout_p if training else 0.0)[0]


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    """True when xformers imports *and* runs a block-diagonal attention on CUDA in fp32 and bf16.
    Importing is not enough: a wheel built for another torch imports, warns, and then has no
    operator for any input (seen on an H200: xformers 0.0.35 for torch 2.10 under torch 2.11)."""
    try:
        backend = XFormers()
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.zeros(6, 2, 16, device="cuda", dtype=dtype)
            backend(q, q, q, [2, 4], [2, 4])
        return True
    except Exception:  # noqa: BLE001 - missing package, no CUDA, or kernels that do not load against this torch
        return False


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """`auto`: xformers on CUDA when it imports, else sdpa."""
    device = torch.device(device)
    if name == "auto":
        name = "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if name == "sdpa":
        return SDPA()
    if name == "xformers":
        return XFormers()
    if name == "naive":
        return naive
    raise ValueError(f"unknown attention backend {name!r} (auto | sdpa | xformers | naive)")
