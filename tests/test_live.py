"""Live decoding over a real LSL stack on loopback (liblsl kept on this machine: pretrain/live/streams.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import result_line, run_cli, simple_session

from data_service.store import CorpusStore

pylsl = pytest.importorskip("pylsl")  # the `live` extra; part of `dev`

from pretrain.live.replay import ReplayConfig, replay  # noqa: E402
from pretrain.live.streams import lsl, read_spike_stream_info  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("live") / "c"
    with CorpusStore(root) as st:
        st.add(simple_session("s1", duration=30.0, n_units=12, rate=15.0))
    return root


@pytest.fixture(scope="module")
def decoder(corpus):
    """A small untrained POYO that knows session s1: what serve publishes need not be good, only exact."""
    import torch

    from data_service.reader import open_corpus
    from pretrain.decoding.causal import CausalDecoder
    from pretrain.model.config import ModelConfig
    from pretrain.model.poyo import POYO
    from pretrain.tokens.tokenizer import Tokenizer, TokenizerConfig

    reader = open_corpus(corpus).session("s1")
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, depth=1, dim_head=8, cross_heads=1, self_heads=2, latents_per_step=2)
    model = POYO(cfg, list(reader.unit_ids), ["s1"])
    return CausalDecoder(model, Tokenizer(TokenizerConfig.build(cfg, window_s=1.0), model.unit_emb, model.session_emb),
                         reader)


def _resolve(source_id: str):
    found = lsl().resolve_byprop("source_id", source_id, timeout=20)
    assert found, f"no LSL stream {source_id} on this machine"
    return found[0]


def _drain(inlet, n: int, deadline_s: float = 30.0) -> tuple[list, list]:
    values, stamps = [], []
    end = time.monotonic() + deadline_s
    while len(values) < n and time.monotonic() < end:
        v, t = inlet.pull_chunk(timeout=0.5)
        values += v
        stamps += t
    return values, stamps


def test_replay_streams_every_spike_and_sample_at_its_time(corpus):
    from data_service.reader import open_corpus

    cfg = ReplayConfig(str(corpus), "s1", speed=10.0, start_s=5.0, duration_s=6.0, source_id="test-replay",
                       wait_consumers_s=20.0, linger_s=2.0)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", replay(cfg)))
    th.start()
    try:
        # the behaviour inlet first: replay starts when the spike stream has a consumer
        beh = pylsl.StreamInlet(_resolve("test-replay-behaviour"), max_buflen=60)
        beh.open_stream(timeout=20)
        spikes = pylsl.StreamInlet(_resolve("test-replay"), max_buflen=60)
        spikes.open_stream(timeout=20)
        info = read_spike_stream_info(spikes.info(timeout=20))
        reader = open_corpus(corpus).session("s1")
        t, u = reader.spikes()
        keep = (t >= 5.0) & (t < 11.0)
        bt, bv = reader.behaviour("hand_vel")
        bkeep = (bt >= 5.0) & (bt < 11.0)
        v, ts = _drain(spikes, int(keep.sum()))
        bvals, bts = _drain(beh, int(bkeep.sum()))
    finally:
        th.join(timeout=60)
    r = out["r"]
    assert info.session == "s1" and info.unit_ids == [str(x) for x in reader.unit_ids]
    assert r.spikes == keep.sum() and len(v) == keep.sum()  # none lost, none added
    np.testing.assert_array_equal(np.asarray(v).ravel(), u[keep])  # in order, each with its unit
    # each spike stamped at its recording time, mapped onto the LSL clock at 10x
    np.testing.assert_allclose((np.asarray(ts) - r.lsl_t0) * 10.0 + 5.0, t[keep], atol=1e-6)
    assert len(bvals) == bkeep.sum()
    np.testing.assert_allclose(np.asarray(bvals), bv[bkeep], rtol=1e-6)
    np.testing.assert_allclose((np.asarray(bts) - r.lsl_t0) * 10.0 + 5.0, bt[bkeep], atol=1e-6)
    assert r.wall_s >= 0.5  # paced: 6 s of recording at 10x, not pushed at once


def test_replay_command_names_a_missing_behaviour(corpus):
    p = run_cli("replay", "--corpus", str(corpus), "--session", "s1", "--behaviour", "cursor_pos", "--speed", "50")
    assert p.returncode == 1 and "s1" in p.stderr and "cursor_pos" in p.stderr
    assert result_line(p.stdout)["error"] == "LookupError"


def test_ring_keeps_order_within_tolerance_and_counts_late_unknown_and_restarts():
    from pretrain.live.buffer import SpikeRing

    r = SpikeRing(n_units=4, keep_s=1.0, tolerance_s=0.01, restart_s=0.5)
    r.add([10.000, 10.020, 10.015], [0, 1, 2])  # 10.015 after 10.020: 5 ms out of order, used
    r.add([10.030, 9.990, 10.040], [3, 0, 7])  # 9.990: 30 ms behind the newest, late; unit 7 unknown
    assert (r.counts.received, r.counts.late, r.counts.unknown) == (6, 1, 1)
    t, u = r.window(10.030, 1.0)
    assert t.tolist() == [10.000, 10.015, 10.020] and u.tolist() == [0, 2, 1]  # sorted; 10.030 is not before the tick
    t, _ = r.window(10.0301, 1.0)
    assert t.tolist()[-1] == 10.030
    r.add([12.0], [1])  # older than newest - keep_s: dropped from the buffer
    assert r.window(12.5, 1.0)[0].tolist() == [12.0]
    r.add([3.0, 3.1], [0, 1])  # the source restarted its clock
    assert r.counts.restarts == 1 and r.window(3.2, 1.0)[0].tolist() == [3.0, 3.1]


def test_the_core_is_primed_once_before_each_tick_and_never_for_a_model_too_slow_for_it():
    from pretrain.live.warm import Warmth

    w = Warmth(period_s=0.050, first_s=0.008)  # lead: 2 x 8 ms + 1 ms = 17 ms before each tick
    assert w.wait_s(now=10.000, due=10.050) == pytest.approx(0.033)  # sleep until the prime
    assert not w.prime_now(10.030, 10.050) and w.prime_now(10.034, 10.050)
    assert not w.prime_now(10.040, 10.050) and w.wait_s(10.040, 10.050) == 0.0  # once; then poll, no sleep
    w.decoded(0.009)
    assert w.prime_now(10.084, 10.100)  # the next tick gets its own
    w.decoded(0.009)
    assert not w.prime_now(10.151, 10.150)  # a tick already due is decoded, not primed
    slow = Warmth(period_s=0.050, first_s=0.020)  # a forward over a third of the period: no room to prime
    assert not slow.prime_now(10.040, 10.050) and slow.wait_s(10.000, 10.050) == pytest.approx(0.050)
    off = Warmth(period_s=0.050, enabled=False, first_s=0.008)
    assert not off.prime_now(10.040, 10.050) and off.wait_s(10.040, 10.050) == pytest.approx(0.010)


def test_served_predictions_equal_the_causal_decode_of_the_spikes_each_tick_held(corpus, decoder, tmp_path):
    from pretrain.live.serve import ServeConfig, load_log, serve

    dec, reader = decoder, decoder.reader
    speed = 5.0
    rep = ReplayConfig(str(corpus), "s1", speed=speed, start_s=2.0, duration_s=10.0, name="test-serve-spikes",
                       source_id="test-serve", wait_consumers_s=30.0, linger_s=1.0)
    log = tmp_path / "ticks.npz"
    scfg = ServeConfig(stream="test-serve-spikes", period_ms=20.0, speed=speed, lag_ms=10.0, name="test-serve-pred",
                       log=str(log))
    done = threading.Event()
    out = {}
    threads = [threading.Thread(target=lambda: out.setdefault("replay", replay(rep))),
               threading.Thread(target=lambda: out.setdefault("serve", serve(dec, scfg, stop=done.is_set)))]
    for th in threads:
        th.start()
    try:
        pred = pylsl.StreamInlet(_resolve("test-serve-pred-s1"), max_buflen=60)
        pred.open_stream(timeout=20)
        threads[0].join(timeout=60)  # the replay has played and lingered
        published, stamps = _drain(pred, 10**6, deadline_s=1.0)
    finally:
        done.set()
        for th in threads:
            th.join(timeout=60)
    stats, r, ticks = out["serve"], out["replay"], load_log(log)
    assert stats.ticks == len(ticks["ticks"]) > 50 and r.spikes > 0
    t_all, u_all = reader.spikes()
    lsl_times = r.lsl_t0 + (t_all - r.t_start) / speed
    by_stamp = dict(zip(np.round(stamps, 9), published, strict=True))
    checked = 0
    held = np.concatenate([t for t, _ in ticks["spikes"]])
    near = np.clip(np.searchsorted(lsl_times, held), 1, len(lsl_times) - 1)
    near -= np.abs(lsl_times[near - 1] - held) < np.abs(lsl_times[near] - held)
    offset = float(np.median(held - lsl_times[near]))  # LSL's time correction on this machine: microseconds
    assert abs(offset) < 1e-3
    for tick, row, (t, u) in zip(ticks["ticks"], ticks["predictions"], ticks["spikes"], strict=True):
        assert (t < tick).all()  # no prediction used a spike stamped at or after its tick
        # every spike held is one the replay sent, with its unit, inside the tick's window
        i = np.clip(np.searchsorted(lsl_times, t - offset - 1e-7), 0, len(t_all) - 1)
        np.testing.assert_allclose(lsl_times[i], t - offset, rtol=0, atol=1e-6)
        assert (u_all[i] == u).all()
        assert (t >= tick - 1.0 / speed).all()
        again = np.concatenate(list(dec.predict([dec.window(tick * speed, t * speed, u)]).values()), axis=1)[0]
        np.testing.assert_allclose(row, again, rtol=1e-5, atol=1e-6)  # the offline reference of that tick
        if round(tick, 9) in by_stamp:  # what went out on the stream
            np.testing.assert_allclose(by_stamp[round(tick, 9)], row, rtol=1e-6, atol=1e-6)
            checked += 1
    assert checked > 50 and sum(len(t) for t, _ in ticks["spikes"]) > 0


def test_serve_counts_late_unknown_and_restarted_input_and_skips_ticks_it_cannot_make(decoder, tmp_path):
    from pretrain.live.serve import ServeConfig, load_log, serve
    from pretrain.live.streams import spike_stream_info

    dec, reader = decoder, decoder.reader
    ids = [str(u) for u in reader.unit_ids]
    rig = pylsl.StreamOutlet(spike_stream_info("test-faults", "test-faults", "s1", ids[::-1] + ["ghost"]))
    seen = {"n": 0}
    ticking, got = threading.Event(), [threading.Event(), threading.Event()]
    base = [float("inf")]  # the first chunk's stamps start here (set before it is pushed)

    def tick(stats):
        ticking.set()
        seen["n"] = stats.counts.received
        if stats.counts.received >= 6 and stats.last_tick > base[0] + 0.25:  # a tick held all four kept spikes
            got[0].set()
        if stats.counts.received >= 8:
            got[1].set()

    done = threading.Event()
    log = tmp_path / "faults.npz"
    # a 1 ms period: the model is slower than that, so ticks are skipped, never queued
    scfg = ServeConfig(stream="test-faults", period_ms=1.0, tolerance_ms=5.0, name="test-faults-pred", log=str(log))
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("s", serve(dec, scfg, on_tick=tick, stop=done.is_set)))
    th.start()
    try:
        assert rig.wait_for_consumers(30) and ticking.wait(30)  # the server is up and ticking
        b = base[0] = pylsl.local_clock() + 0.1  # stamped just ahead: ticks to come hold them, however late they run
        # in order; 2 ms out of order (used); 50 ms behind the newest (late); stream index 12: a unit the session lacks
        stamps = [b, b + 0.1, b + 0.2, b + 0.198, b + 0.15, b + 0.3]
        rig.push_chunk([[0], [1], [2], [3], [4], [12]], stamps)
        assert got[0].wait(30), seen
        rig.push_chunk([[5], [6]], [b - 100.0, b - 99.99])  # the rig restarted its clock
        assert got[1].wait(30), seen
    finally:
        done.set()
        th.join(timeout=60)
    s = out["s"]
    assert (s.counts.received, s.counts.late, s.counts.unknown, s.counts.restarts) == (8, 1, 1, 1)
    assert s.skipped > 0 and s.ticks > 0
    ticks = load_log(log)
    held = [(t, u) for t, u in ticks["spikes"] if len(t)]
    for tick_t, (t, _) in zip(ticks["ticks"], ticks["spikes"], strict=True):
        assert (t < tick_t).all()
    # the stream's index i is the session's unit ids[::-1][i]: mapped by id, not by position
    everything = np.concatenate([u for _, u in held]) if held else np.zeros(0, np.int64)
    assert set(everything.tolist()) == {len(ids) - 1 - k for k in (0, 1, 2, 3)}  # the out-of-order one too


def test_a_binned_rig_is_decoded_from_whole_bins_as_the_offline_reference(corpus, decoder, tmp_path):
    """A count stream (replay --bin-ms): each tick's window ends at the newest bin end it holds, its
    spikes are exactly those bins' counts placed evenly inside them, and what was published is the
    offline causal decode of them."""
    from pretrain.live.serve import ServeConfig, load_log, serve
    from pretrain.live.streams import counts_to_spikes

    dec, reader = decoder, decoder.reader
    speed, bin_s, start = 5.0, 0.02, 2.0
    rep = ReplayConfig(str(corpus), "s1", speed=speed, start_s=start, duration_s=6.0, name="test-bins",
                       source_id="test-bins", wait_consumers_s=30.0, linger_s=0.5, bin_ms=bin_s * 1000)
    log = tmp_path / "bins.npz"
    scfg = ServeConfig(stream="test-bins", period_ms=20.0, speed=speed, lag_ms=10.0, name="test-bins-pred", log=str(log))
    done, out = threading.Event(), {}
    serving = threading.Thread(target=lambda: out.setdefault("serve", serve(dec, scfg, stop=done.is_set)))
    serving.start()
    try:
        out["replay"] = replay(rep)
    finally:
        done.set()
        serving.join(timeout=60)
    r, ticks = out["replay"], load_log(log)
    t_all, u_all = reader.spikes()
    n_bins = int(round(6.0 / bin_s))
    k = np.floor((t_all - start) / bin_s).astype(np.int64)
    keep = (t_all >= start) & (k < n_bins)
    counts = np.zeros((n_bins, len(reader.unit_ids)), np.int64)
    np.add.at(counts, (k[keep], u_all[keep]), 1)
    ends = r.lsl_t0 + np.arange(1, n_bins + 1) * bin_s / speed
    sent_t, sent_u = counts_to_spikes(ends, counts, bin_s / speed)
    assert r.spikes == keep.sum() == len(sent_t) and len(ticks["ticks"]) > 20
    cuts = ticks["cuts"][[len(t) > 0 for t, _ in ticks["spikes"]]]
    offset = float(np.median(cuts - ends[np.abs(ends[None] - cuts[:, None]).argmin(1)]))  # LSL time correction
    assert abs(offset) < 1e-3
    ends, sent_t = ends + offset, sent_t + offset
    used = 0
    for tick, cut, row, (t, u) in zip(ticks["ticks"], ticks["cuts"], ticks["predictions"], ticks["spikes"], strict=True):
        assert cut <= tick and (t < cut).all()
        if len(t) == 0:
            continue
        assert np.abs(ends - cut).min() < 1e-6  # a bin end: no bin that ended after the tick was used
        lo, hi = np.searchsorted(sent_t, (cut - 1.0 / speed - 1e-7, cut - 1e-7))
        np.testing.assert_allclose(t, sent_t[lo:hi], rtol=0, atol=1e-5)  # the bins' spikes, placed in them
        assert (u == sent_u[lo:hi]).all()
        again = np.concatenate(list(dec.predict([dec.window(cut * speed, t * speed, u)]).values()), axis=1)[0]
        np.testing.assert_allclose(row, again, rtol=1e-5, atol=1e-6)
        used += 1
    assert used > 20
