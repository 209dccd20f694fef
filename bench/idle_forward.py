"""A forward after a sleep against one back to back: why `popscale serve` keeps its core warm.

One process, one torch thread, the same windows (the causal decoder's, every 50 ms of a session)
decoded by the same model in each mode, the modes interleaved --repeats times:
- back-to-back: one forward after another (the baseline: every cache warm, the core awake);
- sleep: 40 ms of sleep before each forward (a 50 ms period with nothing to do in between);
- sleep + spin N: the last N ms of the sleep spent spinning instead;
- sleep + prime: a throw-away forward on the previous window 10 ms before (what serve does).

    python bench/idle_forward.py [--quick] [--windows 100] [--repeats 3] [--model DIR] [--corpus C] [--session S]

ends with `RESULT name=forward_after_sleep_ms value=<median> baseline=back_to_back ratio=<sleep / back-to-back>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_service.reader import open_corpus  # noqa: E402
from pretrain.decoding.causal import CausalDecoder  # noqa: E402
from pretrain.tracking.export import load_exported  # noqa: E402


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run(model, batches: list, mode: str) -> np.ndarray:
    """Milliseconds of each forward in `mode`."""
    took = []
    with torch.inference_mode():
        for i, b in enumerate(batches):
            if mode == "sleep":
                time.sleep(0.040)
            elif mode.startswith("sleep + spin"):
                ms = float(mode.split()[-1])
                time.sleep(0.040 - ms / 1000)
                spin(ms / 1000)
            elif mode == "sleep + prime":
                time.sleep(0.030)
                model(batches[i - 1])
            t = time.perf_counter()
            model(b)
            took.append(time.perf_counter() - t)
    return np.asarray(took) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="30 windows, one repeat")
    ap.add_argument("--windows", type=int, help="windows a mode (default 100; quick 30)")
    ap.add_argument("--repeats", type=int, help="interleaved rounds of every mode (default 3; quick 1)")
    ap.add_argument("--model", default=str(ROOT / "models" / "poyo-real-1"))
    ap.add_argument("--corpus", default=str(ROOT / "runs" / "real" / "corpus"))
    ap.add_argument("--session", default="mihi_demo-tr")
    a = ap.parse_args()
    n, repeats = a.windows or (30 if a.quick else 100), a.repeats or (1 if a.quick else 3)
    if not Path(a.corpus).is_dir():
        raise SystemExit(f"no corpus at {a.corpus}: make it with the model card's commands, or pass --corpus")
    torch.set_num_threads(1)
    reader = open_corpus(a.corpus).session(a.session)
    model, tok = load_exported(a.model)
    dec = CausalDecoder(model, tok, reader, a.model)
    times, units = reader.spikes()
    ticks = float(reader.domain[0, 0]) + 2.0 + 0.05 * np.arange(n)
    batches = [dec.tok.pack([(dec.window(float(t), times, units), reader, None)]).to("cpu") for t in ticks]
    modes = ["back-to-back", "sleep", "sleep + spin 5", "sleep + spin 15", "sleep + prime"]
    got: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    for r in range(repeats):
        for m in modes:
            got[m].append(run(model, batches, m))
    print(f"{a.model} on {a.session}: {n} windows a mode, {repeats} interleaved round(s), one thread\n")
    print("| mode | median ms | p90 ms | p99 ms | medians of the rounds |")
    print("|---|---|---|---|---|")
    med = {}
    for m in modes:
        x = np.concatenate(got[m])
        med[m] = float(np.median(x))
        print(f"| {m} | {med[m]:.2f} | {np.percentile(x, 90):.2f} | {np.percentile(x, 99):.2f} | "
              + ", ".join(f"{np.median(v):.2f}" for v in got[m]) + " |")
    print(f"RESULT name=forward_after_sleep_ms value={med['sleep']:.2f} baseline=back_to_back "
          f"ratio={med['sleep'] / med['back-to-back']:.2f}")


if __name__ == "__main__":
    main()
