"""Decoding a session: sliding windows stitched into timestamped predictions in its own units.

Windows of the model's length, 50 % overlapping, cover the stretches asked for (default: the
whole recording); each query time (the session's behaviour timestamps where it has them, else a
regular grid) is predicted by every window that holds it and the predictions are averaged.
Targets are undone with the session's statistics, so the numbers are in the units the session
was recorded in. Validation and `popscale evaluate` score these same predictions (evaluate.py).

    model, tok = load_exported("runs/models/popscale-poyo/3")
    out = decode_session(model, tok, corpus.session("S"))      # {readout: Decoded}
    write_csv(out, "pred.csv")
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from data_service import intervals as iv
from data_service.reader import SeriesWindow, SessionReader

from ..model.vocab import VocabMismatch
from ..tokens.tokenizer import Tokenizer


class UnknownRecording(ValueError):
    """A recording whose units or session the model has never been trained or adapted on."""


@dataclass
class Decoded:
    session_id: str
    readout: str
    behaviour: str  # what the readout decodes in this session (its units)
    times: np.ndarray  # (n,) absolute seconds
    # (n, d) in the session's units (continuous), (n, 1) angle in radians (angular), (n, 1) class id
    # (categorical); NaN where no window held the time
    values: np.ndarray
    windows: np.ndarray  # (n,) windows averaged at each time
    kind: str = "continuous"
    raw: np.ndarray | None = None  # the averaged model outputs: (cos, sin) or class logits
    column: list[int] | None = None  # the behaviour's columns decoded (None: all of them)


def window_starts(rows: np.ndarray, window: float, domain: tuple[float, float]) -> np.ndarray:
    """Starts of windows, stride window/2, covering every interval (the last flush with its end);
    an interval shorter than a window gets one window centred on it, kept inside the session."""
    starts = []
    for a, b in rows:
        if b - a <= window:
            starts.append(min(max(a - (window - (b - a)) / 2, domain[0]), domain[1] - window))
        else:
            s = np.arange(a, b - window, window / 2)
            starts.extend(s.tolist() + [b - window])
    starts = np.sort(np.asarray(starts, dtype=np.float64))
    # drop near-duplicates without moving any start: rounding them (as this once did) could move an
    # interval's first window past its first sample, which then went unscored
    keep = np.concatenate([[True], np.diff(starts) > 1e-9]) if len(starts) else np.zeros(0, bool)
    return starts[keep]


def _query_times(reader: SessionReader, behaviour: str, rows: np.ndarray, hz: float) -> np.ndarray:
    if behaviour in reader.behaviour_names:
        return np.asarray(reader.behaviour(behaviour)[0], dtype=np.float64)
    grid = [np.arange(a, b, 1.0 / hz) for a, b in rows]
    return np.concatenate(grid) if grid else np.zeros(0)


def _tokenizer_for(tokenizer: Tokenizer, reader: SessionReader, model_uri: str):
    tok = Tokenizer(tokenizer.cfg, tokenizer.unit_vocab, tokenizer.session_vocab)
    try:
        return tok, tok.decoding_layout(reader)
    except (VocabMismatch, KeyError) as e:
        raise UnknownRecording(
            f"session {reader.session_id}: the model has not been trained or adapted on this recording ({e}); "
            f"adapt it first: popscale finetune --model {model_uri} --corpus CORPUS --session {reader.session_id}"
        ) from None


def to_values(kind: str, raw: np.ndarray, shift: np.ndarray, scale: np.ndarray, dims: int,
              seen: np.ndarray | None = None) -> np.ndarray:
    """A readout's outputs in the behaviour's own units: an angle from its (cos, sin), a class from
    its logits (NaN where no window `seen` the sample), a continuous value de-normalised."""
    if kind == "angular":
        return np.arctan2(raw[:, 1], raw[:, 0])[:, None]
    if kind == "categorical":
        seen = np.ones(len(raw), bool) if seen is None else seen
        return np.where(seen, np.nan_to_num(raw).argmax(1), np.nan).astype(np.float64)[:, None]
    return raw * scale[:dims] + shift[:dims]


@torch.no_grad()
def decode_session(model, tokenizer: Tokenizer, reader: SessionReader, rows: np.ndarray | None = None,
                   hz: float = 100.0, batch_size: int = 32, device: torch.device | str = "cpu",
                   model_uri: str = "MODEL") -> dict[str, Decoded]:
    """Stitched predictions of every readout the model has for this session, at the session's
    behaviour timestamps (else every 1/hz s) inside `rows` (default: the whole recording)."""
    tok, layout = _tokenizer_for(tokenizer, reader, model_uri)
    domain = (float(reader.domain[0, 0]), float(reader.domain[-1, 1]))
    rows = iv.normalize(reader.domain if rows is None else rows)
    window = tok.cfg.geometry.window_s
    names = [r.name for r in tok.cfg.readouts]
    queries = {k: (b, _query_times(reader, b, rows, hz), dims, shift, scale) for k, b, dims, shift, scale in layout.outputs}
    # placeholder values as wide as the recorded behaviour (the tokenizer picks a readout's columns from it)
    width_in = {k: len(reader.attrs["behaviour"][b]["columns"]) if b in reader.behaviour_names else dims
                for k, (b, _, dims, _, _) in queries.items()}
    width = {k: tok.cfg.readouts[k].dims for k in queries}  # what the model outputs (logits: the classes)
    total = {k: np.zeros((len(q[1]), width[k])) for k, q in queries.items()}
    count = {k: np.zeros(len(q[1])) for k, q in queries.items()}
    starts = window_starts(rows, window, domain) if len(rows) else np.zeros(0)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(starts), batch_size):
            items, spans = [], []
            for t0 in starts[i:i + batch_size]:
                w = reader.read_window(t0, t0 + window, behaviours=())
                beh, span = {}, {}
                for k, (b, times, dims, _, _) in queries.items():
                    lo, hi = np.searchsorted(times, (t0, t0 + window), side="left")
                    beh[b] = SeriesWindow(times[lo:hi] - t0, np.zeros((hi - lo, width_in[k])))
                    span[k] = (lo, hi)
                items.append((replace(w, behaviour=beh), reader, None))
                spans.append(span)
            host = tok.pack(items)
            out = model(host.to(device))
            for k in queries:
                pred = out[names[k]].float().cpu().numpy()
                # rows of readout k, window by window, in query order (pack keeps both orders)
                at = 0
                for span in spans:
                    lo, hi = span[k]
                    total[k][lo:hi] += pred[at:at + hi - lo]
                    count[k][lo:hi] += 1
                    at += hi - lo
    finally:
        model.train(was_training)
    result = {}
    for k, (b, times, dims, shift, scale) in queries.items():
        kind = tok.cfg.readouts[k].kind
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = total[k] / count[k][:, None]
        values = to_values(kind, raw, shift, scale, dims, count[k] > 0)
        result[names[k]] = Decoded(reader.session_id, names[k], b, times, values, count[k], kind,
                                   None if kind == "continuous" else raw, tok.column(reader.session_id, k))
    return result


def write_csv(decoded: dict[str, Decoded], path: str | Path) -> Path:
    """One row per query time decoded by at least one window: time, then each readout's columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["readout", "behaviour", "time_s"] + [f"value_{j}" for j in
                                                           range(max((d.values.shape[1] for d in decoded.values()),
                                                                     default=0))])
        for d in decoded.values():
            ok = d.windows > 0
            for t, v in zip(d.times[ok], d.values[ok]):
                w.writerow([d.readout, d.behaviour, f"{t:.6f}"] + [f"{x:.6g}" for x in v])
    tmp.replace(path)
    return path


