"""`popscale serve`: a spike stream in over LSL, a causal prediction out every period.

The loop, on one thread: pull what has arrived into the ring buffer (buffer.py), and at each tick T
(every `period_ms` on this machine's LSL clock) cut the window [T - W, T) from it, decode it with
the causal readout (pretrain/decoding/causal.py) and publish the prediction stamped T. A tick whose
time has passed while the model ran is skipped (counted), never queued: the newest tick is the one
decoded. liblsl receives on its own thread, so input is never blocked by the model; it buffers
what arrives meanwhile. Spike timestamps go through LSL's time correction (proc_clocksync), so a
rig on another clock lands on this one.

A binned rig's count stream (streams.py) is taken as spikes placed evenly inside their bins, and a
tick decodes the window ending at the newest bin end it has received at or before it (`cut`, in the
log): a bin that ends after the tick is never used, though part of it came before.

A stream replayed faster than real time (`popscale replay --speed S`) carries recording time
compressed S-fold; serve with the same `speed` and the model sees recording seconds.

Every tick's time, the spikes it held and what was published can be logged (`log`): the offline
reference then recomputes each prediction from exactly those spikes (tests/test_live.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .buffer import Counts, SpikeRing
from .streams import counts_to_spikes, lsl, read_spike_stream_info
from .warm import Warmth


@dataclass
class ServeConfig:
    stream: str = "popscale-spikes"  # the spike stream's name (or source id) to subscribe to
    period_ms: float = 50.0  # wall milliseconds between predictions
    speed: float = 1.0  # recording seconds per LSL second of the input (1: a live rig)
    tolerance_ms: float = 5.0  # how far out of order a spike may arrive and still be used
    lag_ms: float = 0.0  # decode the tick T at T + lag: spikes in transit that long are still used
    name: str = "popscale-predictions"  # the prediction stream's name
    duration_s: float | None = None  # stop after this many wall seconds (None: until interrupted)
    resolve_timeout_s: float = 30.0
    log: str | None = None  # an .npz of every tick: its time, the spikes it held, what was published
    # torch's intra-op threads. 1: a one-window forward is too small to split, and on a busy machine a
    # second thread waits for a core (poyo-1.3M on 2 shared cores: 16 ms at 1 thread, 67 ms at 2)
    threads: int | None = 1
    # keep the decoding core hot between ticks (warm.py): one throw-away forward and no sleeping just before
    # each tick. Costs about one more forward a tick of CPU; off (--no-warm) on a machine shared with other work
    warm: bool = True


@dataclass
class Stats:
    ticks: int = 0
    skipped: int = 0  # ticks passed while the model ran: not decoded
    last_tick: float = float("-inf")  # the LSL time of the newest tick decoded
    latency_ms: list[float] = field(default_factory=list)  # tick time -> prediction published
    parts_ms: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("buffer", "tokenize", "forward",
                                                                                         "publish")})
    counts: Counts = field(default_factory=Counts)

    def percentiles(self) -> dict[str, float]:
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "max": float(lat.max())}


class _TickLog:
    def __init__(self) -> None:
        self.ticks, self.cuts, self.preds, self.times, self.units, self.lens = [], [], [], [], [], []

    def add(self, tick: float, cut: float, t: np.ndarray, u: np.ndarray, pred: np.ndarray) -> None:
        self.ticks.append(tick)
        self.cuts.append(cut)
        self.preds.append(pred)
        self.times.append(t)
        self.units.append(u)
        self.lens.append(len(t))

    def save(self, path: str, speed: float, unit_ids: list[str]) -> None:
        cat = np.concatenate
        np.savez(path, ticks=np.asarray(self.ticks, np.float64), cuts=np.asarray(self.cuts, np.float64),
                 predictions=np.asarray(self.preds, np.float64),
                 spike_times=cat(self.times) if self.times else np.zeros(0), lens=np.asarray(self.lens, np.int64),
                 spike_units=cat(self.units) if self.units else np.zeros(0, np.int64), speed=speed,
                 unit_ids=np.asarray(unit_ids))


def unit_map(stream_ids: list[str], session_ids: list[str]) -> np.ndarray:
    """Stream channel value -> the session's unit index (-1: a unit the session does not have)."""
    where = {u: i for i, u in enumerate(session_ids)}
    return np.asarray([where.get(u, -1) for u in stream_ids], np.int64)


