"""Tokenized samples and packed batches.

A batch is flat: every sample's tokens concatenated, with per-sample lengths for the inputs
(spikes + start/end tokens), the latents and the output queries. Attention is block-diagonal
over those lengths, so no FLOP or byte is spent on padding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

SPIKE, START, END = 0, 1, 2  # token types


@dataclass
class Sample:
    """One window, tokenized (numpy, produced by the data service's workers)."""

    unit_index: np.ndarray  # int64 [Ni] global unit-vocabulary index
    input_time: np.ndarray  # float32 [Ni] seconds from the window start
    token_type: np.ndarray  # int64 [Ni] SPIKE | START | END
    latent_index: np.ndarray  # int64 [Nl]
    latent_time: np.ndarray  # float32 [Nl]
    output_time: np.ndarray  # float32 [No]
    output_readout: np.ndarray  # int64 [No] index into the model's readouts
    target: np.ndarray  # float32 [No, max readout dim] (unused columns are 0)
    weight: np.ndarray  # float32 [No] loss weight per output
    session_index: int  # session-vocabulary index
    session_id: str = ""
    t_start: float = 0.0  # absolute window start, to put predictions back in session time


@dataclass
class PackedBatch:
    unit_index: torch.Tensor
    input_time: torch.Tensor
    token_type: torch.Tensor
    latent_index: torch.Tensor
    latent_time: torch.Tensor
    output_time: torch.Tensor
    output_readout: torch.Tensor
    output_session: torch.Tensor  # session index of every output query
    target: torch.Tensor
    weight: torch.Tensor
    input_lens: list[int]
    latent_lens: list[int]
    output_lens: list[int]
    session_ids: list[str]
    t_starts: list[float]

    @property
    def size(self) -> int:
        return len(self.input_lens)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**kw)

    def cu_seqlens(self, which: str) -> torch.Tensor:
        """Cumulative lengths [B + 1] (int32), the varlen-attention convention."""
        lens = getattr(self, f"{which}_lens")
        return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


TENSORS = ("unit_index", "input_time", "token_type", "latent_index", "latent_time", "output_time", "output_readout",
           "output_session", "target", "weight")


def pack_numpy(samples: list[Sample]) -> dict:
    """The packed batch as numpy arrays and plain lists (cheap to pickle between processes)."""
    cat = np.concatenate
    out_lens = [len(s.output_time) for s in samples]
    return {
        "unit_index": cat([s.unit_index for s in samples]),
        "input_time": cat([s.input_time for s in samples]),
        "token_type": cat([s.token_type for s in samples]),
        "latent_index": cat([s.latent_index for s in samples]),
        "latent_time": cat([s.latent_time for s in samples]),
        "output_time": cat([s.output_time for s in samples]),
        "output_readout": cat([s.output_readout for s in samples]),
        "output_session": np.repeat(np.array([s.session_index for s in samples], dtype=np.int64), out_lens),
        "target": cat([s.target for s in samples]),
        "weight": cat([s.weight for s in samples]),
        "input_lens": [len(s.unit_index) for s in samples],
        "latent_lens": [len(s.latent_index) for s in samples],
        "output_lens": out_lens,
        "session_ids": [s.session_id for s in samples],
        "t_starts": [s.t_start for s in samples],
    }


def from_numpy(d: dict) -> PackedBatch:
    return PackedBatch(**{k: torch.from_numpy(np.ascontiguousarray(d[k])) for k in TENSORS},
                       **{k: list(d[k]) for k in ("input_lens", "latent_lens", "output_lens", "session_ids", "t_starts")})


def pack(samples: list[Sample]) -> PackedBatch:
    return from_numpy(pack_numpy(samples))
