"""Reading a batch of windows at once (data_service/batch.py) gives what reading them one by one
gives; unit dropout drawn for a whole batch equals the window-by-window draw; the data service's
batch path serves what its window-by-window path serves."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_service.augment import AugmentConfig, _uniforms, keep_units, unit_masks
from data_service.batch import WindowBatch, read_batch, segment_counts, segment_sums
from data_service.reader import SessionReader, open_corpus
from data_service.service import build_batch
from data_service.synth import SynthConfig, synth_corpus
from pretrain.run.config import load_config
from pretrain.run.plan import build_plan


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch") / "c"
    synth_corpus(SynthConfig(sessions=4, subjects=2, minutes=1.0, min_units=10, max_units=60, seed=5), root)
    return root


def _same_window(a, b) -> None:
    assert (a.session_id, a.t_start, a.t_end) == (b.session_id, b.t_start, b.t_end)
    for x, y in ((a.spike_times, b.spike_times), (a.spike_units, b.spike_units)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert a.behaviour.keys() == b.behaviour.keys()
    for k in a.behaviour:
        assert np.array_equal(a.behaviour[k].timestamps, b.behaviour[k].timestamps)
        assert np.array_equal(a.behaviour[k].values, b.behaviour[k].values)
    for name in set(a.intervals) | set(b.intervals):  # a set a session lacks has no rows in batch form
        assert np.array_equal(a.intervals.get(name, np.zeros((0, 2))), b.intervals.get(name, np.zeros((0, 2)))), name


def test_a_batch_read_equals_reading_window_by_window(corpus):
    """Windows across sessions, at a session's first and last second, before its start, shorter
    than a spike gap, and an interval set whose rows overlap one another (filtered and clipped)."""
    c = open_corpus(corpus)
    readers = []
    for sid in c.session_ids:
        r = SessionReader(c.root, sid)
        rows = r.intervals["trials"]
        # overlapping rows: every trial again, stretched to end 3 s later (some end before a window)
        r.__dict__["intervals"] = {**r.intervals, "wide": np.concatenate([rows, rows + [0.0, 3.0]])}
        readers.append(r)
    rng = np.random.default_rng(0)
    picks, starts = [], []
    for k in range(40):
        r = readers[k % len(readers)]
        end = float(r.domain[-1][1])
        t0 = [0.0, end - 1.0, -0.5, float(rng.uniform(0, end - 1.0))][k % 4] if k < 12 else float(rng.uniform(0, end - 1))
        picks.append(r)
        starts.append(t0)
    needs = [(["hand_vel"], ["reach", "wide", "missing"]) if k % 2 else (["hand_vel", "hand_pos"], ["hold"])
             for k in range(len(picks))]
    for width in (1.0, 1e-4):
        got = read_batch(picks, starts, width, needs)
        assert len(got) == len(picks)
        for i, (r, t0, (beh, sets)) in enumerate(zip(picks, starts, needs)):
            want = r.read_window(t0, t0 + width, behaviours=beh, intervals=sets)
            _same_window(got.window(i), want)
        # the windows read one by one, in batch form, are the same batch
        again = WindowBatch.of([r.read_window(t0, t0 + width, behaviours=b, intervals=s)
                                for r, t0, (b, s) in zip(picks, starts, needs)])
        for i in range(len(picks)):
            _same_window(again.window(i), got.window(i))
    assert sum(len(w.behaviour) for w in [got.window(i) for i in range(len(picks))]) > len(picks)


def test_a_windows_rows_are_a_search_over_the_whole_session(corpus):
    """The spike rows of a window (searched from the index's guess, reading only the window's
    chunks) are np.searchsorted over all of the session's spike times, at any start: before
    the session, on a second's boundary, past its end."""
    c = open_corpus(corpus)
    rng = np.random.default_rng(3)
    for sid in c.session_ids:
        r = c.session(sid)
        times, _ = r.spikes()
        end = float(r.domain[-1][1])
        for t0 in [-2.0, 0.0, 1.0, 5.0, end - 1.0, end, end + 3.0, *rng.uniform(0, end, 30)]:
            for width in (1.0, 0.25, 3.0):
                want = tuple(int(x) for x in np.searchsorted(times, (t0, t0 + width), side="left"))
                assert r.spike_rows(t0, t0 + width) == want, (sid, t0, width)


def test_segment_counts_match_a_cumulative_sum():
    rng = np.random.default_rng(1)
    for _ in range(50):
        lens = rng.integers(0, 6, rng.integers(0, 9))
        flags = rng.random(int(lens.sum())) < 0.5
        want = [int(flags[a - n:a].sum()) for a, n in zip(np.cumsum(lens), lens)]
        assert segment_sums(flags, lens).tolist() == want
        assert segment_counts(np.flatnonzero(flags), lens).tolist() == want


@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(min_units=5, mode_units=5, max_units=5),
                                 AugmentConfig(min_units=10, mode_units=50, max_units=20),
                                 AugmentConfig(unit_dropout=False)])
def test_unit_masks_for_a_batch_equal_the_window_by_window_draw(cfg):
    """The batch's masks are `keep_units` window by window (same counts, same units), including
    windows of sessions with fewer units than the minimum, or without units."""
    rng = np.random.default_rng(2)
    for trial in range(60):
        b = int(rng.integers(0, 40))
        positions = rng.integers(0, 10**9, b).tolist()
        n_units = rng.integers(0, 400, b).tolist() if trial % 3 else [int(rng.integers(0, 40))] * b
        draws = [_uniforms(7, p, "units", n + 1) for p, n in zip(positions, n_units)]  # the definition, window by window
        want = [keep_units(n, cfg, u) for n, u in zip(n_units, draws)]
        got = unit_masks(cfg, 7, positions, n_units)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                assert g.dtype == bool and np.array_equal(g, w)


class _OneByOne:
    """The run's tokenizer without `pack_batch`: the service reads and packs window by window."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def needs(self, reader):
        return self.tok.needs(reader)

    def pack(self, items):
        return self.tok.pack(items)


def test_the_service_serves_the_same_batches_either_way(corpus):
    run = load_config(None, [f"data.corpus={corpus}", "data.global_batch=8"])
    spec = build_plan(run).service_spec()
    slow = dataclasses.replace(spec, tokenizer=_OneByOne(spec.tokenizer))
    for number in range(6):
        for rank, world in ((0, 1), (1, 2)):
            a, b = build_batch(spec, number, rank, world), build_batch(slow, number, rank, world)
            assert a.positions.tolist() == b.positions.tolist() and a.skipped == b.skipped == []
            x, y = a.data.to_dict(), b.data.to_dict()
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], np.ndarray):
                    assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
                else:
                    assert list(x[k]) == list(y[k]), k
