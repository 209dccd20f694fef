"""An iterator driven in a thread of its own, at most `depth` items ahead of its consumer.

Why: each Ray dataset of `RayBatches` starts its actor pool when its iteration begins (10-40 s on
2 cores), so a stream of datasets stalled at every boundary (the soak's 5th-percentile dips). Started
ahead, the next dataset's actors come up while the current one is still being served; the
bounded queue keeps it from building more than a few batches before its turn. Items, the end and
an error all reach the consumer in order; closing stops the thread and closes the iterator there.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class Ahead(Generic[T]):
    """`iter(source)` run in a daemon thread; iterate this object to receive its items."""

    def __init__(self, source: Iterator[T], depth: int = 2, name: str = "popscale-ahead") -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._source = source
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for x in self._source:
                if not self._put((x, None)):
                    break
            else:
                self._put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((_END, e))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        while True:
            x, err = self._q.get()
            if err is not None:
                raise err
            if x is _END:
                return
            yield x

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread (it closes the source) and wait for it."""
        self._stop.set()
        self._thread.join(timeout)
