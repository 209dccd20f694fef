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

    @torch.inference_mode()
    def predict_timed(self, windows: list[Window]) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
        """`predict`, and the seconds it spent tokenizing and in the model (the live server's breakdown)."""
        if not windows:
            return {self.names[k]: np.zeros((0, dims)) for k, _, dims, _, _ in self.layout.outputs}, (0.0, 0.0)
        t0 = time.perf_counter()
        host = self.tok.pack([(w, self.reader, None) for w in windows])
        t1 = time.perf_counter()
        out = self.model(host.to(self.device))
        res = {}
        for k, b, dims, shift, scale in self.layout.outputs:
            raw = out[self.names[k]].float().cpu().numpy().astype(np.float64)  # one query a window, in order
            res[self.names[k]] = to_values(self.tok.cfg.readouts[k].kind, raw, shift, scale, dims)
        return res, (t1 - t0, time.perf_counter() - t1)


def causal_decode_session(decoder: CausalDecoder, ticks: np.ndarray, batch_size: int = 64,
                          spikes: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Predictions at `ticks` (absolute seconds), each from the window ending there, the spikes
    read from the session (or the given (times, units), sorted by time)."""
    times, units = spikes if spikes is not None else decoder.reader.spikes()
    times, units = np.asarray(times, np.float64), np.asarray(units, np.int64)
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(ticks), batch_size):
        wins = [decoder.window(float(t), times, units) for t in ticks[i:i + batch_size]]
        for name, v in decoder.predict(wins).items():
            parts.setdefault(name, []).append(v)
    return {name: np.concatenate(v) for name, v in parts.items()}




def causal_decode(model, tokenizer, reader: SessionReader, rows: np.ndarray | None = None, hz: float = 100.0,
                  model_uri: str = "MODEL", batch_size: int = 64) -> dict[str, Decoded]:
    """`decode --causal`: every readout at the times the stitched decoder predicts (the session's
    behaviour timestamps inside `rows`, else every 1/hz s), each from the window ending there."""
    dec = CausalDecoder(model, tokenizer, reader, model_uri)
    rows = iv.normalize(reader.domain if rows is None else rows)
    spikes = reader.spikes()
    out = {}
    for k, b, dims, _, _ in dec.layout.outputs:
        times = _query_times(reader, b, rows, hz)
        times = times[iv.contains(rows, times)]
        name = dec.names[k]
        values = causal_decode_session(dec, times, batch_size, spikes).get(name, np.zeros((0, dims)))
        out[name] = Decoded(reader.session_id, name, b, times, values, np.ones(len(times)),
                            dec.tok.cfg.readouts[k].kind, None, dec.tok.column(reader.session_id, k))
    return out