def write_nwb(decoded: dict[str, Decoded], path: str | Path, source: str = "", units: dict[str, str] | None = None
              ) -> Path:
    """An NWB file with one TimeSeries per readout in a `decoded` processing module (timestamps in
    seconds of the recording; the series' unit is the session's, where known)."""
    # deferred: importing pynwb only when used keeps start-up light
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    path = Path(path)
    nwb = NWBFile(session_description=f"behaviour decoded by popscale from {source or 'a recording'}",
                  identifier=f"popscale-decoded-{path.stem}", session_start_time=datetime.now(timezone.utc))
    mod = nwb.create_processing_module("decoded", "behaviour decoded by a popscale model (stitched windows)")
    for d in decoded.values():
        ok = d.windows > 0
        mod.add(TimeSeries(name=d.behaviour, data=d.values[ok], timestamps=d.times[ok],
                           unit=(units or {}).get(d.behaviour, "unknown"),
                           description=f"readout {d.readout} of session {d.session_id}"))
    tmp = path.with_name(path.name + ".tmp")
    with NWBHDF5IO(str(tmp), "w") as io:
        io.write(nwb)
    tmp.replace(path)
    return path


def plot_traces(path: str | Path, title: str, panels: list[tuple[str, tuple | None, tuple]]) -> Path:
    """One panel per (label, (times, recorded) or None, (times, decoded)): dots, recorded in grey."""
    # deferred: importing matplotlib only when used keeps start-up light
    import matplotlib

    matplotlib.use("Agg")
    # deferred: importing matplotlib only when used keeps start-up light
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(10, 2.2 * max(1, len(panels))), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, (label, recorded, decoded) in zip(axes, panels):
        if recorded is not None:
            ax.plot(*recorded, ".", ms=2, color="0.3", label="recorded")
        ax.plot(*decoded, ".", ms=2, color="tab:red", label="decoded")
        ax.set_ylabel(label)
    axes[0].set_title(title)
    axes[0].legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_decoded(decoded: dict[str, Decoded], path: str | Path, reader: SessionReader | None = None,
                 seconds: float = 30.0) -> Path:
    """The first `seconds` of each readout's decoded trace (and the recorded one, when the session has it)."""
    panels = []
    for d in decoded.values():
        ok = d.windows > 0
        t0 = d.times[ok][0] if ok.any() else 0.0
        keep = ok & (d.times < t0 + seconds)
        recorded = None
        if reader is not None and d.behaviour in reader.behaviour_names:
            t, v = reader.behaviour(d.behaviour)
            m = (t >= t0) & (t < t0 + seconds)
            recorded = (t[m], np.asarray(v)[m].reshape(int(m.sum()), -1))
        for j in range(d.values.shape[1]):
            col = j if d.column is None else d.column[j]
            panels.append((f"{d.behaviour}[{col}]", None if recorded is None else (recorded[0], recorded[1][:, col]),
                           (d.times[keep], d.values[keep, j])))
    sid = next(iter(decoded.values())).session_id if decoded else ""
    return plot_traces(path, f"{sid}: decoded", panels)
