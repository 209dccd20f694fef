"""A 64-node x 8-GPU pretraining over 10,000 sessions, on paper: what each node's data service
places, reads, holds and waits for, from the real window index and the real placement rules.

No cluster and no corpus of that size: the corpus description is simulated as in
bench/index_scale.py (its `simulate`: log-normal durations, units and rates with the spread of
real data, splits as data_service/splits.py makes them) and `WindowIndex.from_intervals` builds
the index a data actor builds. Per node (the 8 ranks of node 0, ranks 0-7, as the default
placement puts them; any node alike):

- placement: training workers and data actors per node (each worker's `data.data_actors` on its
  own node: soft node affinity). With the default loader (`--loader ray`, actors.ActorBatches) an
  actor's `data.actor_cpus` is a plain Ray reservation on its node; with `--loader ray-data`
  (service.RayBatches), what Ray Data 2.60's AutoscalingCoordinator grants a pipeline that asks
  CPUs: every node's CPUs split among all live pipelines of the cluster by integer division (the
  reason `data.actor_cpus` is 0);
- reads per 1,000 steps: distinct sessions, shard files and 4,096-element inner chunks over the
  node's 8 ranks together (spike times, unit ids, behaviour; spike density uniform in time), at
  `block_windows` 1 and k = a rank's share, and the chunk reads a second at a few step times;
- data CPU: windows/s a node consumes at those step times against the measured cold cost of a
  window on one core (bench/RESULTS.md, issue 28 ninth stop: 4,790 windows/s at 1,000 sessions,
  209 us, on 2026-12-06's 2-core machine);
- object store: what one worker's pipeline holds (the PackedBatch fields' bytes for the simulated
  spike counts): for the pool, one block of `data.block_batches` batches in progress per actor plus
  the prefetch rounded up to whole blocks (ActorBatches' depth rule); for Ray Data, the prefetched
  and in-flight batches; capped by `data.buffer_mb`;
- start-up: the index's intervals read once (RunPlan.index_intervals, 8 threads) against every
  data actor of every Ray dataset opening every session (before issue 28), with the per-session
  open cost measured here on a small synthetic corpus and an object-storage latency assumed;
  `from_intervals` at 10,000 sessions measured; how often a worker's actors start (once a stream
  for the pool, once a 2,048-block dataset for Ray Data).

    python bench/cluster_scale.py [--quick] [--sessions 10000] [--per-rank 8] [--cpus-per-node 96] [--loader ray|ray-data]

--quick: 300 steps instead of 1,000 (~10 s). Ends with `RESULT name=node_chunk_reads_per_1000_steps
baseline=block_windows_1 ratio=<k=1 over k=share>`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_scale import BEHAVIOUR_HZ, CHUNK, SHARD, WINDOW_S, simulate  # noqa: E402

from data_service.window_index import IndexConfig, WindowIndex  # noqa: E402

NODES, GPUS = 64, 8
COLD_US = 1e6 / 4790  # one window, cold, one core: bench/service.py at 1,000 sessions (bench/RESULTS.md, issue 28 ninth stop)
STEP_S = (0.1, 0.25, 0.5)  # GPU step times the demand is shown at (none measured here: no GPU)
BYTES = {"spikes/timestamps": 8, "spikes/unit_index": 2, "behaviour": 8}  # raw bytes an element (2-d float32)
TOKEN_B, OUTPUT_B, LATENT_B = 20, 32, 12  # PackedBatch: unit_index i8 + time f4 + type i8; outputs; latents
LATENTS = 128  # poyo presets: 16 latents a 0.125 s step over 1 s
REQUESTS_PER_SESSION = 4  # group metadata, interval array metadata, shard index, chunk
REQUEST_MS = 30.0  # one object-storage GET's latency, assumed


def node_reads(idx: WindowIndex, m, steps: range, per_rank: int, node: int = 0) -> dict:
    """Distinct sessions, shard files and inner chunks per array the node's 8 ranks read."""
    pos = {s: i for i, s in enumerate(idx.session_ids)}
    sess, t = [], []
    for rank in range(node * GPUS, (node + 1) * GPUS):
        for step in steps:
            for w in idx.worker_windows(step, NODES * GPUS * per_rank, rank, NODES * GPUS):
                sess.append(pos[w.session])
                t.append(w.t_start)
    sess, t = np.array(sess), np.array(t)
    r = m.spike_rate[sess]
    spans = {"spikes/timestamps": (r * t, r * (t + WINDOW_S)), "spikes/unit_index": (r * t, r * (t + WINDOW_S)),
             "behaviour": (BEHAVIOUR_HZ * t, BEHAVIOUR_HZ * (t + WINDOW_S))}
    out = {"sessions": len(np.unique(sess)), "windows": len(sess), "files": 0, "chunks": {}}
    for array, (a, b) in spans.items():
        lo = np.floor(a).astype(np.int64)
        hi = np.maximum(np.ceil(b).astype(np.int64) - 1, lo)
        for unit, key in ((SHARD, "files"), (CHUNK, "chunks")):
            c0, c1 = lo // unit, hi // unit
            n = c1 - c0 + 1
            s = np.repeat(sess, n).astype(np.int64)
            c = np.repeat(c0, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
            count = len(np.unique(s * (1 << 32) + c))
            if key == "files":
                out["files"] += count
            else:
                out["chunks"][array] = count
    return out


def open_cost_ms() -> float:
    """Milliseconds to read one session's split intervals (open the session, read its interval
    array) on this machine's disk: a small synthetic corpus, best of 3, sequential."""
    from data_service.reader import open_corpus
    from data_service.synth import SynthConfig, synth_corpus

    with tempfile.TemporaryDirectory() as d:
        synth_corpus(SynthConfig(sessions=6, subjects=2, minutes=0.5, min_units=10, max_units=20), Path(d) / "c",
                     workers=1)
        best = float("inf")
        for _ in range(3):
            from data_service import reader

            reader._open.clear()
            corpus = open_corpus(Path(d) / "c")
            t0 = time.perf_counter()
            WindowIndex.split_intervals(corpus, IndexConfig(), threads=1)
            best = min(best, (time.perf_counter() - t0) / len(corpus.session_ids))
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 steps (~10 s)")
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--steps", type=int, help="steps per node read count (default 1,000; quick 300)")
    ap.add_argument("--per-rank", type=int, default=8, help="windows a rank per step")
    ap.add_argument("--cpus-per-node", type=int, default=96, help="logical CPUs of an 8-GPU node (96: p4d/p5-class)")
    ap.add_argument("--data-actors", type=int, default=1)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--buffer-mb", type=float, default=256)
    ap.add_argument("--block-batches", type=int, default=8)
    ap.add_argument("--actor-cpus", type=float, default=0.0)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--loader", choices=("ray", "ray-data"), default="ray", help="data.loader (default: ray, the pool)")
    a = ap.parse_args()
    n_steps = a.steps or (300 if a.quick else 1000)
    steps = range(5000, 5000 + n_steps)
    world, per_rank = NODES * GPUS, a.per_rank

    m = simulate(a.sessions)
    t0 = time.perf_counter()
    idx1 = WindowIndex.from_intervals(m.train, m.fingerprint, IndexConfig(window_s=WINDOW_S))
    build_s = time.perf_counter() - t0
    idxk = WindowIndex.from_intervals(m.train, m.fingerprint, IndexConfig(window_s=WINDOW_S, block_windows=per_rank))
    weights = np.array([float((v[:, 1] - v[:, 0]).sum()) for v in m.train.values()])
    spikes_per_window = float((m.spike_rate * weights).sum() / weights.sum()) * WINDOW_S

    print(f"{NODES} nodes x {GPUS} GPUs = {world} ranks, {len(m.ids):,} sessions "
          f"({m.duration_s.sum() / 3600:,.0f} h), {per_rank} windows a rank a step (global batch {world * per_rank:,}); "
          f"{spikes_per_window:,.0f} spikes in a mean window (weighted by train time)")

    # ---- placement --------------------------------------------------------------------------------
    print(f"\n## Placement per node (data.loader={a.loader})")
    print(f"- training workers: {GPUS}; data actors: {GPUS * a.data_actors} ({a.data_actors} a worker, on its node)")
    if a.loader == "ray":
        asked = GPUS * (a.cpus_per_worker + a.data_actors * a.actor_cpus)
        print(f"- each data actor is a plain Ray actor asking data.actor_cpus = {a.actor_cpus:g} CPU: a node's {GPUS} "
              f"workers ({a.cpus_per_worker:g} CPU each) and their actors reserve {asked:g} of its {a.cpus_per_node} CPUs "
              f"({'fits' if asked <= a.cpus_per_node else 'does NOT fit: actors wait for room'}); no coordinator "
              f"divides CPUs among pipelines")
    else:
        pipelines = world  # one Ray Data pipeline (dataset) per training worker
        share = a.cpus_per_node // pipelines
        print(f"- Ray Data's coordinator gives a pipeline {a.cpus_per_node} CPUs // {pipelines} pipelines = {share} "
              f"CPU(s) of each node: a pipeline whose actors ask CPUs {'never starts' if share == 0 else 'starts'} "
              f"(data.actor_cpus > 0); with data.actor_cpus = 0 (default) the actors ask none and data.data_actors "
              f"bounds them. After a restart, dead pipelines keep their claim for 180 s.")

    # ---- reads ----------------------------------------------------------------------------------------
    print(f"\n## Reads of one node's 8 ranks per {n_steps:,} steps (steps {steps.start}..{steps.stop - 1})")
    print("| block_windows | windows | sessions | shard files | inner chunks (times / units / behaviour) | "
          "chunk reads a window | MB read (raw) |")
    print("|---|---|---|---|---|---|---|")
    res = {}
    for k, idx in ((1, idx1), (per_rank, idxk)):
        r = node_reads(idx, m, steps, per_rank)
        mb = sum(r["chunks"][arr] * CHUNK * BYTES[arr] for arr in BYTES) / 1e6
        total = sum(r["chunks"].values())
        res[k] = (r, total, mb)
        c = r["chunks"]
        print(f"| {k} | {r['windows']:,} | {r['sessions']:,} | {r['files']:,} | {total:,} ({c['spikes/timestamps']:,} / "
              f"{c['spikes/unit_index']:,} / {c['behaviour']:,}) | {total / r['windows']:.2f} | {mb:,.0f} |")

    # ---- demand ---------------------------------------------------------------------------------------
    batch_mb = per_rank * (spikes_per_window * TOKEN_B + BEHAVIOUR_HZ * WINDOW_S * OUTPUT_B + LATENTS * LATENT_B) / 1e6
    if a.loader == "ray":  # ActorBatches: one block a call per actor, plus the prefetch in whole blocks
        held = (a.data_actors + -(-a.prefetch // a.block_batches)) * a.block_batches
        how = (f"{a.data_actors} block(s) in progress + {-(-a.prefetch // a.block_batches)} prefetched, "
               f"{a.block_batches} batches a block = {held} batches")
    else:
        held = a.prefetch + a.data_actors
        how = f"{a.prefetch} prefetched + {a.data_actors} in flight"
    held_mb = min(a.buffer_mb, held * batch_mb)
    print("\n## Demand per node")
    print("| GPU step | windows/s | data cores (cold) | chunk GETs/s, k=1 | k=share | MB/s read (raw), k=1 | "
          "cluster chunk GETs/s, k=1 |")
    print("|---|---|---|---|---|---|---|")
    for step_s in STEP_S:
        wps = GPUS * per_rank / step_s
        per_s = 1.0 / (n_steps * step_s)
        print(f"| {step_s:g} s | {wps:,.0f} | {wps * COLD_US / 1e6:.2f} | {res[1][1] * per_s:,.0f} | "
              f"{res[per_rank][1] * per_s:,.0f} | {res[1][2] * per_s:,.1f} | {res[1][1] * per_s * NODES:,.0f} |")
    print(f"- object store: a packed batch of {per_rank} windows is {batch_mb:.2f} MB; a worker's pipeline holds up to "
          f"{how} = {held_mb:.1f} MB (cap data.buffer_mb {a.buffer_mb:g}); {GPUS} pipelines: {GPUS * held_mb:.0f} MB a node")
    print(f"- one data actor builds ~{1e6 / COLD_US:,.0f} windows/s cold on a core: a node's {GPUS * a.data_actors} "
          f"actors are busy {GPUS * per_rank / STEP_S[0] * COLD_US / 1e6 / (GPUS * a.data_actors):.0%} of the time at a "
          f"{STEP_S[0]:g} s step")

    # ---- start-up -------------------------------------------------------------------------------------
    ms = open_cost_ms()
    n = len(m.ids)
    remote_s = n * REQUESTS_PER_SESSION * REQUEST_MS / 1e3
    print("\n## Start-up")
    starts = ("once a stream (the pool's actors live until the stream ends or a restart)" if a.loader == "ray"
              else f"a new actor each Ray dataset of 2,048 blocks ({2048 * a.block_batches:,} batches)")
    print(f"- WindowIndex.from_intervals over {n:,} sessions ({len(idx1.row_len):,} rows): {build_s:.2f} s, in every "
          f"data actor, {starts}")
    print(f"- reading every session's intervals: {ms:.1f} ms a session on this disk -> {n * ms / 1e3:,.0f} s for "
          f"{n:,}; on object storage (~{REQUESTS_PER_SESSION} GETs of ~{REQUEST_MS:g} ms) {remote_s / 60:,.0f} min "
          f"sequential, {remote_s / 8 / 60:,.1f} min on 8 threads")
    print(f"- now: the driver reads them once (8 threads) and hands them to every worker and actor: "
          f"{n * REQUESTS_PER_SESSION:,} GETs a run. Before (issue 28), at every 2,048-batch dataset boundary "
          f"every new data actor opened every session: {world * n * REQUESTS_PER_SESSION:,} GETs cluster-wide and "
          f"a stall of {n * ms / 1e3:,.0f} s (disk) / {remote_s / 60:,.0f} min (object storage) in every pipeline "
          f"(its prefetch holds {a.prefetch} batches)")
    r1, rk = res[1][1], res[per_rank][1]
    print(f"RESULT name=node_chunk_reads_per_1000_steps value={r1 * 1000 / n_steps:,.0f} baseline=block_windows_1 "
          f"ratio={r1 / rk:.2f}")


if __name__ == "__main__":
    main()
