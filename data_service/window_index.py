"""The global order of training windows: a function of (corpus fingerprint, seed, epoch) alone.

Each epoch, every train interval of every session is cut into consecutive windows after a
random start offset (the per-epoch jitter), optionally up- or down-sampled by a per-session
weight, and the epoch's windows are visited in a keyed pseudo-random permutation. Nothing of
size "windows per epoch" is ever built: the index keeps one row per train interval (a 10,000-
session corpus with 100 intervals each is 10^6 rows: 28 MB, plus 24 MB for each of the 4 epochs
it caches; bench/index_scale.py), computes each epoch's window counts from them in one
vectorised pass, and maps a position in the epoch to its window with a Feistel permutation plus
a binary search over the cumulative counts (as levanter does).

The stream is the concatenation of epochs; global batch b is stream positions [b B, (b+1) B);
worker r of W takes positions [b B + r B/W, b B + (r+1) B/W). The order therefore does not
depend on W, and a loader's whole state is the number of samples consumed (plus the index
fingerprint, checked on resume).

Blocked order (`IndexConfig.block_windows` = k > 1, opt-in): the epoch's windows, listed row by
row (session by session, interval by interval, in time order), are cut into blocks of k
consecutive windows, and the permutation moves whole blocks: k consecutive stream positions are
k adjacent windows of one interval (or of the next interval at an interval's end), so a worker's
slice of a batch reads a few sessions' neighbouring chunks instead of B/W sessions. Blocks sit on
the stream's grid (positions j k .. j k + k - 1), so a worker whose share B/W is a multiple of k
reads whole blocks in every epoch; the window listing is rotated by a per-epoch offset, so block
edges (and the short blocks at an epoch's two ends) move from epoch to epoch. Still a bijection
per epoch and still a function of (fingerprint, seed, epoch) and position alone. What it costs
in randomness and buys in locality at 10,000 sessions: bench/index_scale.py.

`WindowIndex.from_intervals` builds the same index from a corpus description (session ids, their
intervals, the corpus fingerprint) without a corpus; the constructor goes through it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import CorpusError
from .reader import Corpus
from .rng import key as _key
from .rng import mix, uniform


@dataclass
class IndexConfig:
    window_s: float = 1.0
    split: str = "train"
    seed: int = 0
    session_weights: dict[str, float] = field(default_factory=dict)  # session id -> weight (default 1)
    sessions: list[str] | None = None  # restrict to these sessions (default: every session)
    # session -> [[start, end], ...] used instead of its `split` (a label budget's part of the train split)
    intervals: dict[str, list[list[float]]] | None = None
    # shuffle blocks of this many consecutive windows of an interval instead of single windows (1: off).
    # Fewer sessions and chunks per worker per step, at the cost of fewer sessions per batch.
    block_windows: int = 1

    def __post_init__(self) -> None:
        k = self.block_windows
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"block_windows must be a whole number >= 1 (1: no blocks), got {k!r}")


@dataclass(frozen=True)
class WindowRef:
    position: int  # position in the global stream (across epochs)
    epoch: int
    session: str
    t_start: float


def index_fingerprint(corpus_fingerprint: str, cfg: IndexConfig) -> str:
    """What the window order is a function of: the corpus content and the index config. Cheap
    (no index is built), so a driver can check a resume or a plan without building one."""
    d = asdict(cfg)
    if d["intervals"] is None:
        del d["intervals"]  # so fingerprints of runs made before the field existed still match
    if d["block_windows"] == 1:
        del d["block_windows"]  # (the same: unblocked orders keep their fingerprints)
    return hashlib.sha256(json.dumps([corpus_fingerprint, d], sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _round_keys(key: int, rounds: int) -> tuple[np.uint64, ...]:
    return tuple(np.uint64(_key(key, r) & 0xFFFFFFFFFFFFFFFF) for r in range(rounds))


def permute(i: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A keyed bijection of [0, n) (balanced Feistel network + cycle-walking), vectorised."""
    if n <= 1:
        return np.zeros_like(i)
    bits = max(2, int(np.ceil(np.log2(n))))
    bits += bits % 2
    half = bits // 2
    mask = np.uint64((1 << half) - 1)
    keys = _round_keys(key, rounds)

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            f = mix(right ^ k) & mask
            left, right = right, left ^ f
        return (left << np.uint64(half)) | right

    x = once(i.astype(np.uint64))
    out = x >= np.uint64(n)
    while out.any():  # cycle-walk the few values that land outside [0, n)
        x[out] = once(x[out])
        out = x >= np.uint64(n)
    return x.astype(np.int64)


