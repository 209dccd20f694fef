"""The optimizer: lazy embedding updates, AdamW and LAMB, and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import packed as pack
from conftest import random_samples

from pretrain.model.config import ModelConfig
from pretrain.model.loss import weighted_mse
from pretrain.model.poyo import POYO
from pretrain.run.optim import LazyAdamW, OptimConfig, build_optimizer, warmup_cosine

TINY = ModelConfig(dim=32, depth=2, dim_head=16, cross_heads=2, self_heads=2, latents_per_step=4)


def tiny_model(n_units: int = 30, sessions: int = 3) -> POYO:
    return POYO(TINY, [f"u{i}" for i in range(n_units)], [f"s{i}" for i in range(sessions)])


def test_embeddings_not_in_a_batch_do_not_drift():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    m = tiny_model(n_units=30)
    opt = build_optimizer(m, OptimConfig(lr=1e-2, weight_decay=0.1))
    torch_opt_model = tiny_model(n_units=30)
    torch_opt_model.load_state_dict(m.state_dict())
    torch_opt = torch.optim.AdamW(torch_opt_model.parameters(), lr=1e-2, weight_decay=0.1)
    first = pack(random_samples(8, rng))
    for _ in range(3):  # every unit seen: moments become non-zero everywhere
        for model, o in ((m, opt), (torch_opt_model, torch_opt)):
            loss, _ = weighted_mse(model(first), first, model.readout_names)
            o.zero_grad()
            loss.backward()
            o.step()
    samples = random_samples(8, rng)
    for s in samples:  # then batches that touch units 0-9 only, and session 0
        keep = s.unit_index < 10
        s.unit_index, s.input_time, s.token_type = s.unit_index[keep], s.input_time[keep], s.token_type[keep]
        s.input_lens, s.output_session[:] = [int(keep.sum())], 0
    b = pack(samples)
    before = m.unit_emb.weight.detach().clone(), m.session_emb.weight.detach().clone()
    before_torch = torch_opt_model.unit_emb.weight.detach().clone()
    for model, o in ((m, opt), (torch_opt_model, torch_opt)):
        loss, _ = weighted_mse(model(b), b, model.readout_names)
        o.zero_grad()
        loss.backward()
        o.step()
    assert torch.equal(m.unit_emb.weight[10:], before[0][10:])  # untouched units: bit for bit
    assert torch.equal(m.session_emb.weight[1:], before[1][1:])
    assert not torch.equal(m.unit_emb.weight[:10], before[0][:10])  # touched ones learn
    assert not torch.equal(torch_opt_model.unit_emb.weight[10:], before_torch[10:])  # plain AdamW drifts


def test_dense_groups_are_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    oa = LazyAdamW(a.parameters(), lr=1e-2, weight_decay=0.05)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05)
    x = torch.randn(32, 6)
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)


def test_lamb_optimizes():
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 1)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    o = LazyAdamW(m.parameters(), lr=5e-2, algo="lamb", weight_decay=1e-4)
    first = None
    for _ in range(200):
        o.zero_grad()
        loss = (m(x) - y).square().mean()
        loss.backward()
        o.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.05 * first


def test_warmup_then_cosine_to_the_final_ratio():
    f = [warmup_cosine(s, 100, 10, 0.1) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup, 1.0 at its last step
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))  # then only down
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)  # the final ratio at the end
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
