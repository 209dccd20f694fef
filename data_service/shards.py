"""Low-overhead reads of the sharded arrays popscale writes.

zarr-python spends ~1.5 ms per read call on this machine whatever the size (bench/compression.py);
a window needs several reads, so hot arrays are read here instead: a shard's index is read once
(crc32c-checked), then each inner chunk is one positioned read, a crc32c check and a Blosc
decode (~25 us for 4096 float64). Only the read side of zarr v3's `sharding_indexed` codec, and
only for the codec chain that `format.sharded_codec` writes, is implemented; `open_sharded`
returns None for anything else and the caller falls back to zarr-python. tests/test_reader.py
checks this reader against zarr-python on every array the writer produces.
"""

from __future__ import annotations

import json
import os
import resource
import threading
from collections import OrderedDict
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numpy as np
from numcodecs.blosc import decompress as blosc_decompress

from .remote import as_path, filesystem

_MISSING = np.iinfo(np.uint64).max
# numcodecs' adaptive default (None) decodes through blosc's global context under a mutex when
# called from the main thread, after looking up the current process: for the ~25 KB chunks here
# blosc's threads never start, and the context-per-call path is ~1 us a chunk cheaper (4.3 vs
# 4.9-5.6 us) and releases the GIL. An explicit True or False set by the user is left alone.
if numcodecs.blosc.use_threads is None:
    numcodecs.blosc.use_threads = False
_crc = google_crc32c.value
# crc32c of a buffer followed by its own little-endian crc32c is this constant (CRC residue), so a
# chunk is checked in one pass over it, without slicing the payload out first
_CRC_RESIDUE = 0x48674BC7


# an array attribute: every chunk of this array was written (zarr skips all-fill chunks by default),
# so a missing shard or chunk is damage, not zeros. Arrays written before it read missing as zeros.
DENSE_ATTR = "popscale_dense"


class ChecksumError(IOError):
    pass


