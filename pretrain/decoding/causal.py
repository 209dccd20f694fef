"""Causal decoding: the behaviour at a tick, predicted from the spikes of the window that ends there.

Why: a live decoder (a cursor, a prosthesis) must act at time T on what has happened before T.
The stitched decoder (stitch.py) averages overlapping windows, so most of its predictions have
seen spikes after their time. Here each tick T gets one window [T - W, T) and one output query at
its end; no spike stamped at or after T is in it. `popscale serve` runs exactly this on the spikes
its ring buffer holds at each tick, so this module is also the offline reference of what the server
publishes (`causal_decode_session`: the spikes read from the corpus instead of a stream).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from data_service import intervals as iv
from data_service.reader import SeriesWindow, SessionReader, Window

from .stitch import Decoded, _query_times, _tokenizer_for, to_values


@dataclass
class CausalDecoder:
    """A model and the session it decodes, ready to predict at ticks. `model_uri` names the model in
    the error raised when it was not adapted to this session."""

    model: torch.nn.Module
    tokenizer: object
    reader: SessionReader
    model_uri: str = "MODEL"
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.tok, self.layout = _tokenizer_for(self.tokenizer, self.reader, self.model_uri)
        self.window_s = float(self.tok.cfg.geometry.window_s)
        self.names = [r.name for r in self.tok.cfg.readouts]
        beh = self.reader.attrs["behaviour"]
        # a placeholder target as wide as the recorded behaviour (the tokenizer picks its columns)
        self._width = {k: len(beh[b]["columns"]) if b in self.reader.behaviour_names else dims
                       for k, b, dims, _, _ in self.layout.outputs}
        self.model.eval()

    def window(self, tick: float, times: np.ndarray, units: np.ndarray) -> Window:
        """The window ending at `tick` from spikes (absolute times, any span, sorted): only those in
        [tick - W, tick), and one query per readout at the window's end."""
        t0 = tick - self.window_s
        lo, hi = np.searchsorted(times, (t0, tick), side="left")
        beh = {b: SeriesWindow(np.array([self.window_s]), np.zeros((1, self._width[k])))
               for k, b, _, _, _ in self.layout.outputs}
        return Window(self.reader.session_id, t0, tick, np.asarray(times[lo:hi], np.float64) - t0,
                      np.asarray(units[lo:hi], np.int64), beh, {})

    def predict(self, windows: list[Window]) -> dict[str, np.ndarray]:
        """Each readout's prediction at the end of each window, in the behaviour's units: (n, dims)."""
        return self.predict_timed(windows)[0]

    def predict_timed(self, windows: list[Window]) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
        """`predict`, and the seconds it spent tokenizing and in the model (the live server's breakdown)."""
        raw, took = self.outputs(windows)
        return {self.names[k]: to_values(self.tok.cfg.readouts[k].kind, raw[self.names[k]], shift, scale, dims)
                for k, _, dims, shift, scale in self.layout.outputs}, took

    @torch.inference_mode()
    def outputs(self, windows: list[Window]) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
        """The model's raw outputs (normalised values, (cos, sin), logits) at each window's end, and
        the seconds spent tokenizing and in the model."""
        if not windows:
            return {self.names[k]: np.zeros((0, self.tok.cfg.readouts[k].dims)) for k, *_ in self.layout.outputs}, (0.0, 0.0)
        t0 = time.perf_counter()
        host = self.tok.pack([(w, self.reader, None) for w in windows])
        t1 = time.perf_counter()
        out = self.model(host.to(self.device))
        raw = {self.names[k]: out[self.names[k]].float().cpu().numpy().astype(np.float64)  # one query a window
               for k, *_ in self.layout.outputs}
        return raw, (t1 - t0, time.perf_counter() - t1)


def causal_outputs(decoder: CausalDecoder, ticks: np.ndarray, batch_size: int = 64,
                   spikes: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The raw outputs at `ticks` (absolute seconds), each from the window ending there, the spikes
    read from the session (or the given (times, units), sorted by time)."""
    times, units = spikes if spikes is not None else decoder.reader.spikes()
    times, units = np.asarray(times, np.float64), np.asarray(units, np.int64)
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(ticks), batch_size):
        wins = [decoder.window(float(t), times, units) for t in ticks[i:i + batch_size]]
        for name, v in decoder.outputs(wins)[0].items():
            parts.setdefault(name, []).append(v)
    return {name: np.concatenate(v) for name, v in parts.items()}


def causal_decode_session(decoder: CausalDecoder, ticks: np.ndarray, batch_size: int = 64,
                          spikes: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Predictions in the behaviour's units at `ticks`, each from the window ending there."""
    raw = causal_outputs(decoder, ticks, batch_size, spikes)
    return {decoder.names[k]: to_values(decoder.tok.cfg.readouts[k].kind, raw[decoder.names[k]], shift, scale, dims)
            for k, _, dims, shift, scale in decoder.layout.outputs if decoder.names[k] in raw}


def causal_decode(model, tokenizer, reader: SessionReader, rows: np.ndarray | None = None, hz: float = 100.0,
                  model_uri: str = "MODEL", batch_size: int = 64, max_hz: float | None = None) -> dict[str, Decoded]:
    """`decode --causal`: every readout at the times the stitched decoder predicts (the session's
    behaviour timestamps inside `rows`, else every 1/hz s), each from the window ending there; like
    the stitched decoder's, `windows` is 1 where predicted and 0 (values NaN) outside `rows`.
    `max_hz`: predict only every k-th of those samples, k the smallest that keeps them at most
    max_hz a second (validation during training: each prediction is a forward pass); the others
    are NaN with `windows` 0, as outside `rows`."""
    was_training = model.training
    try:
        return _causal_decode(CausalDecoder(model, tokenizer, reader, model_uri), reader, rows, hz, batch_size, max_hz)
    finally:
        model.train(was_training)


def thin(times: np.ndarray, max_hz: float | None) -> np.ndarray:
    """A mask keeping every k-th of `times` (sorted), k the smallest with at most `max_hz` kept a second
    (their median spacing decides); all of them when max_hz is None or they are sparser already."""
    keep = np.ones(len(times), bool)
    if max_hz is None or len(times) < 2:
        return keep
    dt = float(np.median(np.diff(times)))
    k = int(np.ceil(1.0 / (max_hz * dt) - 1e-9)) if dt > 0 else 1
    if k > 1:
        keep[:] = False
        keep[::k] = True
    return keep


def _causal_decode(dec: CausalDecoder, reader: SessionReader, rows, hz: float, batch_size: int,
                   max_hz: float | None = None) -> dict[str, Decoded]:
    rows = iv.normalize(reader.domain if rows is None else rows)
    spikes = reader.spikes()
    out = {}
    for k, b, dims, shift, scale in dec.layout.outputs:
        times = _query_times(reader, b, rows, hz)  # as the stitched decoder: every sample, those in rows predicted
        inside = iv.contains(rows, times)
        inside[inside] = thin(times[inside], max_hz)
        name, kind = dec.names[k], dec.tok.cfg.readouts[k].kind
        width = dec.tok.cfg.readouts[k].dims
        raw = np.full((len(times), width), np.nan)
        if inside.any():
            raw[inside] = causal_outputs(dec, times[inside], batch_size, spikes)[name]
        values = to_values(kind, raw, shift, scale, dims, inside)
        out[name] = Decoded(reader.session_id, name, b, times, values, inside.astype(np.float64), kind,
                            None if kind == "continuous" else raw, dec.tok.column(reader.session_id, k))
    return out
