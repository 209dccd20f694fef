"""Weighted MSE over every output query, as in the reference: per query the squared error is
averaged over the readout's dims and multiplied by the query's weight; the sum is divided by the
sum of weights."""

from __future__ import annotations

import torch

from .batch import PackedBatch


def weighted_mse(preds: dict[str, torch.Tensor], b: PackedBatch, readout_names: list[str]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss over all readouts, loss per readout for logging)."""
    total = b.weight.new_zeros(())
    weight_sum = b.weight.sum().clamp_min(1e-12)
    per = {}
    for i, name in enumerate(readout_names):
        pred = preds[name]
        if pred.shape[0] == 0:
            continue
        sel = slice(None) if len(readout_names) == 1 else (b.output_readout == i)
        y = b.target[sel][:, : pred.shape[1]]
        w = b.weight[sel]
        err = (pred - y).pow(2).mean(dim=-1) * w
        total = total + err.sum()
        per[name] = float(err.sum().detach() / w.sum().clamp_min(1e-12))
    return total / weight_sum, per
