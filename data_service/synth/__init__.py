"""Synthetic corpora of reaching monkeys (see generate.py for what makes them realistic)."""

from .generate import SynthConfig, make_session, session_id, synth_corpus

__all__ = ["SynthConfig", "make_session", "session_id", "synth_corpus"]
