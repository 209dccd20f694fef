"""Scaling sweeps (popscale sweep: a grid of pretraining runs on Ray, each point evaluated by
held-out loss and unit-id R2) and the scaling-law fit with its report. The top layer of pretrain."""
