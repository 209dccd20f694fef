"""The window index: a keyed permutation of each epoch's windows, the same at any worker count."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import simple_session

from data_service.errors import CorpusError
from data_service.reader import open_corpus
from data_service.splits import make_splits
from data_service.store import CorpusStore
from data_service.window_index import IndexConfig, WindowIndex, permute


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("wi") / "corpus"
    with CorpusStore(root) as st:
        for i, dur in enumerate([60.0, 90.0, 45.0]):
            s = simple_session(f"s{i}", duration=dur, n_units=5, seed=i)
            make_splits(s)
            st.add(s)
    return open_corpus(root)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
    p = permute(np.arange(n), n, key=12345)
    assert sorted(p.tolist()) == list(range(n))
    if n > 8:
        assert not np.array_equal(p, np.arange(n))
        assert not np.array_equal(p, permute(np.arange(n), n, key=54321))


def test_epoch_covers_every_train_window_once(corpus):
    idx = WindowIndex(corpus, IndexConfig(window_s=1.0))
    n = idx.epoch_size(0)
    wins = idx.windows(0, n)
    assert [w.position for w in wins] == list(range(n))
    assert {w.epoch for w in wins} == {0}
    by_session: dict[str, list[float]] = {}
    for w in wins:
        by_session.setdefault(w.session, []).append(w.t_start)
    for sid, starts in by_session.items():
        train = corpus.session(sid).intervals["train"]
        starts = np.sort(starts)
        # inside a train interval, non-overlapping, and as many as fit after the jitter
        inside = [(train[:, 0] <= t + 1e-9).any() and ((train[:, 0] <= t + 1e-9) & (t + 1.0 <= train[:, 1] + 1e-9)).any()
                  for t in starts]
        assert all(inside), sid
        same_interval = np.diff(starts) < 1.0 - 1e-9
        assert not same_interval.any(), sid
        fit = np.floor((train[:, 1] - train[:, 0]) / 1.0).sum()
        assert fit - len(train) <= len(starts) <= fit
    # consecutive positions are shuffled across sessions
    assert len({w.session for w in wins[:10]}) > 1


def test_epochs_differ_and_jitter(corpus):
    idx = WindowIndex(corpus, IndexConfig(window_s=1.0))
    n0 = idx.epoch_size(0)
    e0, e1 = idx.windows(0, n0), idx.windows(n0, idx.epoch_size(1))
    assert {w.epoch for w in e1} == {1}
    frac0 = {round(w.t_start % 1.0, 6) for w in e0}
    frac1 = {round(w.t_start % 1.0, 6) for w in e1}
    assert frac0 != frac1  # window starts move between epochs
    assert [w.session for w in e0[:20]] != [w.session for w in e1[:20]]


def test_order_is_a_function_of_corpus_seed_epoch_only(corpus):
    a = WindowIndex(corpus, IndexConfig(window_s=1.0, seed=3))
    b = WindowIndex(corpus, IndexConfig(window_s=1.0, seed=3))
    c = WindowIndex(corpus, IndexConfig(window_s=1.0, seed=4))
    span = a.epoch_size(0) + 50  # across an epoch boundary
    whole = a.windows(0, span)
    assert whole == b.windows(0, span)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.windows(0, 30) != c.windows(0, 30)
    # random access: any slice equals the same part of the whole stream
    n0 = a.epoch_size(0)
    assert a.windows(n0 - 20, 40) == whole[n0 - 20:n0 + 20]
    assert a.windows(7, 13) == whole[7:20]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_workers_split_each_global_batch(corpus, world):
    """Every window of every batch once, in order, at any number of workers (3 and 5 do not divide
    8: an elastic run's survivors), the shares within one window of each other."""
    idx = WindowIndex(corpus, IndexConfig(window_s=1.0))
    B = 8
    whole = idx.windows(0, 5 * B)
    got = []
    for b in range(5):
        shares = [idx.worker_windows(b, B, r, world) for r in range(world)]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        got += [w for share in shares for w in share]
    assert got == whole
    with pytest.raises(ValueError, match="cannot share"):
        idx.worker_windows(0, 6, 0, 7)


def test_session_weights(corpus):
    base = WindowIndex(corpus, IndexConfig(window_s=1.0))
    w = WindowIndex(corpus, IndexConfig(window_s=1.0, session_weights={"s0": 2.0, "s1": 0.0}))
    count = lambda idx: {s: sum(x.session == s for x in idx.windows(0, idx.epoch_size(0))) for s in ("s0", "s1", "s2")}  # noqa: E731
    cb, cw = count(base), count(w)
    assert cw["s1"] == 0
    assert abs(cw["s0"] - 2 * cb["s0"]) <= 2
    assert abs(cw["s2"] - cb["s2"]) <= 1


def test_restrict_sessions_and_errors(corpus):
    idx = WindowIndex(corpus, IndexConfig(window_s=1.0, sessions=["s2"]))
    assert {w.session for w in idx.windows(0, idx.epoch_size(0))} == {"s2"}
    with pytest.raises(CorpusError, match="nope"):
        WindowIndex(corpus, IndexConfig(sessions=["nope"]))
    with pytest.raises(CorpusError, match="no 1000.0 s window"):
        WindowIndex(corpus, IndexConfig(window_s=1000.0))
    with pytest.raises(CorpusError, match="intervals/bogus"):
        WindowIndex(corpus, IndexConfig(split="bogus"))


def test_many_epochs_stay_cheap(corpus):
    idx = WindowIndex(corpus, IndexConfig(window_s=1.0))
    far = 500 * idx.epoch_size(0)
    (w,) = idx.windows(far, 1)
    assert w.epoch >= 400
    assert len(idx._epoch_ends) <= w.epoch + 2
