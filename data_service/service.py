"""The data service: window index -> read -> augment (augment.py) -> tokenize -> pack, for one
training worker.

`build_batch` is the whole job for one worker's share of one global batch, a pure function of
(spec, batch number, rank, world): the window refs come from the index, and every random choice
(unit dropout, time scaling) is seeded by the window's stream position. The batch is read and
packed as a whole (batch.py, `pack_batch`); window by window where time scaling or a causal
readout is on, or to name (or skip) a window that cannot be read. Three ways to run it: the
default, a pool of long-lived Ray actors (`actors.ActorBatches`, data.loader=ray), and here:

- `RayBatches` (data.loader=ray-data): Ray Data maps batch numbers to packed batches in a pool of actors (each opens
  the corpus and builds the index once), streams them in order with prefetching, and its
  streaming executor bounds what is in flight (backpressure: at most `prefetch` batches wait,
  and at most `buffer_mb` of object-store memory per worker).
- `LocalBatches`: the same function, in the calling process (one process, tests, debugging).

All three yield identical `ServedBatch`es. The loader's state is the number of global batches
consumed. The service knows nothing of the model: the tokenizer is anything with the two
methods of `BatchTokenizer` (pretrain.tokens.tokenizer.Tokenizer is the one popscale uses).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from .ahead import Ahead
from .errors import CorpusError, located
from .augment import AugmentConfig, read_scaled, unit_masks
from .batch import WindowBatch, read_batch
from .reader import SessionReader, Window, open_corpus
from .window_index import IndexConfig, WindowIndex, WindowRef

_log = logging.getLogger("popscale.data")


Item = tuple[Window, SessionReader, "np.ndarray | None"]  # a window, its session, the units kept (None: all)


class BatchTokenizer(Protocol):
    """What the service asks of a tokenizer."""

    def needs(self, reader: SessionReader) -> tuple[list[str], list[str]]:
        """(behaviours, interval sets) a window of this session must carry to be tokenized."""
        ...

    def pack(self, items: Sequence[Item]) -> Any:
        """The windows tokenized and packed into one batch."""
        ...

    def pack_batch(self, windows: WindowBatch, readers: Sequence[SessionReader],
                   keep: Sequence["np.ndarray | None"]) -> Any:
        """`pack` for windows read as a batch (batch.read_batch); optional: without it a batch is
        read and packed window by window."""
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
    # the index's intervals (WindowIndex.split_intervals), read once by the consumer: a data actor then
    # makes the index from them instead of opening every session of the corpus (None: it opens them)
    split_intervals: dict[str, Any] | None = None


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
    _check(index, expected, corpus)
    return index


def _check(index: WindowIndex, expected: str | None, corpus: str) -> None:
    if expected is not None and index.fingerprint != expected:
        raise CorpusError(f"the corpus changed since the run was planned (window-index fingerprint {index.fingerprint}, "
                          f"planned {expected}): its window order would not be the planned one", file=corpus)


_from_intervals: dict[int, tuple[dict, WindowIndex]] = {}  # id(spec.split_intervals) -> (them, their index)


def window_index(spec: ServiceSpec) -> WindowIndex:
    """The spec's index, built once per process. Called once per batch: the cache key (the index
    config as JSON, which holds the session list) is built once per spec, not per batch. With
    `split_intervals` it is made from them (the same index, bit for bit) and no session is opened."""
    rows = spec.split_intervals
    if rows is not None:
        hit = _from_intervals.get(id(rows))
        if hit is None or hit[0] is not rows:
            corpus = open_corpus(spec.corpus)
            index = WindowIndex.from_intervals(rows, corpus.fingerprint, spec.index, spec.corpus)
            _check(index, spec.index_fingerprint, spec.corpus)
            if len(_from_intervals) >= 8:
                _from_intervals.clear()
            hit = _from_intervals[id(rows)] = (rows, index)
        return hit[1]
    key = spec.__dict__.get("_index_key")
    if key is None:
        key = spec.__dict__["_index_key"] = json.dumps(asdict(spec.index), sort_keys=True)
    return _index(spec.corpus, key, spec.index_fingerprint)


def read_window(spec: ServiceSpec, r: SessionReader, ref: WindowRef, window_s: float) -> Window:
    """The window of a ref with only what the tokenizer uses, time-scaled if the spec says so."""
    behaviours, intervals = spec.tokenizer.needs(r)
    return read_scaled(r, ref.t_start, window_s, spec.augment, spec.seed, ref.position, behaviours, intervals)


class UnreadableWindow(CorpusError):
    """A window the corpus cannot serve: its session's data is corrupt, truncated or gone."""


