"""Embeddings keyed by string ids (units, sessions) whose vocabulary grows with every new session.

The ids travel in the state dict (`_extra_state`), so a checkpoint can be loaded with nothing
else: rows are matched by id, not position, and a vocabulary that differs is refused with the
ids that differ. `extend` adds rows for new ids (for a new session: unit identification) and
replaces the weight Parameter, so an optimizer built before must be rebuilt.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn


class VocabMismatch(RuntimeError):
    pass


class StaticVocab:
    """A frozen, picklable copy of a vocabulary's id -> index map (what the data service's
    tokenizer needs, without the embedding weights)."""

    def __init__(self, ids: Iterable[str], kind: str) -> None:
        self.kind = kind
        self.index = {str(i): k for k, i in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        ids = [str(i) for i in ids]
        try:
            return np.fromiter((self.index[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as e:
            missing = [i for i in ids if i not in self.index]
            raise VocabMismatch(f"{len(missing)} {self.kind} id(s) not in the model's vocabulary, e.g. "
                                f"{missing[:3]}") from e


class VocabEmbedding(nn.Module):
    def __init__(self, dim: int, kind: str, init_scale: float = 0.02, ids: Iterable[str] = ()) -> None:
        super().__init__()
        self.dim, self.kind, self.init_scale = dim, kind, init_scale
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.weight = nn.Parameter(torch.empty(0, dim))
        self.extend(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, ids: Iterable[str]) -> np.ndarray:
        """Add the ids not yet known (new rows ~ N(0, init_scale)); return every id's index."""
        ids = [str(i) for i in ids]
        new = list(dict.fromkeys(i for i in ids if i not in self.index))
        if new:
            rows = torch.randn(len(new), self.dim, dtype=self.weight.dtype, device=self.weight.device) * self.init_scale
            self.weight = nn.Parameter(torch.cat([self.weight.detach(), rows]))
            for i in new:
                self.index[i] = len(self.ids)
                self.ids.append(i)
        return self.lookup(ids)

    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        return StaticVocab.lookup(self, ids)  # same map semantics; index is kept in step with ids

    def frozen(self) -> StaticVocab:
        return StaticVocab(self.ids, self.kind)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(idx, self.weight)

    # ---- the vocabulary in the state dict -------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"ids": list(self.ids), "kind": self.kind}

    def set_extra_state(self, state: dict) -> None:
        pass  # handled in _load_from_state_dict, which also needs the weights

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        extra, wkey = state_dict.get(prefix + "_extra_state"), prefix + "weight"
        if extra is not None and wkey in state_dict:
            ids = [str(i) for i in extra["ids"]]
            w = state_dict[wkey]
            if not self.ids:  # an empty model adopts the checkpoint's vocabulary
                self.weight = nn.Parameter(torch.empty(len(ids), self.dim, dtype=self.weight.dtype,
                                                       device=self.weight.device))
                self.ids, self.index = list(ids), {i: k for k, i in enumerate(ids)}
            elif set(ids) != set(self.ids) or len(ids) != len(self.ids):
                only_model = [i for i in self.ids if i not in set(ids)]
                only_ckpt = [i for i in ids if i not in self.index]
                error_msgs.append(
                    f"{self.kind} vocabulary mismatch at {prefix or 'root'}: the checkpoint has {len(ids)} ids, "
                    f"the model {len(self.ids)}; only in the model: {len(only_model)} {only_model[:3]}, "
                    f"only in the checkpoint: {len(only_ckpt)} {only_ckpt[:3]}. Build the model from the "
                    "checkpoint, or extend both to the same ids before loading.")
                return
            else:  # same ids, maybe in another order: match rows by id
                pos = {i: k for k, i in enumerate(ids)}
                state_dict = dict(state_dict)
                state_dict[wkey] = w[torch.as_tensor([pos[i] for i in self.ids], dtype=torch.long)]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
