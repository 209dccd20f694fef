"""The packed batch: the one form in which tokens travel from the tokenizer to the model.

A batch is flat: every window's tokens concatenated, with per-window lengths for the inputs
(spikes + start/end tokens), the latents and the output queries. Attention is block-diagonal
over those lengths, so no FLOP or byte is spent on padding. The tokenizer makes it with numpy
arrays (cheap to pickle between processes); `to(device)` gives the torch form the model takes.
Training, evaluation, the registered model and decoding all use this one type; its fields are
listed here only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Union

import numpy as np
import torch

SPIKE, START, END = 0, 1, 2  # token types

Array = Union[np.ndarray, torch.Tensor]


@dataclass
class PackedBatch:
    # one row per input token
    unit_index: Array  # int64: global unit-vocabulary index
    input_time: Array  # float32: seconds from the window start
    token_type: Array  # int64: SPIKE | START | END
    # one row per latent
    latent_index: Array  # int64
    latent_time: Array  # float32
    # one row per output query
    output_time: Array  # float32
    output_readout: Array  # int64: index into the model's readouts
    output_session: Array  # int64: session-vocabulary index
    target: Array  # float32 [n, max readout dim] (unused columns are 0)
    weight: Array  # float32: loss weight
    # one entry per window
    input_lens: list[int]
    latent_lens: list[int]
    output_lens: list[int]
    session_ids: list[str]
    t_starts: list[float]  # absolute window starts, to put predictions back in session time

    @property
    def size(self) -> int:
        return len(self.input_lens)

    def to(self, device: torch.device | str = "cpu", non_blocking: bool = False) -> "PackedBatch":
        """The torch form on `device` (numpy arrays are wrapped without a copy on the CPU)."""
        kw = {}
        for name in ARRAYS:
            v = getattr(self, name)
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(np.ascontiguousarray(v))
            kw[name] = v.to(device, non_blocking=non_blocking)
        return PackedBatch(**kw, **{name: list(getattr(self, name)) for name in LISTS})

    def cu_seqlens(self, which: str) -> torch.Tensor:
        """Cumulative lengths [B + 1] (int32), the varlen-attention convention."""
        lens = getattr(self, f"{which}_lens")
        return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)

    def to_dict(self) -> dict:
        """Plain arrays and lists (the registered model's input; `PackedBatch(**d)` rebuilds it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


ARRAYS = tuple(f.name for f in fields(PackedBatch) if f.type == "Array")
LISTS = tuple(f.name for f in fields(PackedBatch) if f.type != "Array")


def concat(batches: list[PackedBatch]) -> PackedBatch:
    """Batches joined into one (numpy), as if their windows had been packed together."""
    host = [b if isinstance(b.unit_index, np.ndarray) else _numpy(b) for b in batches]
    return PackedBatch(**{k: np.concatenate([getattr(b, k) for b in host]) for k in ARRAYS},
                       **{k: [x for b in host for x in getattr(b, k)] for k in LISTS})


def _numpy(b: PackedBatch) -> PackedBatch:
    return PackedBatch(**{k: getattr(b, k).cpu().numpy() for k in ARRAYS}, **{k: list(getattr(b, k)) for k in LISTS})