class ChunkCache:
    """Decoded chunks shared by every array of the process, bounded in bytes (LRU)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        # no lock: OrderedDict's get and move_to_end are single C calls under the GIL, and a key
        # evicted between the two is just a miss next time (the lock guards put's eviction loop)
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        try:
            self._d.move_to_end(key)
        except KeyError:
            pass
        self.hits += 1
        return v

    def put(self, key, value: np.ndarray) -> None:
        with self._lock:
            if key in self._d:
                return
            self._d[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes and self._d:
                _, old = self._d.popitem(last=False)
                self.nbytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.nbytes = 0


def _open_files_budget() -> int:
    """How many descriptors the pool may keep: half the process's open-files limit (raised to the
    hard limit first, as Ray does), between 128 and 8192. A pool smaller than the files a random
    window stream touches (a few per session) re-opens a file for most reads (measured: 2,757
    opens for 4,373 reads over 200 sessions with 128)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft == resource.RLIM_INFINITY:
            soft = cap
        elif soft < cap:
            resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
            soft = cap
    except (ImportError, ValueError, OSError):
        soft = 1024
    return int(min(max(128, soft // 2), 8192))


class _FileHandles:
    """A bounded pool of open descriptors, so 10,000 sessions never hit the open-files limit."""

    def __init__(self, max_open: int | None = None) -> None:
        self.max_open = max_open or _open_files_budget()
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        # forked: descriptors are shared with the parent; the child starts afresh (a hook, not a
        # getpid() per read)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._fds.clear)

    def pread(self, path: str, n: int, offset: int) -> bytes:
        if "://" in path:  # shared object storage: one ranged GET (remote.py)
            data = filesystem(path).cat_file(path, start=offset, end=offset + n)
            if len(data) != n:
                raise ChecksumError(f"{path}: short read ({len(data)} of {n} bytes at {offset}); object truncated?")
            return data
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
                while len(self._fds) > self.max_open:
                    _, old = self._fds.popitem(last=False)
                    os.close(old)
            else:
                self._fds.move_to_end(path)
        data = os.pread(fd, n, offset)
        if len(data) != n:
            raise ChecksumError(f"{path}: short read ({len(data)} of {n} bytes at {offset}); file truncated?")
        return data

    def close_all(self) -> None:
        """Forget every open descriptor (what a restarted reader process starts with)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def size(self, path: str) -> int:
        return filesystem(path).size(path) if "://" in path else os.path.getsize(path)

    def exists(self, path: str) -> bool:
        return filesystem(path).exists(path) if "://" in path else os.path.exists(path)


_handles = _FileHandles()
CACHE = ChunkCache(int(os.environ.get("POPSCALE_CHUNK_CACHE_MB", "512")) << 20)


def _check_crc(buf: bytes, where) -> bytes:
    """The payload of a crc32c-suffixed buffer; raises if the checksum does not match.
    (`where` is a callable so the message is only built on failure.)"""
    body = buf[:-4]
    if google_crc32c.value(body) != int.from_bytes(buf[-4:], "little"):
        raise ChecksumError(f"crc32c mismatch in {where() if callable(where) else where}: "
                            "the corpus is corrupt (run `popscale verify`)")
    return body


class ShardedArray:
    """Read-only view of one sharded array, chunked along axis 0 only."""

    def __init__(self, path: Path, meta: dict, inner: dict) -> None:
        self.path = path
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.shard_len = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.chunk_len = int(inner["chunk_shape"][0])
        self.row_shape = tuple(self.shape[1:])
        self.per_shard = self.shard_len // self.chunk_len
        self.fill = np.array(meta.get("fill_value", 0) or 0, dtype=self.dtype)
        enc = meta["chunk_key_encoding"]
        sep = enc.get("configuration", {}).get("separator", "/" if enc["name"] == "default" else ".")
        self._prefix = "c" + sep if enc["name"] == "default" else ""
        self._sep = sep
        self._index: dict[int, tuple[str, list[tuple[int, int]]]] = {}
        self._key = str(path)
        self.dense = bool(meta.get("attributes", {}).get(DENSE_ATTR))

    def __len__(self) -> int:
        return self.shape[0]

    def _shard_file(self, s: int) -> str:
        key = self._prefix + self._sep.join([str(s)] + ["0"] * len(self.row_shape))
        return str(self.path / key)

    def _shard_index(self, s: int) -> tuple[str, list[tuple[int, int]]] | None:
        """(file, [(offset, nbytes) per inner chunk]) of shard s, read once; None if absent."""
        entry = self._index.get(s)
        if entry is None:
            f = self._shard_file(s)
            if not _handles.exists(f):
                return None
            n = self.per_shard * 16 + 4
            size = _handles.size(f)
            if size < n:
                raise ChecksumError(f"{f}: {size} bytes is shorter than its shard index; file truncated")
            raw = _check_crc(_handles.pread(f, n, size - n), lambda: f"shard index of {f}")
            pairs = np.frombuffer(raw, dtype="<u8").reshape(-1, 2).tolist()
            entry = self._index[s] = (f, [tuple(p) for p in pairs])
        return entry

    def chunk(self, c: int) -> np.ndarray:
        """Inner chunk c, decoded (full chunk length, padded past the array's end); read-only."""
        key = (self._key, c)
        arr = CACHE.get(key)
        if arr is not None:
            return arr
        s, j = divmod(c, self.per_shard)
        entry = self._shard_index(s)
        offset, nbytes = entry[1][j] if entry is not None else (_MISSING, 0)
        if offset == _MISSING and self.dense and c * self.chunk_len < self.shape[0]:
            what = f"chunk {j} of shard {self._shard_file(s)}" if entry is not None else f"shard {self._shard_file(s)}"
            raise ChecksumError(f"{what} is missing (this array has every chunk written); file deleted or lost?")
        if offset == _MISSING:
            arr = np.full((self.chunk_len, *self.row_shape), self.fill, dtype=self.dtype)
        else:
            f = entry[0]
            buf = _handles.pread(f, nbytes, offset)
            if _crc(buf) != _CRC_RESIDUE:  # _check_crc without copying the body: the cold path's hottest line
                _check_crc(buf, f"chunk {c} of {f}")
            arr = np.frombuffer(blosc_decompress(memoryview(buf)[:-4]), dtype=self.dtype)  # ~10 us less than Blosc().decode
            if self.row_shape:
                arr = arr.reshape(self.chunk_len, *self.row_shape)
        arr.flags.writeable = False
        CACHE.put(key, arr)
        return arr

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as an array (a read-only view when they sit in one chunk)."""
        start, stop = max(0, start), min(stop, self.shape[0])
        if stop <= start:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        c0, c1 = start // self.chunk_len, (stop - 1) // self.chunk_len
        if c0 == c1:
            base = c0 * self.chunk_len
            return self.chunk(c0)[start - base:stop - base]
        parts = []
        for c in range(c0, c1 + 1):
            base = c * self.chunk_len
            parts.append(self.chunk(c)[max(start, base) - base:min(stop, base + self.chunk_len) - base])
        return np.concatenate(parts)

    def read_all(self) -> np.ndarray:
        return self.read(0, self.shape[0])

    def search(self, t: float, a: int, b: int, guess: int) -> int:
        """The first row in [a, b) whose value is >= t (b if none) of this sorted 1-d array, as
        np.searchsorted(side="left") over those rows gives, reading chunks from the one holding
        row `guess` toward the answer only: with a good guess, just the answer's chunk (a search
        over all of [a, b) reads every chunk its probes land in, holding window rows or not)."""
        if b <= a:
            return a
        size = self.chunk_len
        c = min(max(guess, a), b - 1) // size
        came = 0  # -1: from the chunk after this one, +1: from the one before
        while True:
            base = c * size
            x, y = max(a, base), min(b, base + size)
            vals = self.chunk(c)[x - base:y - base]
            if vals[0] >= t:  # the answer is x or before it
                if x == a or came == 1:
                    return x
                c, came = c - 1, -1
            elif vals[-1] < t:  # the answer is y or after it
                if y == b or came == -1:
                    return y
                c, came = c + 1, 1
            else:
                return x + int(vals.searchsorted(t))


def _supported(meta: dict) -> dict | None:
    """The inner-chunk configuration if `meta` is an array this module can read, else None."""
    try:
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            return None
        if np.dtype(meta["data_type"]).kind not in "biuf":
            return None
        codecs = meta["codecs"]
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        cfg = codecs[0]["configuration"]
        if cfg.get("index_location", "end") != "end":
            return None
        if [c["name"] for c in cfg["index_codecs"]] != ["bytes", "crc32c"]:
            return None
        inner = [c["name"] for c in cfg["codecs"]]
        if inner != ["bytes", "blosc", "crc32c"]:
            return None
        if cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            return None
        shape, grid = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        if list(grid[1:]) != list(shape[1:]) or list(cfg["chunk_shape"][1:]) != list(shape[1:]):
            return None
        if grid[0] % cfg["chunk_shape"][0]:
            return None
        return cfg
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def open_sharded(array_dir: Path | str) -> ShardedArray | None:
    """A fast reader for `array_dir`, or None if its layout is not the one popscale writes."""
    p = as_path(array_dir)
    try:
        meta = json.loads((p / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = _supported(meta)
    return ShardedArray(p, meta, cfg) if cfg is not None else None
