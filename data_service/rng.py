"""Counter-based randomness: every draw is a hash of (key, index), so any window's draws can be
computed on its own, in any process, at no generator set-up cost. The window index uses it for
its permutation and jitter, the data service for augmentation."""

from __future__ import annotations

import hashlib
import json

import numpy as np

_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised: a well-mixed 64-bit hash of each element."""
    # (unsigned array arithmetic wraps modulo 2^64 silently: no errstate needed, and it is
    # ~5 us per use on a per-window path)
    x = x.astype(np.uint64, copy=True)
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def key(*parts) -> int:
    """A 64-bit key from any JSON-able parts (fingerprints, seeds, epoch, a stream name)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little")


def uniform(k: int, idx: np.ndarray) -> np.ndarray:
    """Deterministic U[0, 1) per index for a key."""
    h = mix(idx.astype(np.uint64) + np.uint64(k & 0xFFFFFFFFFFFFFFFF))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
