"""The model: sizes, vocabularies, attention backends, dropout kernels and the loss."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import packed as pack
from conftest import random_samples

from pretrain.model import flops, ops
from pretrain.model.attention import SDPA, get_backend, naive, xformers_available
from pretrain.model.config import PRESETS, ModelConfig, preset
from pretrain.model.loss import weighted_mse
from pretrain.model.poyo import POYO, count_parameters
from pretrain.model.vocab import VocabEmbedding, VocabMismatch
from pretrain.tokens.tokenizer import Geometry

TINY = ModelConfig(dim=32, depth=2, dim_head=16, cross_heads=2, self_heads=2, latents_per_step=4)


def tiny_model(cfg: ModelConfig = TINY, n_units: int = 30, sessions: int = 3) -> POYO:
    return POYO(cfg, [f"u{i}" for i in range(n_units)], [f"s{i}" for i in range(sessions)])


# ---- sizes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_the_size_their_name_says(name):
    n = count_parameters(tiny_model(preset(name)))
    stated = float(re.search(r"([\d.]+)M", name).group(1)) * 1e6
    assert abs(n - stated) / stated < 0.05, (name, n)
    assert flops.parameters(preset(name)) == n  # the analytic count is exact
    assert flops.parameters(preset(name), 30, 3) == count_parameters(tiny_model(preset(name)), embeddings=True)


def test_reference_configs_match_the_reference():
    small, big = preset("poyo-1.3M"), preset("poyo-11.8M")
    assert (small.dim, small.depth, small.cross_heads, small.self_heads, small.latents_per_step) == (64, 6, 2, 8, 16)
    assert (big.dim, big.depth, big.cross_heads, big.self_heads, big.latents_per_step) == (128, 24, 4, 8, 32)
    assert Geometry(1.0, big.latent_step, big.latents_per_step).n_latents == 256
    assert (big.ffn_dropout, big.lin_dropout, big.atn_dropout) == (0.2, 0.4, 0.2)


def test_flops_grow_linearly_with_spike_tokens():
    cfg = preset("poyo-11.8M")
    f = [flops.forward_flops(cfg, n, 100, 256) for n in (1000, 2000, 3000)]
    assert f[1] - f[0] == pytest.approx(f[2] - f[1]) and f[0] > 0
    assert flops.train_flops(cfg, 1000, 100, 256) == 3 * f[0]


# ---- vocabularies ---------------------------------------------------------------------------------------
def test_vocabulary_grows_and_looks_up():
    v = VocabEmbedding(8, "unit", ids=["a", "b"])
    w0 = v.weight.detach().clone()
    assert v.extend(["b", "c", "d", "c"]).tolist() == [1, 2, 3, 2]
    assert torch.equal(v.weight[:2], w0) and v.weight.shape == (4, 8)
    with pytest.raises(VocabMismatch, match="'zz'"):
        v.lookup(["a", "zz"])


def test_state_dict_carries_the_vocabulary_and_rows_follow_ids():
    torch.manual_seed(0)
    a = tiny_model()
    b = POYO(TINY, [f"u{i}" for i in reversed(range(30))], [f"s{i}" for i in range(3)])  # same ids, other order
    b.load_state_dict(a.state_dict())
    for uid in ["u0", "u7", "u29"]:
        assert torch.equal(a.unit_emb.weight[a.unit_emb.index[uid]], b.unit_emb.weight[b.unit_emb.index[uid]])
    empty = POYO(TINY)  # an empty model adopts the checkpoint's vocabularies
    empty.load_state_dict(a.state_dict())
    assert empty.unit_emb.ids == a.unit_emb.ids and torch.equal(empty.unit_emb.weight, a.unit_emb.weight)
    sd = torch.load(_roundtrip(a.state_dict()), weights_only=False)
    c = POYO(TINY)
    c.load_state_dict(sd)
    batch = pack(random_samples(4, np.random.default_rng(0)))
    a.eval(), c.eval()
    assert torch.equal(a(batch)["velocity"], c(batch)["velocity"])


def _roundtrip(sd):
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


def test_vocabulary_mismatch_is_a_clear_error():
    a = tiny_model()
    b = POYO(TINY, [f"u{i}" for i in range(31)], [f"s{i}" for i in range(3)])
    with pytest.raises(RuntimeError, match=r"unit vocabulary mismatch.*only in the model: 1 \['u30'\]"):
        b.load_state_dict(a.state_dict())


# ---- attention backends ---------------------------------------------------------------------------------
def packed_qkv(q_lens, k_lens, h=4, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(n, h, d, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(sum(q_lens)), mk(sum(k_lens)), mk(sum(k_lens))


BACKENDS = {
    "sdpa-loop": SDPA("loop"),
    "sdpa-padded": SDPA("padded"),
    "blocked-kernel": lambda q, k, v, ql, kl, **kw: ops._PackedDropoutAttention.apply(q, k, v, ql, kl, 0.0, 1),
}


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("seed", range(3))
def test_backends_agree_with_the_definition_forward_and_backward(name, seed):
    rng = np.random.default_rng(seed)
    q_lens = rng.integers(1, 40, 5).tolist()
    k_lens = rng.integers(1, 300, 5).tolist()
    for ql, kl in [(q_lens, k_lens), ([16] * 4, [16] * 4)]:  # mixed lengths, and the uniform fast path
        q, k, v = packed_qkv(ql, kl, seed=seed)
        ref = naive(q, k, v, ql, kl)
        out = BACKENDS[name](q, k, v, ql, kl)
        assert (out - ref).abs().max() <= 1e-5
        g = torch.randn_like(ref)
        grads = torch.autograd.grad(out, (q, k, v), g)
        want = torch.autograd.grad(ref, (q, k, v), g)
        for a, b in zip(grads, want):
            assert (a - b).abs().max() <= 1e-5


def test_time_causal_attention_agrees_with_the_definition_and_a_query_with_no_past_gets_zeros():
    ql, kl = [5, 16, 3], [40, 16, 1]
    q, k, v = packed_qkv(ql, kl, seed=3)
    g = torch.Generator().manual_seed(4)
    times = (torch.rand(sum(ql), generator=g), torch.rand(sum(kl), generator=g))
    times[0][0] = -1.0  # before every key of its sample
    ref = naive(q, k, v, ql, kl, times=times)
    for backend in (SDPA("padded"), SDPA("loop")):
        out = backend(q, k, v, ql, kl, times=times)
        assert (out - ref).abs().max() <= 1e-5 and out[0].abs().max() == 0.0
        grad = torch.randn_like(ref)
        want = torch.autograd.grad(ref, (q, k, v), grad, retain_graph=True)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), want):
            assert torch.isfinite(a).all() and (a - b).abs().max() <= 1e-5
    plain = naive(q, k, v, ql, kl)
    assert (plain - ref).abs().max() > 1e-2  # the mask does something


def test_a_causal_model_never_uses_a_later_spike():
    torch.manual_seed(0)
    causal = tiny_model(ModelConfig(**{**TINY.to_dict(), "causal": True}))
    plain = tiny_model()
    plain.load_state_dict(causal.state_dict())
    rng = np.random.default_rng(2)
    batch = pack(random_samples(4, rng))
    later = pack(random_samples(4, np.random.default_rng(2)))
    cut = 0.5  # spikes after it get other units
    after = later.input_time > cut
    later.unit_index[after] = (later.unit_index[after] + 7) % 30
    for m in (causal, plain):
        m.eval()
    early = batch.output_time <= cut
    a, b = causal(batch)["velocity"], causal(later)["velocity"]
    assert torch.equal(a[early], b[early]) and not torch.equal(a[~early], b[~early])
    assert not torch.equal(plain(batch)["velocity"][early], plain(later)["velocity"][early])


@pytest.mark.skipif(not (torch.cuda.is_available() and xformers_available()), reason="xformers needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_xformers_agrees_with_the_definition(dtype, tol):
    ql, kl = [7, 33, 1, 20], [100, 5, 64, 250]
    q, k, v = (x.detach().cuda().requires_grad_() for x in packed_qkv(ql, kl, dtype=dtype))
    xf = get_backend("xformers", "cuda")
    out, ref = xf(q, k, v, ql, kl), naive(q.float(), k.float(), v.float(), ql, kl)
    assert (out.float() - ref).abs().max() <= tol
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out.float(), (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert (a.float() - b.float()).abs().max() <= tol * 10


def test_xformers_that_imports_but_cannot_run_is_not_available(monkeypatch):
    """A wheel built for another torch imports and then has no operator (seen on an H200): `auto`
    must not pick it."""
    import pretrain.model.attention as attention

    class Broken(attention.XFormers):
        def __init__(self) -> None:  # imports fine
            pass

        def __call__(self, *a, **k):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(attention, "XFormers", Broken)
    attention.xformers_available.cache_clear()
    try:
        assert not attention.xformers_available()
    finally:
        attention.xformers_available.cache_clear()


def test_backend_selection():
    assert get_backend("auto", "cpu").name == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend("flash9")


# ---- dropout kernels ------------------------------------------------------------------------------------
def test_dropout_attention_gradients_and_statistics():
    ql, kl = [5, 7, 2], [9, 4, 6]
    q, k, v = (x.detach().double().requires_grad_() for x in packed_qkv(ql, kl, h=3, d=8))
    f = lambda q, k, v: ops._PackedDropoutAttention.apply(q, k, v, ql, kl, 0.3, 123)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))
    old = ops.BLOCK_ELEMENTS
    try:
        ops.BLOCK_ELEMENTS = 20  # one head per block: same function, other blocking
        assert torch.autograd.gradcheck(f, (q, k, v))
        assert torch.equal(f(q, k, v), ops._PackedDropoutAttention.apply(q, k, v, ql, kl, 0.3, 123))
    finally:
        ops.BLOCK_ELEMENTS = old
    keep = ops._MaskStream(5, 0.2).next((1_000_000,), "cpu")
    assert keep.mean().item() == pytest.approx(0.8, abs=2e-3)
    torch.manual_seed(9)
    a = ops.packed_dropout_attention(q, k, v, ql, kl, 0.3)
    torch.manual_seed(9)
    assert torch.equal(a, ops.packed_dropout_attention(q, k, v, ql, kl, 0.3))  # seeded by torch.manual_seed


def test_dropout_and_geglu_kernels():
    x = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops._Dropout.apply(x, 0.3, 7), (x,))
    assert torch.autograd.gradcheck(lambda x: ops._GegluDropout.apply(x, 0.3, 7), (x,))
    h, gate = x.chunk(2, dim=-1)
    assert torch.equal(ops._GegluDropout.apply(x, 0.0, 0), h * torch.nn.functional.gelu(gate))
    y = ops.dropout(torch.ones(200_000), 0.25, True)
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=5e-3)
    assert y.mean().item() == pytest.approx(1.0, abs=1e-2)  # unbiased
    assert torch.equal(ops.dropout(x, 0.5, False), x)


def test_layer_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    a = tiny_model()
    b = tiny_model(ModelConfig(**{**TINY.to_dict(), "checkpoint_layers": True}))
    b.load_state_dict(a.state_dict())
    batch = pack(random_samples(6, np.random.default_rng(1)))
    outs = []
    for m in (a, b):
        torch.manual_seed(5)
        p = m(batch)["velocity"]
        p.square().sum().backward()
        outs.append((p.detach(), m.proc[1][0].to_q.weight.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---- loss --------------------------------------------------------------------------------------------
def test_weighted_mse_is_the_reference_definition():
    rng = np.random.default_rng(0)
    b = pack(random_samples(3, rng))
    pred = {"velocity": torch.randn(b.target.shape[0], 2)}
    loss, per = weighted_mse(pred, b, ["velocity"])
    err = ((pred["velocity"] - b.target) ** 2).mean(1)
    assert loss.item() == pytest.approx(float((err * b.weight).sum() / b.weight.sum()), rel=1e-6)
    assert per["velocity"] == pytest.approx(loss.item(), rel=1e-6)


# ---- locality prior ---------------------------------------------------------------------------------------
def test_locality_prior_starts_attention_peaked_at_equal_times():
    """With `locality` on, the q/k biases alone give every attention a score kernel that peaks at
    zero time difference with the configured logit and decays away from it; off, the model is the
    reference (no extra parameters)."""
    from pretrain.model.rotary import rotate

    cfg = preset("poyo-1.3M", t_min=0.02, locality=6.0)
    m = POYO(cfg, ["u0"], ["s0"])
    assert count_parameters(m) > count_parameters(POYO(preset("poyo-1.3M"), ["u0"], ["s0"]))
    assert not any("q_bias" in n for n, _ in POYO(preset("poyo-1.3M"), ["u0"], ["s0"]).named_parameters())
    for atn in (m.enc_atn, m.proc[0][0], m.dec_atn):
        h, d = atn.q_bias.shape
        t = torch.tensor([0.5])
        taus = torch.linspace(0.0, 1.0, 81)
        q = rotate(atn.q_bias[None].expand(1, h, d), m.rotary(t))
        k = rotate(atn.k_bias[None].expand(len(taus), h, d), m.rotary(taus))
        scores = torch.einsum("qhd,khd->hk", q, k)[0] / d**0.5
        assert int(scores.argmax()) == 40 and abs(float(scores[40]) - 6.0) < 1e-4
        w = torch.softmax(scores, 0)
        near = (taus - 0.5).abs() <= 0.125
        assert float(w[near].sum()) > 0.5 > float(near.float().mean())  # most mass within one latent step
        assert float(scores[0]) < 3.0 and float(scores[-1]) < 3.0


def _pool_flush_fraction(x: torch.Tensor) -> float:
    """Share of a big product computed by threads that flush denormals (their part is zero)."""
    return float(((x * 1.5) == 0).float().mean())


def test_denormals_are_flushed_in_every_thread_inside_the_step_and_nowhere_after(monkeypatch):
    from pretrain.model.numerics import KEEP_ENV, flushed, thread_flushes

    subnormal = torch.from_numpy(np.full(1 << 21, 1000, dtype=np.int32)).view(torch.float32)  # ~1.4e-42 each
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _pool_flush_fraction(subnormal) == 0.0  # the pool runs before any flush: a user's process
        with flushed():
            assert thread_flushes() and _pool_flush_fraction(subnormal) == 1.0  # the pool's threads too
            with flushed():
                pass
            assert _pool_flush_fraction(subnormal) == 1.0  # a nested use leaves it on
        assert not thread_flushes() and _pool_flush_fraction(subnormal) == 0.0
        assert np.float32(1e-39) * np.float32(1.5) > 0  # the caller's numpy keeps its subnormals
        monkeypatch.setenv(KEEP_ENV, "1")
        with flushed():
            assert _pool_flush_fraction(subnormal) == 0.0
    finally:
        torch.set_num_threads(before)