_IN_SESSION = re.compile(r"sessions/[^/\s]+/([^\s:;,)'\"]+)")
NODE_LABEL = "ray.io/node-id"  # a default label of every Ray node: its id (actors placed by label)


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
    served = _as_batch(spec, batch, refs, corpus)
    if served is not None:
        return served
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
    masks = unit_masks(spec.augment, spec.seed, kept, [n for _, _, n in read])
    items = [(w, r, keep) for (w, r, _), keep in zip(read, masks)]
    if not items:
        raise UnreadableWindow(f"every window of batch {batch} (rank {rank}) was unreadable and skipped",
                               file=spec.corpus, session=refs[0].session if refs else None)
    data = spec.tokenizer.pack(items)
    return ServedBatch(batch, np.array(kept, dtype=np.int64), data, skipped)


def _as_batch(spec: ServiceSpec, batch: int, refs: Sequence[WindowRef], corpus) -> ServedBatch | None:
    """The batch read and packed as a whole (batch.py), or None where it cannot be: time scaling or
    causal queries (windows are read one by one), a tokenizer without `pack_batch`, or any error,
    which the window-by-window path then meets again and names (or skips) window by window."""
    pack_batch = getattr(spec.tokenizer, "pack_batch", None)
    if pack_batch is None or not refs or spec.augment.time_scaling or spec.augment.query_tail_s is not None:
        return None
    try:
        readers = [corpus.session(ref.session) for ref in refs]
        windows = read_batch(readers, [ref.t_start for ref in refs], spec.index.window_s,
                             [spec.tokenizer.needs(r) for r in readers])
    except Exception:  # noqa: BLE001 - located (or skipped) by the window-by-window path
        return None
    positions = [ref.position for ref in refs]
    masks = unit_masks(spec.augment, spec.seed, positions, [len(r.unit_ids) for r in readers])
    return ServedBatch(batch, np.array(positions, dtype=np.int64), pack_batch(windows, readers, masks))


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

    def block(self, batches: Sequence[int]) -> list[bytes]:
        """The batches pickled, in order; a located data error is sent in its batch's place and raised
        by the consumer (Ray would keep only its traceback text, not where it was)."""
        out = []
        for b in batches:
            try:
                out.append(pickle.dumps(build_batch(self.spec, int(b), self.rank, self.world), protocol=5))
            except CorpusError as e:
                out.append(pickle.dumps(e))
        return out

    def __call__(self, rows: dict, offset: int = 0) -> dict:
        ids = rows["id"] + offset
        return {"id": ids, "payload": np.array(self.block(ids), dtype=object)}


def actor_spec(spec: ServiceSpec) -> bytes:
    """The spec data actors get, with the index's intervals read here once (each actor is a new
    process: without them every one would open every session to make its index). Called at the
    first batch, so an unreadable session is a data error of the stream."""
    if spec.split_intervals is None:
        spec = replace(spec, split_intervals=WindowIndex.split_intervals(open_corpus(spec.corpus), spec.index))
    return pickle.dumps(spec)


RATE_FLOOR_S = 30.0  # the serving rate is never taken over less than this: a burst at the start is not a rate


