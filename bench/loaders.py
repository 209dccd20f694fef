"""The data service's two Ray loaders side by side: the long-lived actor pool (`data.loader=ray`,
data_service/actors.py) against Ray Data datasets (`data.loader=ray-data`, service.RayBatches).

Why: the pool replaced Ray Data as the default after the soak (bench/RESULTS.md, issue 28); this
is the like-for-like throughput behind that choice, away from the soak's dataset boundaries.

What runs: the soak's service (bench/soak.py: its synthetic corpus, the run config's defaults,
global batch 32, the embedded Ray), pulling N batches from a fresh loader of each kind, one actor
each, `data.block_batches` from the config unless --k; the sides alternate (pool, Ray Data, pool,
...) --repeats times in one Ray session, after one warm-up pull of each. Per pull: the start-up
(until the first batch) and batches/s from the first batch to the last, in their own columns.
A pull of N batches is one Ray dataset when N is at most RayBatches' chunk (2,048 blocks).

    python bench/loaders.py [--quick] [--batches N] [--repeats R] [--k K]

ends with `RESULT name=batches_per_s baseline=ray_data ratio=<median pool / median Ray Data>`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from data_service.actors import ActorBatches  # noqa: E402
from data_service.service import RayBatches  # noqa: E402
from pretrain.run.config import load_config  # noqa: E402
from pretrain.run.launch import init_ray  # noqa: E402
from pretrain.run.plan import build_plan  # noqa: E402
from soak import GLOBAL_BATCH, corpus  # noqa: E402

SIDES = {"actor pool (ray)": ActorBatches, "Ray Data (ray-data)": RayBatches}


def pull(make, spec, k: int, n: int) -> tuple[float, float]:
    """(start-up s, batches/s after the first) for n batches from a new loader."""
    t0 = time.perf_counter()
    first = None
    for i, _ in enumerate(make(spec, 0, 1, block_batches=k).iterate(0, n)):
        if i == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 batches a pull, one repeat (~1 min)")
    ap.add_argument("--batches", type=int, help="batches a pull (default 3,000; quick 200)")
    ap.add_argument("--repeats", type=int, help="alternating pairs (default 3; quick 1)")
    ap.add_argument("--k", type=int, help="batches a block (default: the config's data.block_batches)")
    a = ap.parse_args()
    n, repeats = a.batches or (200 if a.quick else 3000), a.repeats or (1 if a.quick else 3)
    warnings.simplefilter("ignore")
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    root = corpus(20, 5.0)
    run = load_config(None, [f"data.corpus={root}", f"data.global_batch={GLOBAL_BATCH}"])
    k = a.k or run.data.block_batches
    spec = build_plan(run).service_spec()
    init_ray(run)
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in SIDES}
    for make in SIDES.values():  # warm-up: imports, the index, Ray Data's own actors
        pull(make, spec, k, min(n, 4 * k))
    for r in range(repeats):
        for name, make in SIDES.items():
            rows[name].append(pull(make, spec, k, n))
            s, rate = rows[name][-1]
            print(f"repeat {r + 1}/{repeats}  {name:20s} start {s:5.1f} s  {rate:7.1f} batches/s", file=sys.stderr,
                  flush=True)
    print(f"\n{n} batches of {GLOBAL_BATCH} windows a pull, {k} batches a block, one actor, {repeats} alternating "
          "pair(s), medians:")
    print("| loader | start-up s | batches/s | windows/s |\n|---|---|---|---|")
    med = {}
    for name, got in rows.items():
        med[name] = [statistics.median(x[i] for x in got) for i in range(2)]
        print(f"| {name} | {med[name][0]:.1f} | {med[name][1]:.1f} | {med[name][1] * GLOBAL_BATCH:.0f} |")
    pool, data = (med[name][1] for name in SIDES)
    print(f"RESULT name=batches_per_s baseline=ray_data ratio={pool / data:.2f}")


if __name__ == "__main__":
    main()
