"""The data service: window index -> read -> augment -> tokenize -> pack, for one training worker.

`build_batch` is the whole job for one worker's share of one global batch, a pure function of
(spec, batch number, rank, world): the window refs come from the index, and every random choice
(unit dropout, time scaling) is seeded by the window's stream position. Two ways to run it:

- `RayBatches`: Ray Data maps batch numbers to packed batches in a pool of actors (each opens
  the corpus and builds the index once), streams them in order with prefetching, and its
  streaming executor bounds what is in flight (backpressure: at most `prefetch` batches wait,
  and at most `buffer_mb` of object-store memory per worker).
- `LocalBatches`: the same function, in the calling process (one process, tests, debugging).

Both yield identical `ServedBatch`es. The loader's state is the number of global batches
consumed. The service knows nothing of the model: the tokenizer is anything with the two
methods of `BatchTokenizer` (pretrain.tokenizer.Tokenizer is the one popscale uses).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from .errors import CorpusError, find_corpus_error
from .reader import Corpus, SeriesWindow, SessionReader, Window, open_corpus
from .rng import uniform
from .window_index import IndexConfig, WindowIndex, WindowRef

_log = logging.getLogger("popscale.data")


@dataclass
class AugmentConfig:
    unit_dropout: bool = True
    # number of units kept ~ triangular(min, mode, max), capped at the session's units (reference values)
    min_units: int = 30
    mode_units: int = 100
    max_units: int = 300
    # e.g. (0.9, 1.1): a window holds window_s x factor seconds of data squeezed into window_s (spike
    # and behaviour times divided by the factor, per-second behaviours such as velocity multiplied)
    time_scaling: tuple[float, float] | None = None


Item = tuple[Window, SessionReader, "np.ndarray | None"]  # a window, its session, the units kept (None: all)


class BatchTokenizer(Protocol):
    """What the service asks of a tokenizer."""

    def needs(self, reader: SessionReader) -> tuple[list[str], list[str]]:
        """(behaviours, interval sets) a window of this session must carry to be tokenized."""
        ...

    def pack(self, items: Sequence[Item]) -> Any:
        """The windows tokenized and packed into one batch."""
        ...


@dataclass
class ServiceSpec:
    """Everything a batch builder needs; small and picklable (sent to every data actor)."""

    corpus: str
    index: IndexConfig
    tokenizer: BatchTokenizer  # picklable (its vocabularies are plain id -> index maps)
    global_batch: int = 32
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # the index fingerprint the consumer planned with: a corpus changed since is refused, not served
    index_fingerprint: str | None = None
    # a window that cannot be read (corrupt or truncated chunk, missing shard, deleted session) stops
    # the service with an error naming it; True drops it from its batch instead, and says so
    skip_bad_windows: bool = False


@dataclass
class ServedBatch:
    """One worker's share of one global batch."""

    number: int  # the global batch number
    positions: np.ndarray  # int64: stream positions of its windows
    data: Any  # what the tokenizer's `pack` made of them
    skipped: list[dict] = field(default_factory=list)  # windows dropped as unreadable (skip_bad_windows)


@lru_cache(maxsize=8)
def _index(corpus: str, index_json: str, expected: str | None) -> WindowIndex:
    index = WindowIndex(open_corpus(corpus), IndexConfig(**json.loads(index_json)))
    if expected is not None and index.fingerprint != expected:
        raise CorpusError(f"the corpus changed since the run was planned (window-index fingerprint {index.fingerprint}, "
                          f"planned {expected}): its window order would not be the planned one", file=corpus)
    return index


def window_index(spec: ServiceSpec) -> WindowIndex:
    """The spec's index, built once per process. Called once per batch: the cache key (the index
    config as JSON, which holds the session list) is built once per spec, not per batch."""
    key = spec.__dict__.get("_index_key")
    if key is None:
        key = spec.__dict__["_index_key"] = json.dumps(asdict(spec.index), sort_keys=True)
    return _index(spec.corpus, key, spec.index_fingerprint)


_STREAMS = {"units": 1, "time": 2}


def _stream_key(seed: int, position: int, what: str) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + _STREAMS[what] * 0x632BE59BD9B4E019) % (1 << 64)


def _uniforms(seed: int, position: int, what: str, n: int) -> np.ndarray:
    """n deterministic U[0, 1) draws for one window: counter-based (a hash of seed, position,
    stream and index), so any window's augmentation is computable on its own and costs no
    generator set-up (~10 us instead of ~45 us per window)."""
    return uniform(_stream_key(seed, position, what), np.arange(n, dtype=np.uint64))


def _uniforms_many(seed: int, positions: Sequence[int], what: str, counts: Sequence[int]) -> list[np.ndarray]:
    """`_uniforms` for many windows in one vectorised hash (the same numbers: each draw is
    mix(index + key), computed here for every window's indices at once); ~10 us a window less."""
    counts_a = np.asarray(counts, dtype=np.int64)
    keys = np.array([_stream_key(seed, int(p), what) for p in positions], dtype=np.uint64)
    starts = np.cumsum(counts_a) - counts_a
    local = (np.arange(int(counts_a.sum()), dtype=np.int64) - np.repeat(starts, counts_a)).astype(np.uint64)
    u = uniform(0, local + np.repeat(keys, counts_a))
    return np.split(u, np.cumsum(counts_a)[:-1])


