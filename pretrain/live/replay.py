"""Plays a stored session to LSL in real time (or `speed` times faster), as a rig would stream it.

Why: the whole live loop (rig -> `popscale serve` -> predictions) then runs on one machine with a
real LSL stack, on recordings whose behaviour is known, so a live decoder can be checked against
the offline one and scored. Each spike goes out as one sample of the spike stream (streams.py), its
LSL timestamp the spike's time mapped onto this machine's LSL clock (or, with `bin_ms`, as a binned
rig sends them: every unit's count per bin, stamped at the bin's end); the behaviour goes out on a
second stream the same way. Pushes happen every `tick_ms` of wall time, each carrying the events
whose time has come, so a consumer sees them arrive as from an acquisition system.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data_service.reader import open_corpus

from .streams import behaviour_stream_info, counts_stream_info, lsl, spike_stream_info


@dataclass
class ReplayConfig:
    corpus: str
    session: str
    speed: float = 1.0  # recording seconds per wall second
    start_s: float | None = None  # recording time to start at (default: the session's first spike)
    duration_s: float | None = None  # recording seconds to play (default: to the end)
    behaviour: str | None = None  # the behaviour on the second stream (default: the session's first)
    tick_ms: float = 5.0  # wall milliseconds between pushes
    name: str = "popscale-spikes"  # the spike stream's name; the behaviour stream's is "<name>-behaviour"
    source_id: str | None = None  # default: popscale-replay-<session>
    wait_consumers_s: float = 0.0  # wait up to this long for a spike-stream consumer before playing (0: at once)
    linger_s: float = 1.0  # keep the streams open this long after the last event, for consumers to drain them
    bin_ms: float | None = None  # send counts per bin of this many recording ms (a count stream) instead of spikes


@dataclass
class ReplayResult:
    spikes: int
    behaviour_samples: int
    recording_s: float
    wall_s: float
    lsl_t0: float  # the LSL time of recording time t_start
    t_start: float


def _window(times: np.ndarray, t0: float, t1: float) -> slice:
    return slice(int(np.searchsorted(times, t0, "left")), int(np.searchsorted(times, t1, "left")))


def replay(cfg: ReplayConfig, on_tick: Callable[[float, int], None] | None = None) -> ReplayResult:
    """Plays `cfg.session` of `cfg.corpus`; on_tick(recording seconds played, spikes sent) after each push."""
    if cfg.speed <= 0:
        raise ValueError(f"replay: speed must be positive, got {cfg.speed}")
    if cfg.bin_ms is not None and cfg.bin_ms <= 0:
        raise ValueError(f"replay: bin_ms must be positive, got {cfg.bin_ms}")
    reader = open_corpus(cfg.corpus).session(cfg.session)
    times, units = reader.spikes()
    times, units = np.asarray(times, np.float64), np.asarray(units, np.int32)
    names = reader.behaviour_names
    name = cfg.behaviour or (names[0] if names else None)
    if name is not None and name not in names:
        raise LookupError(f"{cfg.corpus}: session {cfg.session} has no behaviour {name!r} (it has {names})")
    t_start = float(cfg.start_s if cfg.start_s is not None else (times[0] if len(times) else reader.domain[0, 0]))
    t_end = float(reader.domain[-1, 1]) if cfg.duration_s is None else t_start + cfg.duration_s
    sp = _window(times, t_start, t_end)
    times, units = times[sp], units[sp]
    if name is not None:
        b_times, b_values = reader.behaviour(name)
        bw = _window(np.asarray(b_times, np.float64), t_start, t_end)
        b_times = np.asarray(b_times, np.float64)[bw]
        b_values = np.asarray(b_values, np.float32)[bw].reshape(len(b_times), -1)
        rate = float(1 / np.median(np.diff(b_times))) if len(b_times) > 1 else 0.0
    pylsl = lsl()
    source = cfg.source_id or f"popscale-replay-{cfg.session}"
    ids = [str(u) for u in reader.unit_ids]
    bin_s = cfg.bin_ms / 1000 if cfg.bin_ms else None
    info = (counts_stream_info(cfg.name, source, cfg.session, ids, bin_s, cfg.speed / bin_s) if bin_s else
            spike_stream_info(cfg.name, source, cfg.session, ids))
    out = pylsl.StreamOutlet(info, chunk_size=0, max_buffered=360)
    n_bins = int(np.floor((t_end - t_start) / bin_s + 1e-9)) if bin_s else 0
    b_out = None
    if name is not None:
        b_out = pylsl.StreamOutlet(behaviour_stream_info(f"{cfg.name}-behaviour", f"{source}-behaviour", cfg.session,
                                                         name, b_values.shape[1], rate * cfg.speed))
    if cfg.wait_consumers_s > 0:  # the spike stream's consumer; one of the behaviour stream is optional
        out.wait_for_consumers(cfg.wait_consumers_s)
    lsl_t0 = pylsl.local_clock()
    wall0 = time.perf_counter()
    i = j = k = 0
    n_b = len(b_times) if b_out is not None else 0
    n_spikes = len(times)
    while (k < n_bins if bin_s else i < n_spikes) or j < n_b:
        played = t_start + (pylsl.local_clock() - lsl_t0) * cfg.speed  # recording time whose events are due
        j2 = 0
        if bin_s:  # the bins that have ended, each unit's count in them
            k2 = min(n_bins, int(np.floor((played - t_start) / bin_s + 1e-9)))
            if k2 > k:
                i2 = int(np.searchsorted(times, t_start + k2 * bin_s, "left"))
                counts = np.zeros((k2 - k, len(ids)), np.int32)
                rows = np.clip(np.floor((times[i:i2] - t_start) / bin_s + 1e-9).astype(np.int64) - k, 0, k2 - k - 1)
                np.add.at(counts, (rows, units[i:i2]), 1)
                ends = t_start + np.arange(k + 1, k2 + 1) * bin_s
                out.push_chunk(counts.tolist(), (lsl_t0 + (ends - t_start) / cfg.speed).tolist())
                i, k = i2, k2
        else:
            i2 = int(np.searchsorted(times, played, "right"))
            if i2 > i:
                out.push_chunk(units[i:i2].reshape(-1, 1).tolist(), (lsl_t0 + (times[i:i2] - t_start) / cfg.speed).tolist())
                i = i2
        if b_out is not None:
            j2 = int(np.searchsorted(b_times, played, "right"))
            if j2 > j:
                b_out.push_chunk(b_values[j:j2].tolist(), (lsl_t0 + (b_times[j:j2] - t_start) / cfg.speed).tolist())
                j = j2
        if on_tick is not None:
            on_tick(min(played, t_end) - t_start, i)
        if (k < n_bins if bin_s else i < n_spikes) or j < n_b:
            time.sleep(cfg.tick_ms / 1000)
    wall = time.perf_counter() - wall0
    if cfg.linger_s > 0:
        time.sleep(cfg.linger_s)
    return ReplayResult(i, n_b, t_end - t_start, wall, lsl_t0, t_start)
