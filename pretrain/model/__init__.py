"""The POYO network and what it is built from: the model config and presets, the
PerceiverIO (poyo.py), attention backends and kernels, rotary time, the growing unit/session
vocabularies, the loss, FLOP counts, and the packed batch it reads. Imports torch and numpy
only: nothing of the corpus, Ray, MLflow or the rest of pretrain.

Importing it flushes denormal floats to zero on the CPU, before torch starts its threads
(numerics.py says why: attention's backward in a trained model is otherwise up to 3x slower)."""

import os as _os

import torch as _torch

from .numerics import KEEP_ENV as _KEEP

if _os.environ.get(_KEEP) != "1":
    _torch.set_flush_denormal(True)  # this thread; threads torch starts later copy it (numerics.py)