def keep_units(n_units: int, cfg: AugmentConfig, u: np.ndarray) -> np.ndarray | None:
    """Unit dropout: how many units survive is triangular(min, mode, max), capped at n_units;
    which ones is a uniformly random subset (the k smallest of `u[1:]`). `u`: n_units + 1
    uniforms. Returns a boolean mask over the session's units, or None when all are kept."""
    if not cfg.unit_dropout or n_units <= cfg.min_units:
        return None
    a, b = float(cfg.min_units), float(min(cfg.max_units, n_units))
    c = min(max(float(cfg.mode_units), a), b)
    if b > a:  # inverse CDF of the triangular distribution
        f = (c - a) / (b - a)
        x = a + np.sqrt(u[0] * (b - a) * (c - a)) if u[0] < f else b - np.sqrt((1 - u[0]) * (b - a) * (b - c))
        k = int(round(x))
    else:
        k = int(b)
    k = min(max(k, cfg.min_units), n_units)
    if k >= n_units:
        return None
    mask = np.zeros(n_units, dtype=bool)
    mask[np.argpartition(u[1:n_units + 1], k - 1)[:k]] = True
    return mask


def read_window(spec: ServiceSpec, r: SessionReader, ref: WindowRef, window_s: float) -> Window:
    """The window of a ref, stretched in time if time scaling is on (times then fit `window_s`)."""
    ts = spec.augment.time_scaling
    need = spec.tokenizer.needs(r)  # only the behaviours and interval sets the tokenizer uses
    if not ts:
        return r.read_window(ref.t_start, ref.t_start + window_s, behaviours=need[0], intervals=need[1])
    lo, hi = ts
    s = float(lo + (hi - lo) * _uniforms(spec.seed, ref.position, "time", 1)[0])
    w = r.read_window(ref.t_start, ref.t_start + window_s * s, behaviours=need[0], intervals=need[1])
    return Window(w.session_id, w.t_start, w.t_start + window_s, w.spike_times / s, w.spike_units,
                  {k: SeriesWindow(v.timestamps / s, v.values * rate_factor(r.attrs["behaviour"][k].get("unit", ""), s))
                   for k, v in w.behaviour.items()},
                  {k: v / s for k, v in w.intervals.items()})


def rate_factor(unit: str, s: float) -> float:
    """How a behaviour's values change when s seconds of it are squeezed into one: a rate per
    second (cm/s, deg/s) is s times larger, per second squared s^2 times, anything else unchanged."""
    u = unit.replace(" ", "").lower()
    if u.endswith(("/s^2", "/s2", "/s**2")):
        return s * s
    return s if u.endswith("/s") else 1.0


def augmented_window(spec: ServiceSpec, ref: WindowRef, corpus: Corpus) -> tuple[Window, SessionReader, np.ndarray | None]:
    """A ref's window (time-scaled if on), its reader and the units kept by unit dropout."""
    reader = corpus.session(ref.session)
    w = read_window(spec, reader, ref, spec.index.window_s)
    n = len(reader.unit_ids)
    return w, reader, keep_units(n, spec.augment, _uniforms(spec.seed, ref.position, "units", n + 1))


class UnreadableWindow(CorpusError):
    """A window the corpus cannot serve: its session's data is corrupt, truncated or gone."""


_IN_SESSION = re.compile(r"sessions/[^/\s]+/([^\s:;,)'\"]+)")


def array_of(text: str) -> str | None:
    """The array a failing file belongs to, from its path: sessions/<id>/spikes/timestamps/0 ->
    spikes/timestamps (a shard key, c/..., or zarr.json is dropped)."""
    m = _IN_SESSION.search(text.replace("\\", "/"))
    if not m:
        return None
    parts = m.group(1).rstrip("/.").split("/")
    if "c" in parts:
        parts = parts[:parts.index("c")]
    while parts and (parts[-1] == "zarr.json" or re.fullmatch(r"[\d.]+", parts[-1])):
        parts.pop()
    return "/".join(parts) or None


def unreadable(spec: ServiceSpec, ref: WindowRef, e: BaseException) -> UnreadableWindow:
    """The error for a window that failed to read, naming corpus, session and array (from the
    failing file's path when the reader's error carries one)."""
    field_ = getattr(e, "field", None) or array_of(f"{getattr(e, 'filename', '') or ''} {e}")
    return UnreadableWindow(
        f"window at stream position {ref.position} ({ref.t_start:.3f} s + {spec.index.window_s:g} s) cannot be "
        f"read: {type(e).__name__}: {e}. `popscale verify {spec.corpus}` checks every session; "
        "data.skip_bad_windows=true drops such windows (each one logged) instead of stopping",
        file=spec.corpus, session=ref.session, field=field_)


