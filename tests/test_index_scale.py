"""The window index built from a corpus description, and its blocked order (`block_windows`):
invariants, not figures (the figures at 10,000 sessions are bench/index_scale.py's). Every window
of an epoch exactly once, the same stream at any world size, exact shares per rank, resume from
any position, blocks that are k adjacent windows, and the default order left exactly as it was."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from data_service.errors import ConfigError, CorpusError
from data_service.window_index import IndexConfig, WindowIndex, index_fingerprint

IDS = [f"sub{i % 5}/sess{i:03d}" for i in range(40)]


def description(seed: int = 7) -> dict[str, np.ndarray]:
    """40 sessions of 1-5 random train intervals in 0..900 s (some shorter than a block, some than a window)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in IDS:
        n = int(rng.integers(1, 6))
        out[s] = np.sort(rng.uniform(0, 900, 2 * n)).reshape(-1, 2)
    return out


DESC = description()


def index(**kw) -> WindowIndex:
    return WindowIndex.from_intervals(DESC, "simfp0123", IndexConfig(**kw))


def listing(idx: WindowIndex, epoch: int) -> list[tuple[str, float, int, int]]:
    """(session, t_start, row, k) of each window of the epoch, row by row: what the order permutes."""
    cum, offset, base, _ = idx._epoch(epoch)
    out = []
    for r in range(len(idx.row_len)):
        drawn = int(cum[r + 1] - cum[r])
        for j in range(drawn):
            k = j if drawn == base[r] else (j * int(base[r])) // max(drawn, 1)
            out.append((idx.session_ids[idx.row_session[r]], float(idx.row_start[r] + offset[r] + k * idx.cfg.window_s),
                        r, j))
    return out


def epoch_windows(idx: WindowIndex, epoch: int):
    start = sum(idx.epoch_size(e) for e in range(epoch))
    return start, idx.windows(start, idx.epoch_size(epoch))


# ---- the default order is what it was ---------------------------------------------------------------
def test_default_fingerprints_and_order_are_unchanged():
    """Values computed with the code before `block_windows` and `from_intervals` existed (the same
    description behind a stand-in corpus object)."""
    assert index_fingerprint("abc", IndexConfig()) == "9dc53b5c589e2adb"
    assert index_fingerprint("abc", IndexConfig(block_windows=1)) == "9dc53b5c589e2adb"
    assert index_fingerprint("abc", IndexConfig(window_s=1.0, seed=3, sessions=["a", "b"],
                                                session_weights={"a": 2.0})) == "9185aa6d08e2429a"
    assert index_fingerprint("abc", IndexConfig(block_windows=4)) != "9dc53b5c589e2adb"
    cases = {
        "d3e9b8f931584da5": (IndexConfig(), 15376, "8838b584341ef1bb"),
        "3ca5d89ed4fd9c8f": (IndexConfig(window_s=0.5, seed=5, session_weights={IDS[0]: 2.5, IDS[1]: 0.3}), 31994,
                             "e816b1a78ec358ec"),
        "6d0447430f7c8112": (IndexConfig(sessions=IDS[:10], intervals={IDS[0]: [[10.0, 100.0]]}), 4231,
                             "204fc6623327335c"),
    }
    for fp, (cfg, n, order) in cases.items():
        idx = WindowIndex.from_intervals(DESC, "simfp0123", cfg)
        assert idx.fingerprint == fp and idx.epoch_size(0) == n
        w = [[x.position, x.epoch, x.session, x.t_start] for x in idx.windows(0, n + 777)]
        assert hashlib.sha256(json.dumps(w).encode()).hexdigest()[:16] == order


def test_from_intervals_is_the_corpus_index(tmp_path):
    """The constructor goes through from_intervals: same fingerprint and stream for a real corpus."""
    from conftest import simple_session

    from data_service.reader import open_corpus
    from data_service.splits import make_splits
    from data_service.store import CorpusStore

    with CorpusStore(tmp_path / "c") as st:
        for i, dur in enumerate([40.0, 25.0]):
            s = simple_session(f"s{i}", duration=dur, n_units=3, seed=i)
            make_splits(s)
            st.add(s)
    c = open_corpus(tmp_path / "c")
    desc = {sid: c.session(sid).intervals["train"] for sid in c.session_ids}
    for cfg in (IndexConfig(), IndexConfig(seed=2, block_windows=4, sessions=["s1", "s0"])):
        a, b = WindowIndex(c, cfg), WindowIndex.from_intervals(desc, c.fingerprint, cfg)
        assert a.fingerprint == b.fingerprint
        assert a.windows(0, 2 * a.epoch_size(0) + 3) == b.windows(0, 2 * a.epoch_size(0) + 3)
    with pytest.raises(CorpusError, match="not in the corpus"):
        WindowIndex.from_intervals(desc, "x", IndexConfig(sessions=["nope"]))
    with pytest.raises(CorpusError, match="no 'train' split"):
        WindowIndex.from_intervals({"s0": None}, "x", IndexConfig())


# ---- blocked order: invariants ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 8, 64])
@pytest.mark.parametrize("weights", [{}, {IDS[0]: 2.5, IDS[3]: 0.0, IDS[4]: 0.4}])
def test_every_window_of_an_epoch_exactly_once(k, weights):
    idx = index(block_windows=k, session_weights=weights)
    for epoch in (0, 1, 2):
        _, wins = epoch_windows(idx, epoch)
        assert {w.epoch for w in wins} == {epoch}
        got = sorted((w.session, w.t_start) for w in wins)
        assert got == sorted((s, t) for s, t, _, _ in listing(idx, epoch))


