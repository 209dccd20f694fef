"""The global order of training windows: a function of (corpus fingerprint, seed, epoch) alone.

Each epoch, every train interval of every session is cut into consecutive windows after a
random start offset (the per-epoch jitter), optionally up- or down-sampled by a per-session
weight, and the epoch's windows are visited in a keyed pseudo-random permutation. Nothing of
size "windows per epoch" is ever built: the index keeps one row per train interval (a 10,000-
session corpus with 100 intervals each is 10^6 rows, ~20 MB), computes each epoch's window
counts from them in one vectorised pass, and maps a position in the epoch to its window with a
Feistel permutation plus a binary search over the cumulative counts (as levanter does).

The stream is the concatenation of epochs; global batch b is stream positions [b B, (b+1) B);
worker r of W takes positions [b B + r B/W, b B + (r+1) B/W). The order therefore does not
depend on W, and a loader's whole state is the number of samples consumed (plus the index
fingerprint, checked on resume).
"""

from __future__ import annotations

import functools
import hashlib
import json
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


class WindowIndex:
    """Random-access view of the training-window stream of a corpus."""

    def __init__(self, corpus: Corpus, cfg: IndexConfig) -> None:
        self.cfg = cfg
        ids = cfg.sessions if cfg.sessions is not None else corpus.session_ids
        unknown = [s for s in ids if s not in corpus.rows]
        if unknown:
            raise CorpusError(f"sessions not in the corpus: {unknown[:5]}", file=str(corpus.root))
        rows_s, rows_a, rows_b = [], [], []
        for k, sid in enumerate(ids):
            iv = corpus.session(sid).intervals.get(cfg.split)
            if cfg.intervals is not None and sid in cfg.intervals:
                iv = np.asarray(cfg.intervals[sid], dtype=np.float64).reshape(-1, 2)
            if iv is None:
                raise CorpusError(f"session has no {cfg.split!r} split", file=str(corpus.root), session=sid,
                                  field=f"intervals/{cfg.split}")
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
        self.fingerprint = index_fingerprint(corpus.fingerprint, cfg)
        self._epochs: dict[int, tuple] = {}
        self._epoch_ends: list[int] = [self.epoch_size(0)]
        if self._epoch_ends[0] == 0:
            raise CorpusError(f"no {cfg.window_s} s window fits in any {cfg.split!r} interval", file=str(corpus.root))

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

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, position within it) of a stream position."""
        ends = self._epoch_ends  # stream position where each epoch ends; one int per epoch seen
        while ends[-1] <= position:
            ends.append(ends[-1] + self.epoch_size(len(ends)))
        epoch = int(np.searchsorted(ends, position, side="right"))
        return epoch, position - (ends[epoch - 1] if epoch else 0)

    def windows(self, start: int, count: int) -> list[WindowRef]:
        """Stream positions [start, start + count) as windows (they may span epochs)."""
        out: list[WindowRef] = []
        epoch, pos = self._locate(start)
        while len(out) < count:
            cum, offset, base, key = self._epoch(epoch)
            n = int(cum[-1])
            take = min(count - len(out), n - pos)
            idx = permute(np.arange(pos, pos + take, dtype=np.int64), n, key)
            row = np.searchsorted(cum, idx, side="right") - 1
            k = idx - cum[row]
            drawn = cum[row + 1] - cum[row]
            k = np.where(drawn == base[row], k, (k * base[row]) // np.maximum(drawn, 1))  # weighted rows
            t0 = self.row_start[row] + offset[row] + k * self.cfg.window_s
            first = start + len(out)
            out += [WindowRef(first + j, epoch, self.session_ids[self.row_session[r]], float(t))
                    for j, (r, t) in enumerate(zip(row.tolist(), t0.tolist()))]
            epoch, pos = epoch + 1, 0
        return out

    # ---- batches and workers ----------------------------------------------------------------------
    def worker_windows(self, batch: int, global_batch: int, rank: int, world: int) -> list[WindowRef]:
        """Worker `rank`'s share of global batch `batch`."""
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} must be divisible by the number of workers {world}")
        per = global_batch // world
        return self.windows(batch * global_batch + rank * per, per)