def build_batch(spec: ServiceSpec, batch: int, rank: int, world: int) -> ServedBatch:
    """Worker `rank`'s share of global batch `batch`, tokenized and packed. A window that cannot
    be read stops it with an `UnreadableWindow` (never garbage: chunks are crc-checked), unless
    the spec skips such windows, which changes the sequence and so is logged window by window."""
    refs = window_index(spec).worker_windows(batch, spec.global_batch, rank, world)
    corpus = open_corpus(spec.corpus)  # once per batch: it stats the manifest
    read, kept, skipped = [], [], []
    for ref in refs:
        try:
            reader = corpus.session(ref.session)
            read.append((read_window(spec, reader, ref, spec.index.window_s), reader, len(reader.unit_ids)))
        except Exception as e:  # noqa: BLE001 - every read failure is located, then raised or skipped
            err = unreadable(spec, ref, e)
            if not spec.skip_bad_windows:
                raise err from e
            _log.warning("skipped %s", err)
            skipped.append({"batch": batch, "position": int(ref.position), "session": ref.session,
                            "t_start": float(ref.t_start), "field": err.field, "error": f"{type(e).__name__}: {e}"})
            continue
        kept.append(ref.position)
    # unit dropout for the whole batch: the draws `augmented_window` makes window by window
    draws = _uniforms_many(spec.seed, kept, "units", [n + 1 for _, _, n in read]) if read else []
    items = [(w, r, keep_units(n, spec.augment, u)) for (w, r, n), u in zip(read, draws)]
    if not items:
        raise UnreadableWindow(f"every window of batch {batch} (rank {rank}) was unreadable and skipped",
                               file=spec.corpus, session=refs[0].session if refs else None)
    data = spec.tokenizer.pack(items)
    return ServedBatch(batch, np.array(kept, dtype=np.int64), data, skipped)


class LocalBatches:
    """Batches [start, stop) for one worker, built in this process."""

    def __init__(self, spec: ServiceSpec, rank: int = 0, world: int = 1) -> None:
        self.spec, self.rank, self.world = spec, rank, world

    def iterate(self, start: int, stop: int) -> Iterator[ServedBatch]:
        for b in range(start, stop):
            yield build_batch(self.spec, b, self.rank, self.world)


class _Builder:
    """A Ray Data actor: opens the corpus and the index once, then builds batches."""

    def __init__(self, spec_bytes: bytes, rank: int, world: int) -> None:
        self.spec = pickle.loads(spec_bytes)
        self.rank, self.world = rank, world
        window_index(self.spec)  # build the index once per actor

    def __call__(self, rows: dict) -> dict:
        out = []
        for b in rows["id"]:
            try:
                out.append(pickle.dumps(build_batch(self.spec, int(b), self.rank, self.world), protocol=5))
            except CorpusError as e:  # sent in the batch's place, raised by the consumer: Ray Data
                out.append(pickle.dumps(e))  # would keep only its traceback text, not where it was
        return {"id": rows["id"], "payload": np.array(out, dtype=object)}


class RayBatches:
    """Batches [start, stop) for one worker, built by Ray Data actors and streamed in order."""

    def __init__(self, spec: ServiceSpec, rank: int = 0, world: int = 1, *, actors: int = 1, cpus_per_actor: float = 0.5,
                 prefetch: int = 4, chunk: int = 2048, buffer_mb: float | None = 256) -> None:
        """buffer_mb: a cap on the object-store memory this worker's pipeline may hold (Ray Data's
        streaming executor stops launching builders at the cap); None = Ray Data's default share.
        chunk: batches per Ray dataset. Each new dataset starts its actor pool again (~10 s on 2
        cores, a visible dip in samples/s), so datasets are long: 2048 batches (was 256)."""
        self.spec, self.rank, self.world = spec, rank, world
        self.actors, self.cpus, self.prefetch, self.chunk = actors, cpus_per_actor, prefetch, chunk
        self.buffer_mb = buffer_mb
        self._spec_bytes = pickle.dumps(spec)

    def iterate(self, start: int, stop: int) -> Iterator[ServedBatch]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # batch b before b + 1, whatever finishes first
        ctx.enable_progress_bars = False
        if self.buffer_mb is not None:
            limits = ctx.execution_options.resource_limits
            ctx.execution_options.resource_limits = limits.copy(object_store_memory=self.buffer_mb * 2**20)
        for lo in range(start, stop, self.chunk):  # one dataset per chunk keeps per-dataset metadata small
            hi = min(stop, lo + self.chunk)
            ds = ray.data.range(hi - lo, override_num_blocks=hi - lo).map(lambda r, lo=lo: {"id": r["id"] + lo})
            ds = ds.map_batches(_Builder, fn_constructor_args=(self._spec_bytes, self.rank, self.world),
                                batch_size=1, compute=ray.data.ActorPoolStrategy(size=self.actors), num_cpus=self.cpus,
                                batch_format="numpy")
            try:
                for row in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=self.prefetch):
                    served = pickle.loads(row["payload"][0])
                    if isinstance(served, CorpusError):
                        raise served
                    yield served
            except CorpusError:
                raise
            except Exception as e:  # a located error that reached Ray some other way comes wrapped
                located = find_corpus_error(e)
                if located is None:
                    raise
                raise located from e
