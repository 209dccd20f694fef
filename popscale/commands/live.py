"""Commands for live decoding over Lab Streaming Layer: replay a stored session, serve a model.
Each command's flags sit beside its handler."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.live import Live
from rich.table import Table

from pretrain.run.progress import progress_bar

from .common import console, model_flag, result, say, tracking_flag


def add_replay(sub) -> None:
    s = sub.add_parser("replay", help="play a stored session to LSL in real time (or faster), spikes and behaviour")
    s.add_argument("--corpus", required=True)
    s.add_argument("--session", required=True)
    s.add_argument("--speed", type=float, default=1.0, help="recording seconds per wall second (default 1)")
    s.add_argument("--start", type=float, help="recording time to start at (default: the first spike)")
    s.add_argument("--duration", type=float, help="recording seconds to play (default: to the end)")
    s.add_argument("--behaviour", help="the behaviour on the second stream (default: the session's first)")
    s.add_argument("--name", default="popscale-spikes", help="the spike stream's name (behaviour: NAME-behaviour)")
    s.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a consumer before playing")
    s.add_argument("--bin-ms", type=float, help="send every unit's spike count per bin of this many ms, as a binned rig "
                                               "does (a SpikeCounts stream), instead of one sample per spike")
    s.set_defaults(fn=cmd_replay)


def cmd_replay(a: argparse.Namespace) -> int:
    # deferred: pylsl loads liblsl, which reads its config once (pretrain/live/streams.py)
    from pretrain.live.replay import ReplayConfig, replay

    cfg = ReplayConfig(a.corpus, a.session, speed=a.speed, start_s=a.start, duration_s=a.duration,
                       behaviour=a.behaviour, name=a.name, wait_consumers_s=a.wait, bin_ms=a.bin_ms)
    say(f"replaying {a.session} of {a.corpus} to LSL stream {a.name!r} at {a.speed:g}x"
        + (f", counts per {a.bin_ms:g} ms bin" if a.bin_ms else "") + " (this machine only)")
    with progress_bar("replay (recording s)", None, remaining=False) as bar:
        r = replay(cfg, on_tick=lambda played, n: bar.update(round(played, 1), f"{n:,} spikes"))
    result(spikes=r.spikes, behaviour_samples=r.behaviour_samples, recording_s=f"{r.recording_s:.1f}",
           wall_s=f"{r.wall_s:.1f}", speed=f"{a.speed:g}")
    return 0


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="decode a live LSL spike stream with a model's causal readout, predictions out on LSL")
    model_flag(s)
    s.add_argument("--corpus", required=True, help="the corpus holding --session (its units and behaviour columns)")
    s.add_argument("--session", required=True, help="the session the model was finetuned on, which the stream carries")
    s.add_argument("--stream", default="popscale-spikes", help="the spike stream's LSL name or source id")
    s.add_argument("--period", type=float, default=50.0, help="milliseconds between predictions (default 50)")
    s.add_argument("--speed", type=float, default=1.0, help="recording seconds per second of the stream (replay --speed)")
    s.add_argument("--tolerance", type=float, default=5.0, help="ms a spike may arrive out of order and still be used")
    s.add_argument("--lag", type=float, default=0.0, help="decode each tick this many ms after its time (spikes in transit)")
    s.add_argument("--duration", type=float, help="stop after this many seconds (default: Ctrl-C)")
    s.add_argument("--log", help="an .npz of every tick: its time, the spikes it held, the prediction published")
    s.add_argument("--threads", type=int, default=1, help="torch threads for the model (default 1: lowest latency)")
    s.add_argument("--no-warm", dest="warm", action="store_false",
                   help="let the core sleep until each tick (default: one throw-away forward and no sleeping just "
                        "before each tick: p99 14 against 17 ms here, at one more forward's CPU a tick)")
    s.add_argument("--name", default="popscale-predictions", help="the prediction stream's name")
    s.add_argument("--cache", default="runs/models")
    tracking_flag(s)
    s.set_defaults(fn=cmd_serve)


def _view(stats, period_ms: float) -> Table:
    q = stats.percentiles()
    t = Table(title=f"popscale serve: a prediction every {period_ms:g} ms", show_header=False)
    c = stats.counts
    med = {k: (sorted(v)[len(v) // 2] if v else 0.0) for k, v in stats.parts_ms.items()}
    t.add_row("predictions", f"{stats.ticks:,} published, {stats.skipped:,} ticks skipped (model slower than the period)")
    t.add_row("latency ms", f"p50 {q['p50']:.1f}  p99 {q['p99']:.1f}  max {q['max']:.1f}")
    t.add_row("median ms", "  ".join(f"{k} {v:.2f}" for k, v in med.items()))
    t.add_row("spikes", f"{c.received:,} received, {c.late:,} late, {c.unknown:,} unknown units, {c.restarts} restarts")
    return t


def cmd_serve(a: argparse.Namespace) -> int:
    # deferred: torch, zarr and liblsl load only when used
    from data_service.reader import open_corpus
    from pretrain.decoding.causal import CausalDecoder
    from pretrain.live.serve import ServeConfig, serve

    # deferred with them: models.py loads a model through the registry (MLflow)
    from .models import _load_model

    reader = open_corpus(a.corpus).session(a.session)
    model, tok, path = _load_model(a)  # NAME@ALIAS and models:/ URIs are pulled from the registry
    dec = CausalDecoder(model, tok, reader, a.model)
    if not _causal(path):
        say(f"note: {a.model} was not trained as a causal readout: it learned the window's end as one query among "
            "many; `popscale finetune --causal` trains it for this (runbooks/live.md)")
    cfg = ServeConfig(stream=a.stream, period_ms=a.period, speed=a.speed, tolerance_ms=a.tolerance, lag_ms=a.lag,
                      name=a.name, duration_s=a.duration, log=a.log, threads=a.threads, warm=a.warm)
    say(f"serving {a.model} on {a.session}: waiting for LSL stream {a.stream!r} (this machine only)")
    shown = [0.0]
    with Live(console=console, auto_refresh=False) as live:
        def refresh(stats) -> None:
            if stats.latency_ms and time.monotonic() - shown[0] > 0.5:
                shown[0] = time.monotonic()
                live.update(_view(stats, a.period), refresh=True)

        try:
            stats = serve(dec, cfg, on_tick=refresh)
        except KeyboardInterrupt:
            say("stopped")
            return 0
        live.update(_view(stats, a.period), refresh=True)
    q, c = stats.percentiles(), stats.counts
    result(ticks=stats.ticks, skipped=stats.skipped, p50_ms=f"{q['p50']:.2f}", p99_ms=f"{q['p99']:.2f}",
           max_ms=f"{q['max']:.2f}", received=c.received, late=c.late, unknown=c.unknown, restarts=c.restarts)
    return 0


def _causal(export) -> bool:
    """Whether an exported model was trained as a causal readout (finetune --causal records it)."""
    config = Path(export) / "config.json"
    prov = json.loads(config.read_text()).get("provenance", {}) if config.exists() else {}
    return prov.get("causal_tail_s") is not None


def add_commands(sub) -> None:
    add_replay(sub)
    add_serve(sub)
