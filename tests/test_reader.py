import numpy as np
import pytest
import zarr
from conftest import simple_session

from data_service import intervals as iv
from data_service.format import Chunking
from data_service.reader import Corpus, open_corpus
from data_service.shards import CACHE, ChecksumError, open_sharded
from data_service.splits import make_splits
from data_service.store import CorpusStore, write_session_group


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader") / "corpus"
    sessions = [simple_session("a", duration=300.0, n_units=30, seed=1),
                simple_session("b", duration=90.5, n_units=7, rate=3.0, seed=2)]
    for s in sessions:
        s.domain[:] = [[0.0, s.domain[0, 1]]]
        make_splits(s)
    with CorpusStore(root) as st:
        for s in sessions:
            st.add(s)
    return root, {s.session_id: s for s in sessions}


def _expected(s, t0, t1):
    m = (s.spike_times >= t0) & (s.spike_times < t1)
    b = s.behaviour["hand_vel"]
    bm = (b.timestamps >= t0) & (b.timestamps < t1)
    return s.spike_times[m] - t0, s.spike_units[m], b.timestamps[bm] - t0, b.values[bm]


def test_random_windows_equal_brute_force_slices(corpus):
    root, sessions = corpus
    c = open_corpus(root)
    rng = np.random.default_rng(0)
    for sid, s in sessions.items():
        r = c.session(sid)
        starts = np.concatenate([rng.uniform(-2, s.t_end + 1, 300), [0.0, s.t_end - 1, -5.0, s.t_end + 3, 17.0]])
        lengths = np.concatenate([rng.choice([0.01, 0.5, 1.0, 7.3], 300), [1, 1, 1, 1, 0.0]])
        for t0, d in zip(starts, lengths):
            w = r.read_window(t0, t0 + d)
            et, eu, ebt, ebv = _expected(s, t0, t0 + d)
            assert np.array_equal(w.spike_times, et)
            assert np.array_equal(w.spike_units, eu)
            assert w.spike_units.dtype == np.int64
            assert np.array_equal(w.behaviour["hand_vel"].timestamps, ebt)
            assert np.array_equal(w.behaviour["hand_vel"].values, ebv)
            for name, rows in s.intervals.items():
                want = iv.intersect(rows, [[t0, t0 + d]]) - t0 if d > 0 else iv.EMPTY
                assert np.allclose(iv.normalize(w.intervals[name]), iv.normalize(want)), (sid, name, t0)


def test_regular_and_irregular_behaviour_give_the_same_windows(tmp_path):
    """A regularly sampled behaviour is read by arithmetic (its grid), an irregular one through
    its index; both must return exactly the stored samples."""
    s = simple_session("g", duration=200.0)
    jittered = simple_session("j", duration=200.0)
    b = jittered.behaviour["hand_vel"]
    b.timestamps = b.timestamps + np.random.default_rng(0).uniform(0, 1e-3, len(b.timestamps))
    with CorpusStore(tmp_path / "c") as st:
        st.add(s)
        st.add(jittered)
    c = open_corpus(tmp_path / "c")
    assert c.session("g").attrs["behaviour"]["hand_vel"]["grid"] == {"t0": 0.0, "step": 0.01}
    assert c.session("j").attrs["behaviour"]["hand_vel"]["grid"] is None
    for sess in (s, jittered):
        r = c.session(sess.session_id)
        for t0 in np.random.default_rng(1).uniform(-1, 200, 300).tolist() + [0.0, 0.01, 199.99, 57.3]:
            _, _, ebt, ebv = _expected(sess, t0, t0 + 1.0)
            w = r.read_window(t0, t0 + 1.0)
            assert np.array_equal(w.behaviour["hand_vel"].timestamps, ebt)
            assert np.array_equal(w.behaviour["hand_vel"].values, ebv)


def test_window_spanning_many_chunks(corpus):
    root, sessions = corpus
    s = sessions["a"]
    w = open_corpus(root).read_window("a", 10.0, 80.0)  # ~42k spikes: many 4096-spike chunks
    et, eu, _, _ = _expected(s, 10.0, 80.0)
    assert len(et) > 5 * 4096
    assert np.array_equal(w.spike_times, et) and np.array_equal(w.spike_units, eu)


def test_interval_masks_follow_the_intervals(corpus):
    root, sessions = corpus
    w = open_corpus(root).read_window("a", 40.0, 52.0)
    masks = w.interval_masks("hand_vel")
    t = w.behaviour["hand_vel"].timestamps + 40.0
    for name, rows in sessions["a"].intervals.items():
        assert np.array_equal(masks[name], iv.contains(iv.normalize(rows), t))


