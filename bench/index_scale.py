"""The window index at 10,000 sessions, by simulation: build cost, per-rank slicing at 512 ranks,
and the shards and chunks each rank touches (cache locality) with and without blocked orders.

No corpus and no cluster: a corpus *description* is simulated and `WindowIndex.from_intervals`
builds the real index over it (the code a training worker runs; only the Zarr reads are not).

The simulated manifest (seed 0), with the spread of real data (/work/shared/notes/poyo-reference.md:
~100 h, 158 sessions, 27k units, i.e. ~0.6 h and ~170 units a session):
- 10,000 sessions: duration log-normal (median 0.5 h, sigma 0.6: mean ~0.6 h, clipped to 5 min..4 h),
  units log-normal (median 150, sigma 0.5: mean ~170, 10..1000), mean firing rate per unit
  log-normal (median 8 Hz, sigma 0.6: mean ~10 Hz); spikes of a session at a constant rate
  (units x rate), behaviour at 100 Hz;
- splits as data_service/splits.py makes them: 30 % held out (valid + test) in blocks of
  duration/30 (5..60 s), 1 s gaps; train = the rest, ~13 intervals a session (~130k rows).
- also (not with --quick, or with `--trials`) built over each train interval cut into 8 s trials
  with 0.5 s gaps (~1.7M rows, a trial-structured corpus): build time and memory only.

What is measured:
- build: `WindowIndex.from_intervals` wall time (best of 3) and its peak traced memory
  (tracemalloc), and what it holds once its cache of 4 epochs' per-row arrays is full;
- slicing: a global batch of 4,096 windows = 64 nodes x 8 workers (512 ranks) x 8 windows a rank
  (the reference recipe's per-GPU batch is 128 at 8 GPUs; a rank's batch of 8 is the small end,
  where per-rank locality is worst); microseconds per `worker_windows(step, 4096, rank, 512)`,
  the call each data actor makes per step, and per whole global batch (`windows(b*4096, 4096)`);
- locality: for sampled ranks, steps 0..999 (`--steps`): distinct shard files and distinct
  4,096-element inner chunks touched. A window [t, t+1 s) of a session with spike rate r (spikes/s)
  covers spike elements [r t, r (t+1)) of spikes/timestamps and spikes/unit_index (one shard =
  2^22 elements, one inner chunk = 4,096), and behaviour samples [100 t, 100 (t+1)) of the
  behaviour values (timestamps are on a grid: computed, not read). Files = (session, array,
  shard) triples; chunks likewise. Spike density is modelled as uniform in time (real spikes
  burst; chunk counts are then a little optimistic for any block size alike);
- randomness: `block_windows` = k moves whole blocks of k adjacent windows, so a global batch of B
  windows holds ~B/k blocks. The measure is the effective number of sessions per global batch,
  1 / sum_s p_s^2 (p_s = the share of the batch's windows from session s): if each session adds
  a random offset of variance v to the per-window gradient, the batch mean carries v * sum p_s^2
  of it, i.e. the batch averages session effects like that many equally represented sessions.
  Distinct sessions per batch and per rank-step alongside. Windows in a block are also adjacent
  in time (k seconds of one recording), which no per-session figure shows.

Blocks larger than a rank's share (B/W = 8 here) do not help one rank: its 8 positions of a step
lie inside one block either way, and its next step is another block; they only cost randomness.
The RESULT ratio is distinct shard files per rank per 1,000 steps at k = 1 (the default) over
the best k (the smallest k within 2 % of the fewest files).

    python bench/index_scale.py [--quick] [--sessions 10000] [--steps 1000] [--ranks 16] [--trials]

--quick: 10,000 sessions, 1,000 steps (5,000..5,999, in epoch 1), 2 ranks, k in 1, 4, 8, 16, 64
(~5 s on one core); the default: 16 ranks, 40 global batches and the 1.7M-row trial build (~25 s,
0.4 GB peak RSS).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_service.format import DEFAULT_CHUNKING  # noqa: E402
from data_service.window_index import IndexConfig, WindowIndex  # noqa: E402

NODES, WORKERS_PER_NODE = 64, 8
WORLD = NODES * WORKERS_PER_NODE
BEHAVIOUR_HZ = 100.0
WINDOW_S = 1.0
CHUNK, SHARD = DEFAULT_CHUNKING.chunk, DEFAULT_CHUNKING.shard


@dataclass
class Manifest:
    """What the index needs of a corpus (ids, train intervals, fingerprint) plus spike rates."""

    ids: list[str]
    train: dict[str, np.ndarray]
    duration_s: np.ndarray
    spike_rate: np.ndarray  # spikes/s of each session (all units)
    fingerprint: str

    @property
    def rows(self) -> int:
        return sum(len(v) for v in self.train.values())


def simulate(n: int, seed: int = 0) -> Manifest:
    rng = np.random.default_rng(seed)
    dur = np.clip(rng.lognormal(np.log(0.5 * 3600), 0.6, n), 300.0, 4 * 3600.0)
    units = np.clip(np.round(rng.lognormal(np.log(150), 0.5, n)), 10, 1000)
    rate = units * rng.lognormal(np.log(8.0), 0.6, n)
    ids = [f"subject{i % 400:03d}/session{i:05d}" for i in range(n)]
    gap, held = 1.0, 0.3
    train = {}
    for i, sid in enumerate(ids):
        d = dur[i]
        block = float(np.clip(d / 30, 5.0, 60.0))
        m = max(1, int(round(held * d / block)))
        free = d - m * (block + 2 * gap)
        s = np.sort(rng.uniform(0.0, free, m)) + np.arange(m) * (block + 2 * gap) + gap  # held-out starts
        lo = np.concatenate([[0.0], s + block + gap])
        hi = np.concatenate([s - gap, [d]])
        keep = hi - lo >= WINDOW_S
        train[sid] = np.stack([lo[keep], hi[keep]], axis=1)
    fp = hashlib.sha256(f"sim:{n}:{seed}".encode()).hexdigest()[:16]
    return Manifest(ids, train, dur, rate, fp)


def as_trials(m: Manifest, trial_s: float = 8.0, gap: float = 0.5) -> dict[str, np.ndarray]:
    """Each train interval cut into trials of `trial_s` with `gap` between them."""
    out = {}
    for sid, iv in m.train.items():
        parts = []
        for a, b in iv:
            starts = np.arange(a, b - trial_s + 1e-9, trial_s + gap)
            parts.append(np.stack([starts, starts + trial_s], axis=1))
        out[sid] = np.concatenate(parts) if parts else np.zeros((0, 2))
    return out


def build(intervals: dict, fp: str, cfg: IndexConfig, repeat: int = 3) -> tuple[WindowIndex, float, float]:
    """(index, best build seconds, peak traced MB)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        idx = WindowIndex.from_intervals(intervals, fp, cfg)
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    WindowIndex.from_intervals(intervals, fp, cfg)
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return idx, best, peak


