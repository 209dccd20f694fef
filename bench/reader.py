"""Windows/s per core: popscale's corpus reader vs temporaldata's lazy HDF5 loading, same windows.

A synthetic corpus (200 sessions; --quick: 20 short ones) is generated once under runs/bench/,
and the same sessions are written as torch_brain/temporaldata HDF5 files (one per session, as
brainsets makes them). Then the same random 1 s windows (random session, random start) are read:
- popscale: `Corpus.read_window` - spikes, both behaviours and every interval set, with its
  default per-process decoded-chunk cache (and again with the cache too small to hold anything,
  i.e. every chunk read from disk and decoded);
- temporaldata: `Data.from_hdf5(lazy=True)` per file (kept open), then for each window what
  torch_brain's Dataset does - deepcopy the lazy object, `.slice(start, end)` - and touch every
  attribute so it is really read.
One process, one thread (per-core figures), after one warm-up pass over the windows so both read
from the OS page cache.

    python bench/reader.py [--quick] [--sessions N] [--windows N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_service import shards  # noqa: E402
from data_service.reader import Corpus  # noqa: E402
from data_service.synth import SynthConfig, synth_corpus  # noqa: E402


def build(cfg: SynthConfig, base: Path) -> tuple[Path, Path]:
    """The popscale corpus and the same sessions as temporaldata HDF5 files (reused when present)."""
    from temporaldata import ArrayDict, Data, Interval, IrregularTimeSeries

    import shutil

    corpus, h5dir = base / "corpus", base / "temporaldata"

    def code(*files: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(files))).hexdigest()[:16]

    synth = list((ROOT / "data_service" / "synth").glob("*.py"))
    # each side is rebuilt when the config or the code that writes it changes: the HDF5 files hold
    # the same data whatever popscale's storage layout, so a layout change rebuilds only the corpus
    want = {"fingerprint": cfg.fingerprint(), "sessions": cfg.sessions,
            "code": code(ROOT / "data_service" / "store.py", ROOT / "data_service" / "format.py", *synth)}
    want_h5 = {"fingerprint": cfg.fingerprint(), "sessions": cfg.sessions, "code": code(*synth)}
    stamp, stamp_h5 = base / "built.json", base / "temporaldata.json"

    def fresh(path: Path, doc: dict) -> bool:
        return path.exists() and json.loads(path.read_text()) == doc

    if fresh(stamp, want) and fresh(stamp_h5, want_h5):
        return corpus, h5dir
    if not fresh(stamp, want):
        stamp.unlink(missing_ok=True)
        shutil.rmtree(corpus, ignore_errors=True)
        t0 = time.time()
        synth_corpus(cfg, corpus, workers=os.cpu_count() or 1)
        print(f"generated {cfg.sessions} sessions in {time.time() - t0:.0f} s", file=sys.stderr)
        stamp.write_text(json.dumps(want))
    if fresh(stamp_h5, want_h5):
        return corpus, h5dir
    stamp_h5.unlink(missing_ok=True)
    shutil.rmtree(h5dir, ignore_errors=True)
    h5dir.mkdir(parents=True, exist_ok=True)
    c = Corpus(corpus)
    for sid in c.session_ids:
        s = c.session(sid)
        t, u = s.spikes()
        bt, vel = s.behaviour("hand_vel")
        _, pos = s.behaviour("hand_pos")
        iv = {name: Interval(start=rows[:, 0].copy(), end=rows[:, 1].copy()) for name, rows in s.intervals.items()
              if name not in ("train", "valid", "test")}
        data = Data(
            spikes=IrregularTimeSeries(timestamps=t, unit_index=u.astype(np.int64), domain="auto"),
            units=ArrayDict(id=np.asarray(s.unit_ids)),
            hand=IrregularTimeSeries(timestamps=bt, vel=vel, pos=pos, domain="auto"),
            train_domain=Interval(start=s.intervals["train"][:, 0].copy(), end=s.intervals["train"][:, 1].copy()),
            valid_domain=Interval(start=s.intervals["valid"][:, 0].copy(), end=s.intervals["valid"][:, 1].copy()),
            test_domain=Interval(start=s.intervals["test"][:, 0].copy(), end=s.intervals["test"][:, 1].copy()),
            domain=Interval(start=s.domain[:, 0].copy(), end=s.domain[:, 1].copy()),
            **iv,
        )
        with h5py.File(h5dir / f"{sid}.h5", "w") as f:
            data.to_hdf5(f)
    stamp_h5.write_text(json.dumps(want_h5))
    return corpus, h5dir


def windows(c: Corpus, n: int, seed: int = 0) -> list[tuple[str, float]]:
    rng = np.random.default_rng(seed)
    ids = c.session_ids
    out = []
    for k in rng.integers(0, len(ids), n):
        row = c.rows[ids[k]]
        out.append((ids[k], float(rng.uniform(row["t_start"], row["t_end"] - 1.0))))
    return out


def run_popscale(corpus: Path, wins, cache_bytes: int) -> tuple[float, int]:
    shards.CACHE.clear()
    shards.CACHE.max_bytes = cache_bytes
    c = Corpus(corpus)
    for sid in {w[0] for w in wins}:
        _ = c.session(sid).intervals  # open every session first (both sides do)
    n_spikes = 0
    for sid, t0 in wins:  # warm-up: page cache
        c.read_window(sid, t0, t0 + 1.0)
    t = time.perf_counter()
    for sid, t0 in wins:
        w = c.read_window(sid, t0, t0 + 1.0)
        n_spikes += len(w.spike_times)
    return len(wins) / (time.perf_counter() - t), n_spikes


def run_temporaldata(h5dir: Path, wins, deepcopy: bool = True) -> tuple[float, int]:
    from temporaldata import Data

    files = {sid: h5py.File(h5dir / f"{sid}.h5", "r") for sid in {w[0] for w in wins}}
    lazy = {sid: Data.from_hdf5(f, lazy=True) for sid, f in files.items()}

    def read(sid, t0):
        d = copy.deepcopy(lazy[sid]) if deepcopy else lazy[sid]
        s = d.slice(t0, t0 + 1.0)
        out = [s.spikes.timestamps, s.spikes.unit_index, s.hand.timestamps, s.hand.vel, s.hand.pos]
        for k in s.keys():
            obj = getattr(s, k)
            if hasattr(obj, "start"):
                out += [obj.start, obj.end]
        return len(out[0])

    for sid, t0 in wins:
        read(sid, t0)
    n_spikes = 0
    t = time.perf_counter()
    for sid, t0 in wins:
        n_spikes += read(sid, t0)
    rate = len(wins) / (time.perf_counter() - t)
    for f in files.values():
        f.close()
    return rate, n_spikes


def main() -> None:
    ap = argparse.ArgumentParser(description="popscale reader vs temporaldata lazy loading")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sessions", type=int)
    ap.add_argument("--windows", type=int)
    ap.add_argument("--minutes", type=float)
    a = ap.parse_args()
    sessions = a.sessions or (20 if a.quick else 200)
    minutes = a.minutes or (2.0 if a.quick else 10.0)
    n_win = a.windows or (1000 if a.quick else 5000)
    cfg = SynthConfig(sessions=sessions, subjects=8, minutes=minutes, seed=0)
    base = ROOT / "runs" / "bench" / f"reader-{sessions}x{minutes:g}min"
    warnings.simplefilter("ignore")
    corpus, h5dir = build(cfg, base)
    c = Corpus(corpus)
    wins = windows(c, n_win)
    hours = sum(r["duration_s"] for r in c.rows.values()) / 3600
    spikes = sum(r["n_spikes"] for r in c.rows.values())
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e9  # noqa: E731
    print(f"corpus: {len(c.session_ids)} sessions, {hours:.1f} h, {spikes / 1e6:.1f} M spikes; "
          f"zarr {size(corpus):.2f} GB, temporaldata HDF5 {size(h5dir):.2f} GB; {len(wins)} random 1 s windows")
    default_cache = shards.CACHE.max_bytes
    ours, n1 = run_popscale(corpus, wins, default_cache)
    ours_cold, n2 = run_popscale(corpus, wins, 0)
    td, n3 = run_temporaldata(h5dir, wins, deepcopy=True)
    td_nocopy, n4 = run_temporaldata(h5dir, wins, deepcopy=False)
    assert n1 == n2 == n3 == n4, "both readers must return the same spikes"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{'reader':58s} {'windows/s/core':>15s} {'vs baseline':>12s}")
    rows = [
        (f"popscale Corpus.read_window (chunk cache {default_cache >> 20} MB)", ours),
        ("popscale Corpus.read_window (no cache: every chunk read+decoded)", ours_cold),
        ("temporaldata lazy: deepcopy + slice (torch_brain Dataset)", td),
        ("temporaldata lazy: slice without deepcopy", td_nocopy),
    ]
    for name, r in rows:
        print(f"{name:58s} {r:15.0f} {r / td:11.1f}x")
    print(f"spikes per window {n1 / len(wins):.0f}; peak RSS {rss:.2f} GB")
    print(f"RESULT name=windows_per_s_per_core baseline=temporaldata-lazy ratio={ours / td:.1f}")


if __name__ == "__main__":
    main()