def test_fast_shard_reader_agrees_with_zarr_on_every_array(corpus):
    root, _ = corpus
    checked = 0
    for arr_dir in sorted(root.glob("sessions/*/**/zarr.json")):
        d = arr_dir.parent
        meta = zarr.open(str(d), mode="r")
        if not isinstance(meta, zarr.Array):
            continue
        fast = open_sharded(d)
        if fast is None:
            assert meta.dtype.kind in "OUT" or "sharding" not in str(meta.metadata.codecs)
            continue
        ref = np.asarray(meta[...])
        assert np.array_equal(fast.read_all(), ref)
        n = len(ref)
        for a, b in [(0, 1), (n - 1, n), (4095, 4097), (n // 3, n // 2), (5, 5)]:
            assert np.array_equal(fast.read(a, b), ref[max(0, a):b])
        checked += 1
    assert checked >= 6


def test_fast_reader_handles_multi_shard_arrays_and_chunk_cache(tmp_path):
    chunking = Chunking(chunk=1000, shard=8000)  # 7 shards, the last one partial
    s = simple_session("c", duration=10.0)
    s.spike_times = np.sort(np.random.default_rng(1).uniform(0, 10, 50_000))
    s.spike_units = np.zeros(50_000, dtype=np.int64)
    write_session_group(tmp_path / "g", s, chunking)
    fast = open_sharded(tmp_path / "g" / "spikes" / "timestamps")
    assert np.array_equal(fast.read_all(), s.spike_times)
    assert np.array_equal(fast.read(7999, 16001), s.spike_times[7999:16001])
    before = CACHE.hits
    fast.read(7999, 16001)
    assert CACHE.hits > before


def test_chunk_aware_search_equals_searchsorted_and_reads_only_the_answers_chunk(tmp_path):
    """ShardedArray.search gives np.searchsorted(side="left") over [a, b) for any guess (ties,
    values outside the rows, empty ranges, guesses outside [a, b)), and with the right chunk
    guessed it decodes that chunk alone."""
    chunking = Chunking(chunk=1000, shard=8000)
    s = simple_session("e", duration=10.0)
    rng = np.random.default_rng(4)
    s.spike_times = np.sort(np.round(rng.uniform(0, 10, 20_000), 3))  # rounded: many ties
    s.spike_units = np.zeros(20_000, dtype=np.int64)
    write_session_group(tmp_path / "g", s, chunking)
    fast = open_sharded(tmp_path / "g" / "spikes" / "timestamps")
    ref = s.spike_times
    n = len(ref)
    for _ in range(400):
        a, b = sorted(int(x) for x in rng.integers(0, n + 1, 2))
        t = float(rng.choice([rng.uniform(-1, 11), ref[min(int(rng.integers(0, n)), n - 1)]]))
        guess = int(rng.integers(-50, n + 50))
        assert fast.search(t, a, b, guess) == a + int(np.searchsorted(ref[a:b], t, side="left")), (t, a, b, guess)
    CACHE.clear()
    misses = CACHE.misses
    row = 12_345
    assert fast.search(float(ref[row]), 0, n, row) == int(np.searchsorted(ref, ref[row], side="left"))
    assert CACHE.misses - misses == 1


def test_corrupted_chunk_is_detected_by_crc(tmp_path):
    s = simple_session("d", duration=60.0)
    write_session_group(tmp_path / "g", s)
    shard = tmp_path / "g" / "spikes" / "timestamps" / "0"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    CACHE.clear()
    with pytest.raises(ChecksumError, match="crc32c"):
        open_sharded(tmp_path / "g" / "spikes" / "timestamps").read(0, 10)


def test_corpus_refuses_unknown_directories_and_sessions(tmp_path, corpus):
    from data_service.errors import CorpusError

    with pytest.raises(CorpusError, match="not a popscale corpus"):
        Corpus(tmp_path)
    root, _ = corpus
    with pytest.raises(CorpusError, match="no such session") as e:
        open_corpus(root).session("nope")
    assert e.value.session == "nope"


def test_a_damaged_chunk_checksum_is_detected_too(tmp_path):
    """The chunk check runs over payload and stored crc together (the CRC residue): a flipped bit
    in the stored crc itself must fail as surely as one in the payload."""
    s = simple_session("k", duration=60.0)
    write_session_group(tmp_path / "g", s)
    a = open_sharded(tmp_path / "g" / "spikes" / "timestamps")
    f, chunks = a._shard_index(0)
    offset, nbytes = chunks[1]
    raw = bytearray(open(f, "rb").read())
    raw[offset + nbytes - 2] ^= 0x10
    open(f, "wb").write(bytes(raw))
    CACHE.clear()
    b = open_sharded(tmp_path / "g" / "spikes" / "timestamps")
    assert np.array_equal(b.read(0, 10), s.spike_times[:10])  # chunk 0 is intact
    with pytest.raises(ChecksumError, match="crc32c mismatch in chunk 1"):
        b.read(4096, 4100)


def test_a_forked_child_opens_its_own_descriptors(tmp_path):
    """A forked reader process must not share the parent's file offsets/descriptors: the pool
    forgets them in the child (a fork hook), and the child still reads correctly."""
    import os

    from data_service import shards

    s = simple_session("f", duration=30.0)
    write_session_group(tmp_path / "g", s)
    CACHE.clear()
    open_sharded(tmp_path / "g" / "spikes" / "timestamps").read(0, 10)
    assert shards._handles._fds  # the parent holds a descriptor
    pid = os.fork()
    if pid == 0:  # child: report through the exit code only
        ok = not shards._handles._fds
        CACHE.clear()
        ok = ok and np.array_equal(open_sharded(tmp_path / "g" / "spikes" / "timestamps").read(0, 10),
                                   s.spike_times[:10])
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert shards._handles._fds  # the parent's pool is untouched
