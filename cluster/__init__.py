"""Talking to Ray clusters: job submission and cluster configs (the local embedded cluster is the
default; see runbooks/)."""
