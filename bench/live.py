"""Live decoding latency: a session replayed to LSL at 1x, `serve` decoding it, tick to prediction.

What runs: `popscale replay` in its own process (the rig) plays --seconds of a session the model
knows over LSL on loopback; in this process `pretrain.live.serve.serve` decodes it every --period
ms with the causal readout. Per tick: latency from the tick's time to its prediction published on
LSL, and its parts (buffer: cutting the window from the ring; tokenize; forward; publish). Sides,
alternated --repeats times: the model at 1 torch thread kept warm between ticks (serve's default),
the same not kept warm (the baseline: the core sleeps until each tick), at 2 threads (torch's default
on this machine), and "as fast as it goes" (a 1 ms period at 1 thread: back-to-back decoding, whose
tick rate is the server's capacity). Default: models/poyo-real-1 (poyo-1.3M) on mihi_demo-tr
(174 units), from the real corpus the release was pretrained from (runs/real/corpus).

Goal (issue 29): p99 <= 10 ms at a 50 ms period on this CPU.

    python bench/live.py [--quick] [--seconds 30] [--repeats 2] [--period 50] [--model DIR] [--session S]

ends with `RESULT name=live_p99_ms value=<p99 at 1 thread, ms> baseline=goal_10ms ratio=<p99 / 10>`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_service.reader import open_corpus  # noqa: E402
from pretrain.decoding.causal import CausalDecoder  # noqa: E402
from pretrain.live.serve import ServeConfig, serve  # noqa: E402
from pretrain.tracking.export import load_exported  # noqa: E402

GOAL_MS = 10.0


def one(dec, corpus: str, session: str, seconds: float, start: float, period_ms: float, threads: int, tag: str,
        warm: bool = True) -> dict:
    """Replay `seconds` from `start` in a subprocess and serve it; the serve's figures."""
    name = f"bench-live-{tag}"
    rig = subprocess.Popen([sys.executable, "-m", "popscale.cli", "replay", "--corpus", corpus, "--session", session,
                            "--start", str(start), "--duration", str(seconds), "--name", name, "--wait", "60"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stats = serve(dec, ServeConfig(stream=name, period_ms=period_ms, threads=threads, name=f"{name}-pred", warm=warm),
                      stop=lambda: rig.poll() is not None)
    finally:
        rig.wait(timeout=120)
    q = stats.percentiles()
    parts = {k: float(np.median(v)) if v else 0.0 for k, v in stats.parts_ms.items()}
    return {"ticks": stats.ticks, "skipped": stats.skipped, **q, **parts, "received": stats.counts.received,
            "late": stats.counts.late, "rate": stats.ticks / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 s a side, one repeat (~1 min)")
    ap.add_argument("--seconds", type=float, help="recording seconds a side (default 30; quick 8)")
    ap.add_argument("--repeats", type=int, help="alternations of the sides (default 2; quick 1)")
    ap.add_argument("--period", type=float, default=50.0, help="ms between predictions (default 50)")
    ap.add_argument("--model", default=str(ROOT / "models" / "poyo-real-1"))
    ap.add_argument("--corpus", default=str(ROOT / "runs" / "real" / "corpus"))
    ap.add_argument("--session", default="mihi_demo-tr")
    a = ap.parse_args()
    seconds, repeats = a.seconds or (8.0 if a.quick else 30.0), a.repeats or (1 if a.quick else 2)
    if not Path(a.corpus).is_dir():
        raise SystemExit(f"no corpus at {a.corpus}: make it with scripts/release.sh's ingest, or pass --corpus")
    reader = open_corpus(a.corpus).session(a.session)
    model, tok = load_exported(a.model)
    dec = CausalDecoder(model, tok, reader, a.model)
    t0 = float(reader.domain[0, 0]) + 5.0
    span = float(reader.domain[-1, 1]) - t0 - seconds  # the starts a whole side fits after
    if span <= 0:
        raise SystemExit(f"{a.session} is shorter than {seconds + 5:g} s: pass a smaller --seconds")
    sides = {f"{a.period:g} ms, 1 thread": (a.period, 1, True),
             f"{a.period:g} ms, 1 thread, not kept warm": (a.period, 1, False),
             f"{a.period:g} ms, 2 threads": (a.period, 2, True),
             "as fast as it goes (1 ms), 1 thread": (1.0, 1, True)}
    rows: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(repeats):
        for i, (label, (period, threads, warm)) in enumerate(sides.items()):
            # a fresh stretch of the session each time, wrapping round before its end (replay stops there)
            start = t0 + ((r * len(sides) + i) * seconds) % max(span, seconds)
            rows[label].append(one(dec, a.corpus, a.session, seconds, start, period, threads, f"{r}-{i}", warm))
            x = rows[label][-1]
            print(f"repeat {r + 1}/{repeats}  {label:38s} p50 {x['p50']:6.1f}  p99 {x['p99']:6.1f}  max {x['max']:6.1f} ms"
                  f"  {x['ticks']} ticks ({x['skipped']} skipped)", file=sys.stderr, flush=True)
    print(f"\n{a.model} on {a.session} ({len(reader.unit_ids)} units), {seconds:g} s replayed at 1x a side, "
          f"{repeats} alternation(s); medians over repeats:\n")
    print("| side | predictions/s | skipped | p50 ms | p99 ms | max ms | buffer | tokenize | forward | publish |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    med = {}
    for label, xs in rows.items():
        m = {k: statistics.median(x[k] for x in xs) for k in xs[0]}
        med[label] = m
        print(f"| {label} | {m['rate']:.1f} | {m['skipped']:.0f} | {m['p50']:.1f} | {m['p99']:.1f} | {m['max']:.1f} | "
              f"{m['buffer']:.2f} | {m['tokenize']:.2f} | {m['forward']:.1f} | {m['publish']:.2f} |")
    p99 = med[next(iter(sides))]["p99"]
    print(f"RESULT name=live_p99_ms value={p99:.2f} baseline=goal_10ms ratio={p99 / GOAL_MS:.2f}")


if __name__ == "__main__":
    main()