class RayBatches:
    """Batches [start, stop) for one worker, built by Ray Data actors and streamed in order."""

    def __init__(self, spec: ServiceSpec, rank: int = 0, world: int = 1, *, actors: int = 1, cpus_per_actor: float = 0.0,
                 prefetch: int = 4, chunk: int | None = None, buffer_mb: float | None = 256,
                 resources: dict[str, float] | None = None, block_batches: int = 8, lead_s: float = 45.0) -> None:
        """buffer_mb: a cap on the object-store memory this worker's pipeline may hold (Ray Data's
        streaming executor stops launching builders at the cap); None = Ray Data's default share.
        chunk: batches per Ray dataset; None: 2,048 blocks' worth. Each new dataset starts its actor pool
        again (10-40 s on 2 cores, a dip in samples/s), and Ray Data keeps a stats record per block
        until its dataset ends (ray-project/ray#66016), so a dataset is as long as that allows.
        block_batches: consecutive batches one actor call builds into one Ray Data block. Ray's cost
        a block (a task, its object, its stats) was paid once a batch at 1: 21 batches/s against 44
        at 8 on this 2-core machine (bench/blocks.py), and most of the soak's memory growth
        (bench/RESULTS.md). The sequence served does not depend on it.
        resources: custom Ray resources each actor takes; None: the actors prefer this worker's
        node (soft affinity: elsewhere when it has no room, or is gone). cpus_per_actor: logical
        CPUs each actor asks; 0 by default (why: pretrain/run/config.py, data.actor_cpus).
        lead_s: the next dataset starts this long (at the current serving rate) before this one ends
        (ahead.py: its actors' start-up then overlaps the serving, not a stall at the boundary). 45 s
        covers an actor's start-up here (10-14 s in bench/blocks.py; the soak's stalls lasted 5-10 s)
        with room; no longer, because while both run the second competes for the cores and builds
        up to its buffer (a 20-minute soak at 120 s: ~25 % fewer windows/s during the overlap)."""
        self.spec, self.rank, self.world = spec, rank, world
        self.actors, self.cpus, self.prefetch = actors, cpus_per_actor, prefetch
        self.buffer_mb, self.resources = buffer_mb, resources
        self.block_batches = max(1, block_batches)
        self.chunk = chunk or 2048 * self.block_batches
        self.lead_s = lead_s
        self._spec_bytes: bytes | None = None

    def _actor_spec(self) -> bytes:
        if self._spec_bytes is None:
            self._spec_bytes = actor_spec(self.spec)
        return self._spec_bytes

    def iterate(self, start: int, stop: int) -> Iterator[ServedBatch]:
        # deferred: importing ray only when used keeps start-up light
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # batch b before b + 1, whatever finishes first
        ctx.enable_progress_bars = False
        if self.buffer_mb is not None:
            limits = ctx.execution_options.resource_limits
            ctx.execution_options.resource_limits = limits.copy(object_store_memory=self.buffer_mb * 2**20)
        if self.resources:
            placed = {"resources": dict(self.resources)}
        else:
            # this node first, any other when it cannot take the actor (soft affinity); node labels, as Ray Data
            # 2.60 asks: `scheduling_strategy` goes through ray_remote_args, which Ray 2.64 removes
            here = ray.get_runtime_context().get_node_id()
            placed = {"label_selector": {NODE_LABEL: here},
                      "fallback_strategy": [{"label_selector": {NODE_LABEL: f"!{here}"}}]}
        spec_bytes = self._actor_spec()

        def dataset(lo: int, hi: int) -> Iterator:
            # batch numbers 0..n-1 of this dataset, block_batches a block; the builder adds `lo` (a stage of its own
            # for the offset ran as zero-CPU tasks, for which Ray started a new worker process every few seconds)
            k = self.block_batches
            ds = ray.data.range(hi - lo, override_num_blocks=-(-(hi - lo) // k))
            ds = ds.map_batches(_Builder, fn_constructor_args=(spec_bytes, self.rank, self.world), fn_kwargs={"offset": lo},
                                batch_size=k, compute=ray.data.ActorPoolStrategy(size=self.actors), num_cpus=self.cpus,
                                batch_format="numpy", **placed)
            for row in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=self.prefetch):
                yield pickle.loads(row["payload"][0])

        # one dataset per chunk keeps per-dataset metadata small; each next one is started `lead_s` before the
        # current one runs out (at the rate it is being served), so its actors are up when its turn comes
        chunks = ((lo, min(stop, lo + self.chunk)) for lo in range(start, stop, self.chunk))

        def ahead(span: tuple[int, int] | None):  # (its stream, started, and its span), or False after the last
            return (Ahead(dataset(*span), self.prefetch), span) if span else False

        if not (cur := ahead(next(chunks, None))):
            return
        (now, span), nxt = cur, None
        t0, total = None, 0  # the serving rate: batches since the first one, over at least RATE_FLOOR_S
        try:
            with located():
                while now is not None:
                    served = 0
                    for x in now:
                        if isinstance(x, CorpusError):
                            raise x
                        yield x
                        served, total = served + 1, total + 1
                        t0 = t0 or time.monotonic()
                        if nxt is None:
                            # over the whole stream, not this dataset: one started ahead begins with batches already
                            # waiting, and their rate would start the next one at once (two actors all the time)
                            left, rate = span[1] - span[0] - served, total / max(time.monotonic() - t0, RATE_FLOOR_S)
                            if left <= rate * self.lead_s:
                                nxt = ahead(next(chunks, None))
                    now.close()
                    if nxt is None:
                        nxt = ahead(next(chunks, None))
                    (now, span), nxt = (nxt or (None, None)), None
        finally:
            for a in (now, nxt[0] if nxt else None):
                if a is not None:
                    a.close()