@pytest.mark.parametrize("k", [4, 8])
def test_blocks_are_k_adjacent_windows(k):
    """Each block of k stream positions on the grid (j k .. j k + k - 1, inside one epoch) is k
    consecutive windows of the listing: the same interval, one window apart, except where an
    interval ends (then the next interval's first window; the listing's last wraps to its first)."""
    idx = index(block_windows=k)
    for epoch in (0, 1, 3):
        start, wins = epoch_windows(idx, epoch)
        lst = listing(idx, epoch)
        where = {(s, t): i for i, (s, t, _, _) in enumerate(lst)}
        n = len(lst)
        first = -(-start // k) * k
        blocks = 0
        for b0 in range(first, start + n - k + 1, k):
            li = [where[(w.session, w.t_start)] for w in wins[b0 - start:b0 - start + k]]
            for a, b in zip(li, li[1:]):
                assert b == (a + 1) % n
                (sa, ta, ra, ja), (sb, tb, rb, jb) = lst[a], lst[b]
                if ra == rb:
                    assert sa == sb and tb - ta == pytest.approx(idx.cfg.window_s)
                else:  # an interval's end: its last window, then the next interval's first
                    assert ja == int(idx._epoch(epoch)[0][ra + 1] - idx._epoch(epoch)[0][ra]) - 1 and jb == 0
            blocks += 1
        assert blocks == (start + n - first) // k
    # and blocks move: the block edges of epoch 0 are not those of epoch 1
    assert [w.session for w in epoch_windows(idx, 0)[1][:64]] != [w.session for w in epoch_windows(idx, 1)[1][:64]]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_order_does_not_depend_on_world_size_and_ranks_are_balanced(k):
    idx = index(block_windows=k)
    gb = 32
    n0 = idx.epoch_size(0)
    for batch in (0, 1, n0 // gb, n0 // gb + 1, 3 * n0 // gb):  # including batches across epoch ends
        whole = idx.windows(batch * gb, gb)
        for world in (1, 2, 4, 8, 16, 32):
            parts = [idx.worker_windows(batch, gb, r, world) for r in range(world)]
            assert all(len(p) == gb // world for p in parts)
            assert [w for p in parts for w in p] == whole
        parts = [idx.worker_windows(batch, gb, r, 3) for r in range(3)]  # 3 does not divide 32
        assert [len(p) for p in parts] == [10, 11, 11] and [w for p in parts for w in p] == whole


@pytest.mark.parametrize("k", [4, 16])
def test_resume_from_any_position(k):
    idx = index(block_windows=k, seed=1)
    span = 2 * idx.epoch_size(0) + 100
    whole = idx.windows(0, span)
    fresh = index(block_windows=k, seed=1)  # a restarted process: nothing but the config and a position
    rng = np.random.default_rng(0)
    for start in [0, 1, idx.epoch_size(0) - 5, *rng.integers(0, span - 70, 10).tolist()]:
        assert fresh.windows(start, 70) == whole[start:start + 70]
    assert index(block_windows=k, seed=2).windows(0, 50) != whole[:50]


def test_a_rank_share_of_k_windows_is_one_block():
    """What blocking is for: a rank whose share is k reads one interval (or two, where one ends)."""
    idx = index(block_windows=8)
    one = index()
    gb, world = 64, 8
    steps = range(0, 3 * idx.epoch_size(0) // gb)
    blocked = [len({w.session for w in idx.worker_windows(b, gb, 3, world)}) for b in steps]
    plain = [len({w.session for w in one.worker_windows(b, gb, 3, world)}) for b in steps]
    assert max(blocked) <= 2 and np.mean(blocked) < 1.2 and np.mean(plain) > 4


# ---- configuration ------------------------------------------------------------------------------------
def test_bad_block_sizes_are_refused():
    from pretrain.run.config import load_config

    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="block_windows"):
            IndexConfig(block_windows=bad)
    for bad in ("0", "-2", "2.5", "true"):
        with pytest.raises(ConfigError, match="data.block_windows"):
            load_config(None, [f"data.block_windows={bad}"])
    assert load_config(None, ["data.block_windows=8"]).data.block_windows == 8
    assert load_config(None, []).data.block_windows == 1


def test_the_plan_carries_it(tmp_path):
    from data_service.synth import SynthConfig, synth_corpus
    from pretrain.run.plan import PlanMismatch, RunPlan, build_plan

    root = tmp_path / "corpus"
    synth_corpus(SynthConfig(sessions=2, subjects=1, minutes=0.5, min_units=5, max_units=8, seed=1), root)
    base = [f"data.corpus={root}", "train.warm_start.method=none"]
    plain = build_plan(load(base))
    blocked = build_plan(load([*base, "data.block_windows=4"]))
    assert plain.index.block_windows == 1 and blocked.index.block_windows == 4
    assert blocked.index_fingerprint != plain.index_fingerprint
    old = plain.to_dict()
    del old["index"]["block_windows"]  # a plan saved before the option existed reads back the same
    assert RunPlan.from_dict(old) == plain
    assert RunPlan.from_dict(blocked.to_dict()).index.block_windows == 4
    with pytest.raises(PlanMismatch, match="window order"):
        build_plan(load([*base, "data.block_windows=8"]), previous=blocked)


def load(overrides):
    from pretrain.run.config import load_config

    return load_config(None, overrides)
