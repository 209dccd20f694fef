"""Batches from long-lived Ray actors: one pool per training worker, alive as long as its stream.

Why: `RayBatches` runs one Ray dataset per 2,048 blocks (Ray Data 2.60 keeps a stats record per
block until its dataset ends), so a long run starts a new actor pool every few minutes. Each start
cost a dip in windows/s, or, started ahead, two pools competing for the cores; and each dataset
and each new actor left records behind in Ray's own processes and in the driver (the soak's creep:
bench/RESULTS.md, issue 28). Here the actors are started once: the consumer asks them in turn for
the next block of consecutive batches, keeps a bounded number of blocks in flight (backpressure:
about `prefetch` batches waiting, at most `buffer_mb` of object store), and yields in order.

A dead actor (its process or its whole node) is restarted by Ray, on another node when its own is
gone, and its calls are retried in order; a batch is a pure function of its number, so the stream
is unchanged. A located data error is raised at once, where its batch would have been.
"""

from __future__ import annotations

import math
import pickle
from collections import deque
from typing import Iterator

from .errors import CorpusError, located
from .service import ServedBatch, ServiceSpec, _Builder, actor_spec

MB = 2**20


class _BuilderActor:
    """service._Builder as a long-lived actor. The spec comes with every call as a reference the
    consumer holds for the life of the stream, read at the first: an actor Ray restarts (its
    process or node gone) reads it again from the retried call. Not a constructor argument: one too
    big to travel inline would live in the object store, where a restart may no longer find it
    (Ray warns of it, ray#53727)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.builder: _Builder | None = None

    def block(self, spec: list, batches: list[int]) -> list[bytes]:
        if self.builder is None:
            import ray  # deferred: this module is imported where Ray is not (LocalBatches runs, the CLI)

            self.builder = _Builder(ray.get(spec[0]), self.rank, self.world)
        return self.builder.block(batches)


class ActorBatches:
    """Batches [start, stop) for one worker, built by a pool of Ray actors and served in order."""

    def __init__(self, spec: ServiceSpec, rank: int = 0, world: int = 1, *, actors: int = 1,
                 cpus_per_actor: float = 0.0, prefetch: int = 4, block_batches: int = 8,
                 buffer_mb: float | None = 256, resources: dict[str, float] | None = None) -> None:
        """actors: processes building batches for this worker. block_batches: consecutive batches one
        call builds (Ray's cost a call - a task, its object - is paid once per block). prefetch:
        batches built ahead of the consumer, rounded up to whole blocks, on top of one call in
        progress per actor. buffer_mb: a cap on the object-store bytes of the blocks in flight
        (measured on the first block); None: no cap. resources: custom Ray resources each actor
        takes; None: the actors prefer this worker's node (soft affinity: elsewhere when it has no
        room or is gone). cpus_per_actor: logical CPUs each actor asks (0 by default: why in
        pretrain/run/config.py, data.actor_cpus)."""
        self.spec, self.rank, self.world = spec, rank, world
        self.actors, self.cpus, self.prefetch = max(1, actors), cpus_per_actor, max(1, prefetch)
        self.block_batches, self.buffer_mb, self.resources = max(1, block_batches), buffer_mb, resources

    def depth(self, block_bytes: int | None = None) -> int:
        """Blocks in flight: one per actor plus the prefetch's, at most buffer_mb's worth once a block's
        size is known (never under one)."""
        n = self.actors + math.ceil(self.prefetch / self.block_batches)
        if block_bytes and self.buffer_mb is not None:
            n = min(n, int(self.buffer_mb * MB // block_bytes))
        return max(1, n)

    def _pool(self) -> list:
        # deferred: importing ray only when used keeps start-up light
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options: dict = {"num_cpus": self.cpus, "max_restarts": -1, "max_task_retries": -1}
        if self.resources:
            options["resources"] = dict(self.resources)
        else:
            here = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=True)
        builder = ray.remote(_BuilderActor).options(**options)
        return [builder.remote(self.rank, self.world) for _ in range(self.actors)]

    def iterate(self, start: int, stop: int) -> Iterator[ServedBatch]:
        if start >= stop:
            return
        import ray  # deferred: importing ray only when used keeps start-up light

        spec = ray.put(actor_spec(self.spec))  # held until the stream ends: restarts rebuild from it
        pool = self._pool()
        k = self.block_batches
        spans = iter(range(start, stop, k))
        pending: deque = deque()
        calls = 0

        def submit(depth: int) -> None:
            nonlocal calls
            while len(pending) < depth and (lo := next(spans, None)) is not None:
                pending.append(pool[calls % len(pool)].block.remote([spec], list(range(lo, min(stop, lo + k)))))
                calls += 1

        depth = self.depth()
        try:
            with located():
                submit(depth)
                sized = False
                while pending:
                    payloads = ray.get(pending.popleft())
                    if not sized:  # the byte cap, from the first block
                        depth, sized = self.depth(sum(len(p) for p in payloads)), True
                    submit(depth)
                    for p in payloads:
                        x = pickle.loads(p)
                        if isinstance(x, CorpusError):
                            raise x
                        yield x
        finally:
            pending.clear()
            for a in pool:
                ray.kill(a, no_restart=True)
