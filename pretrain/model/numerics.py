"""Denormal floats flushed to zero on the CPU, in every thread of torch's pool.

Why: a trained POYO's attention is peaked (the locality prior, and what training sharpens), so
most of each softmax row is exp(score - max) below 1e-38: denormal numbers, which x86 vector
units compute one at a time in microcode. On this CPU that made PyTorch's flash-attention
backward 3x slower in a trained model than on random inputs (a unit-id step of models/poyo-real-1
on mihi_demo-te: 0.38 s with denormals, 0.24 s without; bench/denormals.py). Flushing them to zero
(x86 FTZ/DAZ, as TensorFlow does by default) changes nothing above 1e-38.

The flag is per thread, and a new thread copies it from the thread that starts it: it must be set
before torch starts its pool (its first parallel operation), so importing `pretrain.model` sets it.
`flush_denormals()` checks the pool and says when it came too late (torch computed before the import).
"""

from __future__ import annotations

import os
import warnings

import torch

KEEP_ENV = "POPSCALE_KEEP_DENORMALS"  # "1": leave the CPU's default (e.g. to measure what flushing saves)
_PROBE = 1 << 16  # elements per thread: above torch's grain (32,768), so every thread of the pool takes a part


def pool_flushes() -> bool:
    """Whether every thread that computes an elementwise product flushes denormals: 1e-30 * 1e-10
    is denormal, and zero where flushed."""
    x = torch.full((_PROBE * max(1, torch.get_num_threads()),), 1e-30, dtype=torch.float32)
    return not bool((x * 1e-10).any())


def flush_denormals(warn: bool = True) -> bool:
    """Flush denormals in this thread; True when torch's pool flushes them too. With `warn`, says so
    when it does not (torch had started its threads before; training and decoding run slower)."""
    if os.environ.get(KEEP_ENV) == "1" or not torch.set_flush_denormal(True):
        return False  # asked not to, or a CPU without the flag
    ok = pool_flushes()
    if not ok and warn:
        warnings.warn("denormal floats are flushed in this thread only: torch had started its thread pool before "
                      "pretrain.model was imported; import it before any torch computation (attention's backward "
                      "can be up to 3x slower)", RuntimeWarning, stacklevel=2)
    return ok
