"""The POYO network and what it is built from: the model config and presets, the
PerceiverIO (poyo.py), attention backends and kernels, rotary time, the growing unit/session
vocabularies, the loss, FLOP counts, and the packed batch it reads. Imports torch and numpy
only: nothing of the corpus, Ray, MLflow or the rest of pretrain."""
