"""The optimizer: lazy embedding updates, AdamW and LAMB, and the learning-rate schedule."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from conftest import packed as pack
from conftest import random_samples

from pretrain.model.config import ModelConfig
from pretrain.model.loss import weighted_mse
from pretrain.model.poyo import POYO
from pretrain.run import optim
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


def _layers(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, generator=g), torch.randn(5, generator=g) * 0.1, torch.randn(2, 5, generator=g) * 3]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(5, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 5, generator=g) * 0.01]


def _flat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _lamb_on(params: list[torch.Tensor], grads, trust: str = "group", own=None) -> None:
    """3 LAMB steps on `params` with grads(step) laid out as they are. `own`: the tensors the optimizer
    is built on when it is then handed `params` instead (as DeepSpeed hands it flat slices)."""
    opt = LazyAdamW(own or params, lr=0.05, algo="lamb", weight_decay=0.01, trust=trust)
    opt.param_groups[0]["params"] = params
    for s in range(3):
        for p, g in zip(params, grads(s)):
            p.grad = g
        opt.step()


def test_lamb_trust_is_per_group_whatever_the_layout():
    """The recipe's LAMB: one trust ratio over a group, so a step is the same whether the optimizer sees the
    tensors (ZeRO stage 0) or the group flattened into one (stage >= 1, as DeepSpeed hands it over)."""
    layers, flat = _layers(), _flat(_layers())
    _lamb_on(layers, _grads)
    _lamb_on([flat], lambda s: [_flat(_grads(s))], own=[torch.zeros(1)])
    assert torch.allclose(flat, _flat(layers), atol=1e-6)
    per_tensor = _layers()
    _lamb_on(per_tensor, _grads, trust="tensor")  # You et al.'s: each layer its own ratio, another step
    assert not torch.allclose(per_tensor[2], layers[2], atol=1e-3)
    with pytest.raises(RuntimeError, match="zero_stage=0"):
        _lamb_on([_flat(_layers())], lambda s: [_flat(_grads(s))], trust="tensor", own=[torch.zeros(1)])


class _TwoWorkers:
    """torch.distributed as the optimizer calls it, for two workers run as threads of this process: all_reduce
    sums what both hand in. (Two gloo processes did the same, but gloo's teardown aborted one of them at
    exit about once in five runs.)"""

    def __init__(self) -> None:
        self.barrier, self.parts = threading.Barrier(2, timeout=60), {}

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def all_reduce(self, t: torch.Tensor) -> None:
        self.parts[threading.get_ident()] = t.clone()
        self.barrier.wait()
        total = sum(self.parts.values())
        self.barrier.wait()
        t.copy_(total)


def test_lamb_group_trust_is_summed_over_workers_slices(monkeypatch):
    """Under ZeRO each worker steps its zero-padded slice of a group; the trust ratio is still the whole
    group's, so two workers take the step one does (before, each slice had its own ratio: a run's figures
    depended on its number of workers)."""
    layers = _layers()
    _lamb_on(layers, _grads)
    monkeypatch.setattr(optim, "dist", _TwoWorkers())
    n = _flat(layers).numel()
    size, parts = -(-n // 2), {}

    def worker(rank: int) -> None:
        def mine(x: torch.Tensor) -> torch.Tensor:  # this worker's slice of the group, padded with zeros as ZeRO does
            return torch.cat([x, torch.zeros(size * 2 - n)])[rank * size:(rank + 1) * size].clone()

        parts[rank] = mine(_flat(_layers()))
        _lamb_on([parts[rank]], lambda s: [mine(_flat(_grads(s)))], own=[torch.zeros(1)])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    both = torch.cat([parts[0], parts[1]])
    assert torch.allclose(both[:n], _flat(layers), atol=1e-6)


def test_warmup_then_cosine_to_the_final_ratio():
    f = [warmup_cosine(s, 100, 10, 0.1) for s in range(100)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup, 1.0 at its last step
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))  # then only down
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)  # the final ratio at the end
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
