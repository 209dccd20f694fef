"""Denormal floats flushed to zero while popscale computes on the CPU, and only then.

Why: a trained POYO's attention is peaked (the locality prior, and what training sharpens), so
most of each softmax row is exp(score - max) below 1e-38: denormal numbers, which x86 vector
units compute in microcode. On this CPU that made PyTorch's flash-attention backward 3x slower
in a trained model than on random inputs, and a unit-id step of models/poyo-real-1 0.62x as
long with them flushed (bench/denormals.py). Flushing (x86 FTZ/DAZ) changes nothing above 1e-38.

Why only inside `flushed()`: the flag is per thread and belongs to the process. Set for good (on
import, as popscale once did) it silently took subnormals from the caller's own numpy and Python
floats too. So the training step and the model's forward enter `flushed()`, which sets the flag in
the calling thread and in every thread of that thread's OpenMP pool (where torch's intra-op work
runs: a new thread copies the flag only from the thread that starts it, so a pool started earlier
would not otherwise see it), and restores both on leaving.

The pool is reached through OpenMP itself: `GOMP_parallel` runs a function once on every thread of
the calling thread's team, the team torch's parallel regions use. Where no OpenMP runtime can be
found (not Linux), only the calling thread flushes. POPSCALE_KEEP_DENORMALS=1 turns it all off
(to measure what flushing saves)."""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager

import numpy as np
import torch

KEEP_ENV = "POPSCALE_KEEP_DENORMALS"  # "1": leave the CPU's default everywhere
_SUBNORMAL = np.array([1000], dtype=np.int32).view(np.float32)  # ~1.4e-42, made from bits: no rounding flushes it
_local = threading.local()  # depth of nested `flushed()` in this thread
_OMP = None  # (GOMP_parallel, the per-thread body as a C callback), found once
_OMP_LOCK = threading.Lock()
_team_flag = [False]  # what the team's threads set, read by the callback


def thread_flushes() -> bool:
    """Whether the calling thread flushes denormals (its product with 1.5 is zero)."""
    return bool((_SUBNORMAL * np.float32(1.5))[0] == 0)


def _set_thread(on: bool) -> None:
    torch.set_flush_denormal(on)


def _openmp():
    """(GOMP_parallel, callback), or None: torch's OpenMP runtime as loaded in this process (GNU's
    libgomp in Linux wheels; LLVM's libomp also exports the GOMP entry points)."""
    global _OMP
    with _OMP_LOCK:
        if _OMP is not None:
            return _OMP or None
        _OMP = False
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "/lib" in line and "omp" in line.rsplit("/", 1)[-1]}
        except OSError:
            return None
        for path in sorted(paths):
            try:
                fn = ctypes.CDLL(path).GOMP_parallel
            except (OSError, AttributeError):
                continue
            body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: _set_thread(_team_flag[0]))
            fn.argtypes, fn.restype = [type(body), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint], None
            _OMP = (fn, body)
            break
        return _OMP or None


def _set_team(on: bool) -> None:
    """The flag in the calling thread and every thread of its OpenMP team (torch's pool)."""
    omp = _openmp()
    if omp is None:
        _set_thread(on)
        return
    fn, body = omp
    with _OMP_LOCK:  # one team at a time reads _team_flag
        _team_flag[0] = on
        fn(body, None, 0, 0)  # 0 threads: the team size torch's own parallel regions get


@contextmanager
def flushed(enabled: bool = True):
    """Denormals flushed to zero in this thread and torch's pool while inside; as before after.
    Nested uses cost nothing; a CPU without the flag (or POPSCALE_KEEP_DENORMALS=1) leaves all as is."""
    depth = getattr(_local, "depth", 0)
    if not depth and (not enabled or os.environ.get(KEEP_ENV) == "1"):
        yield
        return
    before = thread_flushes() if not depth else True
    if not depth and not torch.set_flush_denormal(True):
        yield  # a CPU without the flag
        return
    if not depth:
        _set_team(True)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        if not depth:
            _set_team(before)
