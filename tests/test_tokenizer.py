"""Tokenizer invariants on real windows of a synthetic corpus, and packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import packed as pack

from data_service import intervals as iv
from data_service.reader import open_corpus
from data_service.synth import SynthConfig, synth_corpus
from pretrain.model.batch import ARRAYS, END, SPIKE, START, concat
from pretrain.model.config import preset
from pretrain.model.poyo import POYO
from pretrain.tokens.tokenizer import Tokenizer, TokenizerConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok") / "c"
    synth_corpus(SynthConfig(sessions=3, subjects=2, minutes=1.0, min_units=20, max_units=120, seed=2), root)
    c = open_corpus(root)
    cfg = preset("poyo-1.3M")
    model = POYO(cfg, [u for s in c.session_ids for u in c.session(s).unit_ids], c.session_ids)
    tok = Tokenizer(TokenizerConfig.build(cfg, target_scale={"hand_vel": 20.0},
                                          interval_weights={"reach": 5.0, "hold": 0.1, "trials": 2.0}),
                    model.unit_emb, model.session_emb)
    return c, model, tok


def test_tokens_of_a_window(setup):
    c, model, tok = setup
    for sid in c.session_ids:
        r = c.session(sid)
        for t0 in (3.0, 17.25, 40.5):
            w = r.read_window(t0, t0 + 1.0)
            s = tok(w, r)
            n_units = len(r.unit_ids)
            spikes = s.token_type == SPIKE
            assert spikes.sum() == len(w.spike_times)
            assert len(s.unit_index) == len(w.spike_times) + 2 * n_units  # start + end per unit
            global_ids = model.unit_emb.lookup(r.unit_ids)
            for kind, t in ((START, 0.0), (END, 1.0)):
                sel = s.token_type == kind
                assert sorted(s.unit_index[sel]) == sorted(global_ids)  # every unit once
                assert np.all(s.input_time[sel] == t)
            assert np.array_equal(s.unit_index[spikes], global_ids[w.spike_units])
            assert s.input_time[spikes].min() >= 0 and s.input_time[spikes].max() < 1.0
            assert len(s.latent_index) == 8 * 16 and np.allclose(np.unique(s.latent_time), np.arange(8) / 8 + 1 / 16)
            v = w.behaviour["hand_vel"]
            assert np.allclose(s.output_time, v.timestamps) and np.allclose(s.target, v.values / 20.0)
            assert set(s.output_session.tolist()) == {model.session_emb.index[sid]} and s.session_ids == [sid]
            # weights: product of the weights of every interval set containing the sample
            want = np.ones(len(v.timestamps))
            for name, wt in (("reach", 5.0), ("hold", 0.1), ("trials", 2.0)):
                want[iv.contains(iv.normalize(r.intervals[name] - t0), v.timestamps)] *= wt
            assert np.allclose(s.weight, want)


def test_unit_dropout_keeps_only_the_chosen_units(setup):
    c, model, tok = setup
    r = c.session(c.session_ids[0])
    w = r.read_window(10.0, 11.0)
    keep = np.array([0, 3, 5])
    s = tok(w, r, keep_units=keep)
    kept_global = set(model.unit_emb.lookup(r.unit_ids[keep]))
    assert set(s.unit_index) <= kept_global
    assert (s.token_type == START).sum() == 3 and (s.token_type == SPIKE).sum() == np.isin(w.spike_units, keep).sum()


def test_packing_lengths_and_model_outputs(setup):
    c, model, tok = setup
    samples = []
    for k, sid in enumerate(c.session_ids):
        r = c.session(sid)
        samples.append(tok(r.read_window(5.0 + k, 6.0 + k), r))
    b = pack(samples)
    assert b.input_lens == [len(s.unit_index) for s in samples]
    assert b.cu_seqlens("input").tolist() == [0, *np.cumsum(b.input_lens).tolist()]
    assert b.latent_lens == [128] * 3 and sum(b.output_lens) == len(b.output_time) == b.target.shape[0]
    assert b.output_session.tolist() == [int(i) for s in samples for i in s.output_session]
    assert all(len(set(s.output_session.tolist())) == 1 for s in samples)
    model.eval()
    with torch.no_grad():
        out = model(b)["velocity"]
        alone = model(pack(samples[1:2]))["velocity"]
    assert out.shape == (sum(b.output_lens), 2)
    # packing is exact: a sample's predictions do not depend on the other samples of its batch
    lo = b.output_lens[0]
    assert torch.allclose(out[lo:lo + b.output_lens[1]], alone, atol=1e-5)


def test_batch_pack_equals_window_by_window(setup):
    """Tokenizer.pack (the data service's one-pass path) gives exactly the arrays of packing the
    windows one by one and joining them, with and without unit dropout, across sessions and edge
    windows."""
    c, model, tok = setup
    rng = np.random.default_rng(0)
    items = []
    for k in range(12):
        r = c.session(c.session_ids[k % len(c.session_ids)])
        t0 = 0.0 if k == 0 else float(rng.uniform(0, r.domain[-1][1] - 1.0))
        keep = None if k % 3 == 0 else np.sort(rng.choice(len(r.unit_ids), 1 + k, replace=False))
        items.append((r.read_window(t0, t0 + 1.0), r, keep))
    got = tok.pack(items).to_dict()
    want = concat([tok(w, r, keep_units=keep) for w, r, keep in items]).to_dict()
    assert got.keys() == want.keys()
    for key, v in want.items():
        if key in ARRAYS:
            assert got[key].dtype == v.dtype and np.array_equal(got[key], v), key
        else:
            assert list(got[key]) == list(v), key
    assert (got["weight"] != 1.0).any()  # the interval weights were exercised


def test_batch_input_tokens_match_a_window_by_window_reference(setup):
    """The batch-wide unit-dropout gather gives, window by window, the kept spikes in time order,
    then START and END per kept unit in unit order: checked against a plain loop with np.isin,
    for no dropout, local indices, a mask, every unit dropped and a window without spikes."""
    c, model, tok = setup
    rng = np.random.default_rng(3)
    items = []
    for k in range(10):
        r = c.session(c.session_ids[k % len(c.session_ids)])
        n = len(r.unit_ids)
        t0 = float(rng.uniform(0, r.domain[-1][1] - 1.0))
        w = r.read_window(t0, t0 + (1e-4 if k == 4 else 1.0))  # k == 4: (almost surely) no spikes
        if k % 4 == 0:
            keep = None
        elif k % 4 == 1:
            keep = np.sort(rng.choice(n, 1 + k, replace=False))
        elif k % 4 == 2:
            keep = rng.random(n) < 0.5
        else:
            keep = np.zeros(n, dtype=bool)  # every unit dropped: no tokens at all
        items.append((w, r, keep))
    b = tok.pack(items)
    lo = 0
    for (w, r, keep), n_in in zip(items, b.input_lens):
        gids = model.unit_emb.lookup(r.unit_ids)
        local = np.arange(len(r.unit_ids)) if keep is None else (
            np.flatnonzero(keep) if keep.dtype == bool else keep)
        sel = np.isin(w.spike_units, local)
        want_ids = np.concatenate([gids[w.spike_units[sel]], gids[local], gids[local]])
        want_t = np.concatenate([w.spike_times[sel], np.zeros(len(local)), np.full(len(local), w.t_end - w.t_start)])
        want_type = np.repeat([SPIKE, START, END], [sel.sum(), len(local), len(local)])
        assert n_in == len(want_ids)
        assert np.array_equal(b.unit_index[lo:lo + n_in], want_ids)
        assert np.array_equal(b.input_time[lo:lo + n_in], want_t.astype(np.float32))
        assert np.array_equal(b.token_type[lo:lo + n_in], want_type)
        lo += n_in
    assert lo == len(b.unit_index)
    assert b.input_lens[3] == 0 and b.input_lens[4] == 2 * len(items[4][1].unit_ids)


def test_a_behaviour_not_decoded_in_one_session_gives_it_no_outputs(setup):
    """finetune --behaviour: a session's other behaviours are not decoded (nor their labels used);
    the setting travels with the tokenizer config (exports)."""
    from dataclasses import asdict, replace

    c, model, tok = setup
    a, b = c.session_ids[:2]
    cfg = TokenizerConfig.from_dict(asdict(replace(tok.cfg, not_decoded={a: ["hand_vel"]})))
    assert cfg.not_decoded == {a: ["hand_vel"]} and not cfg.decodes(a, "hand_vel") and cfg.decodes(b, "hand_vel")
    only = Tokenizer(cfg, model.unit_emb, model.session_emb)
    ra, rb = c.session(a), c.session(b)
    wa, wb = ra.read_window(3.0, 4.0), rb.read_window(3.0, 4.0)
    assert len(only(wa, ra).output_time) == 0 and len(tok(wa, ra).output_time) > 0
    assert np.array_equal(only(wb, rb).target, tok(wb, rb).target)  # the other session is untouched


def test_loss_weights_with_times_in_any_order(setup):
    """A sample's weight is the product of the weights of the interval sets holding it, whether a
    window's times come in order (the batch-wide edge search) or not (the per-time search)."""
    from data_service.reader import SeriesWindow, Window

    c, model, tok = setup
    rng = np.random.default_rng(5)
    items = []
    for k, sid in enumerate(c.session_ids):
        r = c.session(sid)
        w = r.read_window(4.0 + 3 * k, 5.0 + 3 * k)
        if k == 1:  # the same samples shuffled
            v = w.behaviour["hand_vel"]
            order = rng.permutation(len(v.timestamps))
            w = Window(w.session_id, w.t_start, w.t_end, w.spike_times, w.spike_units,
                       {**w.behaviour, "hand_vel": SeriesWindow(v.timestamps[order], v.values[order])}, w.intervals)
        items.append((w, r, None))
    for batch in (items[:1], items):
        got = tok.pack(batch).weight
        want = []
        for w, r, _ in batch:
            t = w.behaviour["hand_vel"].timestamps
            x = np.ones(len(t))
            for name, wt in (("reach", 5.0), ("hold", 0.1), ("trials", 2.0)):
                x[iv.contains(iv.normalize(r.intervals[name] - w.t_start), t)] *= wt
            want.append(x)
        assert np.allclose(got, np.concatenate(want)) and (got != 1.0).any()