def held_mb(idx: WindowIndex) -> float:
    """What the index holds with its cache full (4 epochs' counts, jitter offsets and base counts)."""
    for e in range(4):
        idx.epoch_size(e)
    arrays = [idx.row_session, idx.row_start, idx.row_len, idx.row_weight]
    arrays += [a for e in idx._epochs.values() for a in e[:3]]
    return sum(a.nbytes for a in arrays) / 1e6


def touched(sess: np.ndarray, t: np.ndarray, m: Manifest) -> tuple[int, int]:
    """(distinct shard files, distinct inner chunks) that windows (session index, start) read."""
    files, chunks = set(), set()
    r = m.spike_rate[sess]
    lo = np.floor(r * t).astype(np.int64)
    hi = np.maximum(np.ceil(r * (t + WINDOW_S)).astype(np.int64) - 1, lo)
    blo = np.floor(BEHAVIOUR_HZ * t).astype(np.int64)
    bhi = np.maximum(np.ceil(BEHAVIOUR_HZ * (t + WINDOW_S)).astype(np.int64) - 1, blo)
    for array, a, b, copies in (("spikes", lo, hi, 2), ("behaviour", blo, bhi, 1)):
        for unit, into in ((SHARD, files), (CHUNK, chunks)):
            c0, c1 = a // unit, b // unit
            n = (c1 - c0 + 1)
            s = np.repeat(sess, n)
            c = np.repeat(c0, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
            keys = np.unique(s.astype(np.int64) * (1 << 32) + c)
            into.update((array, j, int(k)) for j in range(copies) for k in keys)
    return len(files), len(chunks)


def locality(idx: WindowIndex, m: Manifest, ranks: list[int], steps: range, batch: int) -> dict:
    pos = {s: i for i, s in enumerate(idx.session_ids)}
    files, chunks, sessions, per_step, us = [], [], [], [], []
    for rank in ranks:
        s_all, t_all = [], []
        t0 = time.perf_counter()
        refs = [idx.worker_windows(step, batch, rank, WORLD) for step in steps]
        us.append((time.perf_counter() - t0) / len(steps) * 1e6)
        for step_refs in refs:
            s = [pos[w.session] for w in step_refs]
            per_step.append(len(set(s)))
            s_all += s
            t_all += [w.t_start for w in step_refs]
        sess, t = np.array(s_all), np.array(t_all)
        f, c = touched(sess, t, m)
        files.append(f)
        chunks.append(c)
        sessions.append(len(np.unique(sess)))
    return dict(files=float(np.mean(files)), chunks=float(np.mean(chunks)), sessions=float(np.mean(sessions)),
                per_step=float(np.mean(per_step)), us=float(np.median(us)))


def diversity(idx: WindowIndex, steps: range, batch: int) -> dict:
    pos = {s: i for i, s in enumerate(idx.session_ids)}
    distinct, eff, us = [], [], []
    for b in steps:
        t0 = time.perf_counter()
        refs = idx.windows(b * batch, batch)
        us.append(time.perf_counter() - t0)
        _, counts = np.unique([pos[w.session] for w in refs], return_counts=True)
        p = counts / counts.sum()
        distinct.append(len(counts))
        eff.append(1.0 / float((p * p).sum()))
    return dict(distinct=float(np.mean(distinct)), effective=float(np.mean(eff)), batch_ms=float(np.median(us)) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 ranks, no trial build (~5 s)")
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--first-step", type=int, default=5000, help="where the 1,000 steps start (5000: in epoch 1 "
                    "at 10,000 sessions, past an epoch boundary)")
    ap.add_argument("--per-rank", type=int, default=8, help="windows a rank per step (global batch = 512 x this)")
    ap.add_argument("--ranks", type=int, help="ranks sampled for locality (spread over the 512)")
    ap.add_argument("--blocks", default="1,4,8,16,64", help="block sizes k to compare (1 = the default order)")
    ap.add_argument("--trials", action="store_true", help="also build over ~8 s trials (default unless --quick)")
    a = ap.parse_args()
    n_ranks = a.ranks or (2 if a.quick else 16)
    ranks = sorted({int(r) for r in np.linspace(0, WORLD - 1, n_ranks)})
    blocks = [int(k) for k in a.blocks.split(",")]
    batches = 10 if a.quick else 40
    per_rank = a.per_rank
    batch = WORLD * per_rank
    steps = range(a.first_step, a.first_step + a.steps)

    t0 = time.perf_counter()
    m = simulate(a.sessions)
    sim_s = time.perf_counter() - t0
    hours = m.duration_s.sum() / 3600
    train_h = sum(float((v[:, 1] - v[:, 0]).sum()) for v in m.train.values()) / 3600
    print(f"simulated manifest: {len(m.ids)} sessions, {hours:.0f} h ({hours / len(m.ids):.2f} h a session, "
          f"{np.percentile(m.duration_s, 5) / 3600:.2f}-{np.percentile(m.duration_s, 95) / 3600:.2f} h 5-95 %), "
          f"{train_h:.0f} h train in {m.rows} intervals; spikes/s a session median {np.median(m.spike_rate):.0f} "
          f"(5-95 %: {np.percentile(m.spike_rate, 5):.0f}-{np.percentile(m.spike_rate, 95):.0f}); "
          f"sessions over one spike shard (2^22): {(m.spike_rate * m.duration_s > SHARD).mean():.1%} "
          f"({sim_s:.1f} s to simulate)")
    print(f"ranks: {NODES} nodes x {WORKERS_PER_NODE} workers = {WORLD}; global batch {batch} windows "
          f"({per_rank} a rank) of {WINDOW_S:g} s; locality over steps {steps.start}..{steps.stop - 1} of ranks {ranks}; "
          f"batch diversity over steps {steps.start}..{steps.start + batches - 1}")

    print("\n| index | rows | windows/epoch | build s (best of 3) | peak traced MB (build) | held MB (4 epochs cached) |")
    print("|---|---|---|---|---|---|")
    builds = [("train intervals", m.train)]
    if a.trials or not a.quick:
        builds.append(("8 s trials", as_trials(m)))
    for name, ivs in reversed(builds):  # (the train-interval index, built last, stays `idx`)
        idx, secs, peak = build(ivs, m.fingerprint, IndexConfig(window_s=WINDOW_S))
        rows = len(idx.row_len)
        print(f"| {name} | {rows:,} | {idx.epoch_size(0):,} | {secs:.3f} | {peak:.1f} | {held_mb(idx):.1f} |", flush=True)

    ends = idx.windows(steps.start * batch, 1) + idx.windows(steps.stop * batch - 1, 1)
    print(f"\nsteps {steps.start}..{steps.stop - 1} lie in epoch(s) {ends[0].epoch}..{ends[1].epoch} "
          f"({idx.epoch_size(0) / batch:.0f} steps an epoch)")
    print("\n| block_windows k | shard files / rank / 1k steps | inner chunks / rank / 1k steps | sessions / rank / "
          "1k steps | sessions / rank-step | sessions / global batch | effective sessions / global batch | "
          "us / worker_windows | ms / global batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    res = {}
    for k in blocks:
        idx = WindowIndex.from_intervals(m.train, m.fingerprint, IndexConfig(window_s=WINDOW_S, block_windows=k))
        loc, div = locality(idx, m, ranks, steps, batch), diversity(idx, steps[:batches], batch)
        res[k] = (loc, div)
        print(f"| {k} | {loc['files']:,.0f} | {loc['chunks']:,.0f} | {loc['sessions']:,.0f} | {loc['per_step']:.2f} | "
              f"{div['distinct']:,.0f} | {div['effective']:,.0f} | {loc['us']:.0f} | {div['batch_ms']:.1f} |", flush=True)

    base = res[blocks[0]][0]["files"]
    fewest = min(r[0]["files"] for r in res.values())
    best = min(k for k, r in res.items() if r[0]["files"] <= 1.02 * fewest)
    loc, div = res[best]
    print(f"\nk = {best}: {base / loc['files']:.1f}x fewer shard files and "
          f"{res[blocks[0]][0]['chunks'] / loc['chunks']:.1f}x fewer inner chunks per rank per {a.steps} steps than "
          f"k = {blocks[0]}, at {div['effective']:.0f} effective sessions per global batch instead of "
          f"{res[blocks[0]][1]['effective']:.0f}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    print(f"RESULT name=rank_shard_files_per_1000_steps_k{best} baseline=block_windows_{blocks[0]} "
          f"ratio={base / loc['files']:.1f}")


if __name__ == "__main__":
    main()