def _to_units(mapping: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Stream values (unit indices, or a count stream's channels) -> the session's units; -1: unknown."""
    return np.where((v >= 0) & (v < len(mapping)), mapping[np.clip(v, 0, max(len(mapping) - 1, 0))], -1)


def serve(decoder, cfg: ServeConfig, on_tick: Callable[[Stats], None] | None = None,
          stop: Callable[[], bool] | None = None) -> Stats:
    """Runs until `cfg.duration_s` has passed or `stop()` is true; returns the counts and latencies.
    `decoder` is a pretrain.decoding.causal.CausalDecoder of the session the stream carries."""
    pylsl = lsl()
    found = (pylsl.resolve_byprop("name", cfg.stream, timeout=cfg.resolve_timeout_s)
             or pylsl.resolve_byprop("source_id", cfg.stream, timeout=1.0))
    if not found:
        raise LookupError(f"no LSL spike stream named {cfg.stream!r} on this machine within {cfg.resolve_timeout_s:g} s")
    inlet = pylsl.StreamInlet(found[0], max_buflen=60, processing_flags=pylsl.proc_clocksync)
    info = read_spike_stream_info(inlet.info(timeout=cfg.resolve_timeout_s))
    session_units = [str(u) for u in decoder.reader.unit_ids]
    mapping = unit_map(info.unit_ids, session_units) if info.unit_ids else np.arange(len(session_units))
    inlet.open_stream(timeout=cfg.resolve_timeout_s)
    # the first time correction blocks while liblsl measures the clock offset (~0.5 s): done here, not in the
    # first tick, which it would make late
    inlet.time_correction(timeout=cfg.resolve_timeout_s)
    window_lsl = decoder.window_s / cfg.speed
    period, lag, tol = cfg.period_ms / 1000, cfg.lag_ms / 1000, cfg.tolerance_ms / 1000 / cfg.speed
    bin_lsl = info.bin_s / cfg.speed if info.binned else 0.0
    ring = SpikeRing(len(session_units), keep_s=window_lsl + tol + period + lag + bin_lsl, tolerance_s=tol)
    ends = np.zeros(0)  # a count stream's recent bin ends (LSL time): the windows end at one of them
    stats = Stats(counts=ring.counts)
    t_probe = time.perf_counter()
    dims = [v.shape[1] for v in decoder.predict([decoder.window(0.0, np.zeros(0), np.zeros(0, np.int64))]).values()]
    warmth = Warmth(period, enabled=cfg.warm, first_s=time.perf_counter() - t_probe)
    out_info = pylsl.StreamInfo(cfg.name, "Predictions", int(sum(dims)), 1000 / cfg.period_ms, pylsl.cf_float32,
                                f"{cfg.name}-{decoder.reader.session_id}")
    out_info.desc().append_child_value("session", decoder.reader.session_id)
    outlet = pylsl.StreamOutlet(out_info)
    log = _TickLog() if cfg.log else None
    start = pylsl.local_clock()
    next_tick = start + period
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        while True:
            now = pylsl.local_clock()
            if (cfg.duration_s is not None and now - start >= cfg.duration_s) or (stop is not None and stop()):
                break
            due = next_tick + lag
            if warmth.prime_now(now, due):  # the core re-warmed on the newest window; its output is not used
                t, u = ring.window(now, window_lsl)
                decoder.predict([decoder.window(now * cfg.speed, t * cfg.speed, u)])
                continue
            values, stamps = inlet.pull_chunk(timeout=warmth.wait_s(now, due), max_samples=100_000)
            if stamps and info.binned:
                st = np.asarray(stamps, np.float64)
                ends = np.sort(np.concatenate([ends[ends >= st.max() - ring.keep_s], st]))
                t_in, v = counts_to_spikes(st, values, bin_lsl)
                ring.add(t_in, _to_units(mapping, v))
            elif stamps:
                ring.add(np.asarray(stamps, np.float64), _to_units(mapping, np.asarray(values, np.int64).ravel()))
            now = pylsl.local_clock()
            if now < next_tick + lag:
                continue
            behind = int((now - lag - next_tick) // period)  # ticks whose time passed while busy
            stats.skipped += behind
            tick = next_tick + behind * period
            t0 = time.perf_counter()
            cut = tick
            if info.binned:  # whole bins only: the window ends at the newest bin end at or before the tick
                k = int(np.searchsorted(ends, tick, "right"))
                cut = float(ends[k - 1]) if k else tick
            t, u = ring.window(cut, window_lsl)
            w = decoder.window(cut * cfg.speed, t * cfg.speed, u)
            t1 = time.perf_counter()
            pred, (t_tok, t_fwd) = decoder.predict_timed([w])
            row = np.concatenate([p[0] for p in pred.values()])
            t2 = time.perf_counter()
            outlet.push_sample(row.astype(np.float32).tolist(), tick)
            published = pylsl.local_clock()
            stats.ticks += 1
            stats.last_tick = tick
            stats.latency_ms.append((published - tick) * 1000)
            warmth.decoded(t_tok + t_fwd)
            for k, x in zip(("buffer", "tokenize", "forward", "publish"),
                            (t1 - t0, t_tok, t_fwd, time.perf_counter() - t2), strict=True):
                stats.parts_ms[k].append(x * 1000)
            if log is not None:
                log.add(tick, cut, t, u, row)
            next_tick = tick + period
            if on_tick is not None:
                on_tick(stats)
    finally:
        torch.set_num_threads(threads)
        inlet.close_stream()
        if log is not None:
            log.save(cfg.log, cfg.speed, session_units)
    return stats


def load_log(path: str | Path) -> dict:
    """A tick log as {ticks, cuts (where each window ended: the tick, or a count stream's bin end),
    predictions, spikes: [(times, units) per tick], speed}."""
    z = np.load(path)
    edges = np.concatenate([[0], np.cumsum(z["lens"])])
    spikes = [(z["spike_times"][a:b], z["spike_units"][a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return {"ticks": z["ticks"], "cuts": z["cuts"], "predictions": z["predictions"], "spikes": spikes,
            "speed": float(z["speed"])}
