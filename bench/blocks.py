"""Batches a Ray Data block: the data service at `data.block_batches` = k against one batch a block.

Why: every Ray Data block is a task, an object and a stats record; at one batch a block the service
paid that once a batch, and the soak's memory grew with it. RayBatches now builds k consecutive batches in one actor call, one block; the batches
served are the same (tests/test_pretrain.py).

What runs: the soak's service (bench/soak.py: its synthetic corpus, the run config's defaults,
global batch 32, the embedded Ray), pulling N batches from a fresh RayBatches at each k; the sides
alternate (k=1, k=K, k=1, ...) --repeats times in one Ray session, after one warm-up pull of each.
Per pull: batches/s from the first batch to the last, and the start-up (a new dataset's actor)
in its own column. Memory over time is the soak's figure (bench/soak.py), not this one's.

    python bench/blocks.py [--quick] [--batches N] [--repeats R] [--k K]

ends with `RESULT name=batches_per_s_k<K> baseline=k1 ratio=<median k=K / median k=1>`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from data_service.service import RayBatches  # noqa: E402
from pretrain.run.config import load_config  # noqa: E402
from pretrain.run.launch import init_ray  # noqa: E402
from pretrain.run.plan import build_plan  # noqa: E402
import loaders  # noqa: E402
from soak import GLOBAL_BATCH, corpus  # noqa: E402


def pull(spec, k: int, n: int) -> tuple[float, float]:
    """(start-up s, batches/s after the first) for n batches at k batches a block, a new dataset."""
    return loaders.pull(RayBatches, spec, k, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="48 batches a pull, one repeat (~2 min)")
    ap.add_argument("--batches", type=int, help="batches a pull (default 200; quick 48)")
    ap.add_argument("--repeats", type=int, help="alternating pairs (default 3; quick 1)")
    ap.add_argument("--k", type=int, default=8, help="batches a block on the measured side (default 8, the config's)")
    a = ap.parse_args()
    n, repeats = a.batches or (48 if a.quick else 200), a.repeats or (1 if a.quick else 3)
    warnings.simplefilter("ignore")
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    root = corpus(20, 5.0)
    run = load_config(None, [f"data.corpus={root}", f"data.global_batch={GLOBAL_BATCH}", "data.loader=ray"])
    spec = build_plan(run).service_spec()
    init_ray(run)
    sides = {1: [], a.k: []}
    for k in sides:  # warm-up: actor imports, the index, Ray Data's own actors
        pull(spec, k, min(n, 2 * a.k))
    for r in range(repeats):
        for k in sides:
            sides[k].append(pull(spec, k, n))
            s, rate = sides[k][-1]
            print(f"repeat {r + 1}/{repeats}  k={k:<3d} start {s:5.1f} s  {rate:7.1f} batches/s", file=sys.stderr,
                  flush=True)
    print(f"\n{n} batches of {GLOBAL_BATCH} windows a pull, {repeats} alternating pair(s), medians:")
    print("| batches a block | start-up s | batches/s |\n|---|---|---|")
    med = {}
    for k, rows in sides.items():
        med[k] = [statistics.median(x[i] for x in rows) for i in range(2)]
        print(f"| {k} | {med[k][0]:.1f} | {med[k][1]:.1f} |")
    print(f"RESULT name=batches_per_s_k{a.k} baseline=k1 ratio={med[a.k][1] / med[1][1]:.2f}")


if __name__ == "__main__":
    main()