def worker_share(global_batch: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of a global batch that worker `rank` of `world` trains on (the same for every batch)."""
    return rank * global_batch // world, (rank + 1) * global_batch // world


class WindowIndex:
    """Random-access view of the training-window stream of a corpus."""

    def __init__(self, corpus: Corpus, cfg: IndexConfig) -> None:
        rows = self.split_intervals(corpus, cfg)
        self._build(list(rows), rows.__getitem__, corpus.fingerprint, cfg, str(corpus.root))

    @staticmethod
    def split_intervals(corpus: Corpus, cfg: IndexConfig, threads: int = 8) -> dict[str, np.ndarray | None]:
        """Each indexed session's `cfg.split` intervals, in index order: what `from_intervals` needs
        to make this same index again without opening a session. Opening every session costs ~6 ms
        each on a local disk and several requests each on object storage; a data actor (a new one per
        Ray dataset) would pay it for every session of the corpus."""
        ids = cfg.sessions if cfg.sessions is not None else corpus.session_ids
        unknown = [s for s in ids if s not in corpus.rows]
        if unknown:
            raise CorpusError(f"sessions not in the corpus: {unknown[:5]}", file=str(corpus.root))

        def read(sid: str) -> np.ndarray | None:
            iv = corpus.session(sid).intervals.get(cfg.split)
            return None if iv is None else np.asarray(iv, dtype=np.float64)

        # threads: on object storage each session is a few requests' latency, not CPU
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(ids)))) as pool:
            return dict(zip(ids, pool.map(read, ids)))

    @classmethod
    def from_intervals(cls, intervals: Mapping[str, np.ndarray | None], corpus_fingerprint: str, cfg: IndexConfig,
                       root: str = "") -> WindowIndex:
        """The index of a corpus described, not opened: `intervals` maps each session id, in corpus
        order, to its `cfg.split` intervals ((n, 2) seconds; None: the session has no such split).
        The same index, bit for bit, as `WindowIndex(corpus, cfg)` of a corpus with those sessions,
        intervals and fingerprint (`root` only names the corpus in errors)."""
        ids = cfg.sessions if cfg.sessions is not None else list(intervals)
        unknown = [s for s in ids if s not in intervals]
        if unknown:
            raise CorpusError(f"sessions not in the corpus: {unknown[:5]}", file=root)
        self = cls.__new__(cls)
        self._build(ids, intervals.__getitem__, corpus_fingerprint, cfg, root)
        return self

    def _build(self, ids: list[str], split_of: Callable[[str], np.ndarray | None], corpus_fingerprint: str,
               cfg: IndexConfig, root: str) -> None:
        """One row per train interval long enough for a window; `split_of(session)`: its split's intervals."""
        self.cfg = cfg
        rows_s, rows_a, rows_b = [], [], []
        for k, sid in enumerate(ids):
            iv = split_of(sid)
            if cfg.intervals is not None and sid in cfg.intervals:
                iv = np.asarray(cfg.intervals[sid], dtype=np.float64).reshape(-1, 2)
            if iv is None:
                raise CorpusError(f"session has no {cfg.split!r} split", file=root, session=sid,
                                  field=f"intervals/{cfg.split}")
            iv = np.asarray(iv, dtype=np.float64).reshape(-1, 2)
            iv = iv[(iv[:, 1] - iv[:, 0]) >= cfg.window_s]
            rows_s.append(np.full(len(iv), k, dtype=np.int32))
            rows_a.append(iv[:, 0])
            rows_b.append(iv[:, 1])
        self.session_ids = list(ids)
        self.row_session = np.concatenate(rows_s) if rows_s else np.zeros(0, np.int32)
        self.row_start = np.concatenate(rows_a) if rows_a else np.zeros(0)
        self.row_len = (np.concatenate(rows_b) if rows_b else np.zeros(0)) - self.row_start
        weights = np.array([float(cfg.session_weights.get(s, 1.0)) for s in ids])
        if (weights < 0).any():
            raise CorpusError("session weights must be >= 0")
        self.row_weight = weights[self.row_session] if len(self.row_session) else np.zeros(0)
        self.fingerprint = index_fingerprint(corpus_fingerprint, cfg)
        self._epochs: dict[int, tuple] = {}
        self._ahead: dict[tuple[int, int, int], dict[int, list[WindowRef]]] = {}
        self._epoch_ends: list[int] = [self.epoch_size(0)]
        if self._epoch_ends[0] == 0:
            raise CorpusError(f"no {cfg.window_s} s window fits in any {cfg.split!r} interval", file=root)

    # ---- one epoch --------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(cumulative counts, jitter offsets, base counts, permutation key) of an epoch (the
        last few are kept: a batch touches one epoch, rarely two)."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        if len(self._epochs) >= 4:
            self._epochs.pop(next(iter(self._epochs)))
        self._epochs[epoch] = out = self._compute_epoch(epoch)
        return out

    def _compute_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        w = self.cfg.window_s
        rows = np.arange(len(self.row_len), dtype=np.uint64)
        offset = uniform(_key(self.fingerprint, self.cfg.seed, epoch, "jitter"), rows) * w
        base = np.floor((self.row_len - offset) / w + 1e-9).astype(np.int64)
        base = np.maximum(base, 0)
        # per-session weights: stochastic rounding of weight x count, spread evenly over the row
        u = uniform(_key(self.fingerprint, self.cfg.seed, epoch, "weight"), rows)
        count = np.where(self.row_weight == 1.0, base, np.floor(base * self.row_weight + u).astype(np.int64))
        cum = np.concatenate([[0], np.cumsum(count)])
        return cum, offset, base, _key(self.fingerprint, self.cfg.seed, epoch, "order")

    def epoch_size(self, epoch: int) -> int:
        return int(self._epoch(epoch)[0][-1])

    def _order(self, p: np.ndarray, n: int, key: int, epoch: int, epoch_start: int) -> np.ndarray:
        """Which of the epoch's n windows (in row-major order) sits at each epoch position p
        (`epoch_start`: the stream position of the epoch's first window)."""
        k = self.cfg.block_windows
        if k == 1:
            return permute(p, n, key)
        # whole blocks of k on the stream's grid (stream positions j k .. j k + k - 1, so a worker
        # whose share of a batch is a multiple of k reads whole blocks in every epoch): the epoch's
        # positions [head, head + full k) are `full` block slots, permuted; the few positions before
        # (head < k) and after (< k) stay. The window listing is then rotated by a per-epoch offset,
        # so those short blocks and the block edges fall elsewhere every epoch.
        head = min((-epoch_start) % k, n)
        full = (n - head) // k
        slot, off = (p - head) // k, (p - head) % k
        inside = (p >= head) & (slot < full)
        idx = p.copy()
        if inside.any():
            idx[inside] = head + permute(slot[inside], full, key) * k + off[inside]
        shift = _key(self.fingerprint, self.cfg.seed, epoch, "blocks") % n
        return (idx + shift) % n

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, position within it) of a stream position."""
        ends = self._epoch_ends  # stream position where each epoch ends; one int per epoch seen
        while ends[-1] <= position:
            ends.append(ends[-1] + self.epoch_size(len(ends)))
        epoch = int(np.searchsorted(ends, position, side="right"))
        return epoch, position - (ends[epoch - 1] if epoch else 0)

    def windows(self, start: int, count: int) -> list[WindowRef]:
        """Stream positions [start, start + count) as windows (they may span epochs)."""
        return self.at(np.arange(start, start + count, dtype=np.int64))

    def at(self, positions: np.ndarray) -> list[WindowRef]:
        """The windows at ascending stream positions (any spacing; they may span epochs), in one
        vectorised pass per epoch touched."""
        positions = np.asarray(positions, dtype=np.int64)
        out: list[WindowRef] = []
        i = 0
        while i < len(positions):
            epoch, pos = self._locate(int(positions[i]))
            first = int(positions[i]) - pos  # the stream position of this epoch's first window
            cum, offset, base, key = self._epoch(epoch)
            n = int(cum[-1])
            j = int(np.searchsorted(positions, first + n, side="left"))
            idx = self._order(positions[i:j] - first, n, key, epoch, first)
            row = np.searchsorted(cum, idx, side="right") - 1
            k = idx - cum[row]
            drawn = cum[row + 1] - cum[row]
            k = np.where(drawn == base[row], k, (k * base[row]) // np.maximum(drawn, 1))  # weighted rows
            t0 = self.row_start[row] + offset[row] + k * self.cfg.window_s
            out += [WindowRef(q, epoch, self.session_ids[self.row_session[r]], float(t))
                    for q, r, t in zip(positions[i:j].tolist(), row.tolist(), t0.tolist())]
            i = j
        return out

    # ---- batches and workers ----------------------------------------------------------------------
    LOOKAHEAD = 64  # batches of one worker's windows worked out together (the permutation's numpy calls
    # cost the same for 32 positions as for 2048: ~30 us a window less at batch 32, bench/service.py)

    def worker_windows(self, batch: int, global_batch: int, rank: int, world: int) -> list[WindowRef]:
        """Worker `rank`'s share of global batch `batch`: windows [rank x B // world, (rank + 1) x B // world)
        of it, so every window of the batch is served once at any number of workers (an elastic run that
        goes on with fewer; shares differ by one window at most when `world` does not divide B). The next
        LOOKAHEAD batches' shares are computed with it and kept: a loader asks for consecutive batches."""
        if not 0 <= rank < world or world > global_batch:
            raise ValueError(f"rank {rank} of {world} workers cannot share a global batch of {global_batch}")
        lo, hi = worker_share(global_batch, rank, world)
        per = hi - lo
        ahead = self._ahead.get((global_batch, rank, world))
        if ahead is None or batch not in ahead:
            batches = np.arange(batch, batch + self.LOOKAHEAD, dtype=np.int64)
            starts = batches * global_batch + lo
            refs = self.at((starts[:, None] + np.arange(per, dtype=np.int64)[None, :]).reshape(-1))
            ahead = {int(b): refs[i * per:(i + 1) * per] for i, b in enumerate(batches)}
            self._ahead = {(global_batch, rank, world): ahead}  # one worker's look-ahead at a time
        return ahead[batch]
