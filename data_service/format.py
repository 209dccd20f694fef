"""The corpus format (docs/corpus-format.md): names, chunking, codecs and checksums in one place.

Chunk sizes and the codec come from bench/compression.py (figures in docs/corpus-format.md):
an inner chunk of 4096 elements keeps the decode of one chunk at a few tens of microseconds, so
a 1 s window (1-3k spikes) costs one or two chunk decodes; 2^22-element shards keep the number
of files per array at one for any session shorter than a few hours.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

from .errors import CorpusError
from .remote import as_path

FORMAT_NAME = "popscale-corpus"
FORMAT_VERSION = 1

SESSIONS = "sessions"
MANIFEST = "manifest.json"
STAGING = ".staging"
TRASH = ".trash"
LOCK = ".lock"

INDEX_STEP_S = 1.0  # the per-second spike/sample offset index

# arrays inside a session group
SPIKE_TIMES = "spikes/timestamps"
SPIKE_UNITS = "spikes/unit_index"
SPIKE_INDEX = "spikes/index"
UNIT_IDS = "units/id"
UNIT_AREAS = "units/area"
INTERVALS = "intervals"  # (n, 2) float64, rows grouped by set; attrs["sets"] = {name: [lo, hi]}
GROUND_TRUTH = "ground_truth"


def check_corpus_root(root: Path) -> dict:
    """The root's popscale attributes; raises CorpusError if `root` is not a corpus this version reads."""
    meta = as_path(root) / "zarr.json"
    if not meta.exists():
        raise CorpusError("not a popscale corpus (no zarr.json)", file=str(root))
    attrs = json.loads(meta.read_text()).get("attributes", {}).get("popscale", {})
    if attrs.get("format") != FORMAT_NAME:
        raise CorpusError("a Zarr store but not a popscale corpus", file=str(root))
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise CorpusError(f"corpus format v{attrs['format_version']} is newer than this popscale "
                          f"(v{FORMAT_VERSION}); upgrade popscale", file=str(root))
    return attrs


def behaviour_path(name: str, leaf: str) -> str:
    return f"behaviour/{name}/{leaf}"


@dataclass(frozen=True)
class Chunking:
    """Elements per inner chunk and per shard along the time axis."""

    chunk: int = 4096
    shard: int = 1 << 22
    cname: str = "lz4"
    clevel: int = 5
    shuffle: str = "shuffle"  # byte shuffle: same size as bitshuffle here, decodes 2-3x faster (bench/RESULTS.md, issue 13)


DEFAULT_CHUNKING = Chunking()


def sharded_codec(dtype: np.dtype, chunking: Chunking, row_shape: tuple[int, ...] = ()) -> ShardingCodec:
    """bytes -> blosc -> crc32c per inner chunk, and a crc32c-protected index at the shard's end."""
    return ShardingCodec(
        chunk_shape=(chunking.chunk, *row_shape),
        codecs=[
            BytesCodec(endian="little"),
            BloscCodec(cname=chunking.cname, clevel=chunking.clevel, shuffle=chunking.shuffle,
                       typesize=np.dtype(dtype).itemsize),
            Crc32cCodec(),
        ],
        index_codecs=[BytesCodec(endian="little"), Crc32cCodec()],
        index_location="end",
    )


def checksum(a) -> str:
    """sha256 of an array's logical content (shape, dtype and little-endian bytes; strings as UTF-8),
    independent of chunking and compression, so it survives a change of storage layout."""
    h = hashlib.sha256()
    arr = np.asarray(a)
    if arr.dtype.kind in "OUT":
        items = [str(x) for x in arr.reshape(-1)]
        h.update(f"str{list(arr.shape)}".encode())
        for x in items:
            b = x.encode("utf-8")
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
    else:
        le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        h.update(f"{le.dtype.str}{list(le.shape)}".encode())
        h.update(le.tobytes())
    return "sha256:" + h.hexdigest()


def unit_index_dtype(n_units: int) -> np.dtype:
    return np.dtype("<u2") if n_units <= np.iinfo(np.uint16).max else np.dtype("<u4")


def exact_grid(t: np.ndarray, rate: float | None = None) -> tuple[float, float] | None:
    """(t0, step) if the timestamps are exactly t0 + i * step, element for element, else None.

    Readers then compute a window's timestamps instead of reading them, bit for bit the same.
    """
    n = len(t)
    if n < 2:
        return None
    t0 = float(t[0])
    steps = [float(t[1] - t[0]), float((t[-1] - t[0]) / (n - 1))] + ([1.0 / rate] if rate else [])
    idx = np.arange(n)
    for step in steps:
        if step > 0 and np.array_equal(t, t0 + idx * step):
            return t0, step
    return None


def time_index(t: np.ndarray, origin: float, n_steps: int, step: float = INDEX_STEP_S) -> np.ndarray:
    """offsets[k] = number of samples with t < origin + k*step, for k = 0..n_steps.

    A window [t0, t1) then lies within samples offsets[floor((t0-origin)/step)] ..
    offsets[ceil((t1-origin)/step)], found by arithmetic instead of a search over the session.
    """
    edges = origin + step * np.arange(n_steps + 1, dtype=np.float64)
    return np.searchsorted(t, edges, side="left").astype(np.int64)
