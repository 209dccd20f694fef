"""Using a model on whole recordings and judging it: stitched decoding (stitch.py), scoring
with bootstrap intervals (metrics.py, evaluate.py), and the per-session baselines a lab would
compare against (ridge, GRU). Imports data_service, pretrain.model and pretrain.tokens."""
