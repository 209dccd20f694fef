"""Which chunk size and codec for spike arrays: size on disk vs the cost of reading one window.

For each candidate (inner chunk length x Blosc codec) the spike times and unit indices of real
and synthetic sessions are written as popscale writes them, then random 1 s windows are read
cold (decoded-chunk cache cleared before every window) through the fast shard reader, and the
same windows through zarr-python for comparison. Prints a table; the last line compares the
chosen configuration's cold window read against zarr-python's.

    python bench/compression.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_service.format import DEFAULT_CHUNKING, Chunking  # noqa: E402
from data_service.shards import CACHE, open_sharded  # noqa: E402
from data_service.store import _write_sharded  # noqa: E402

REAL = Path(os.environ.get("POPSCALE_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))


def datasets(quick: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from data_service.ingest import read_sessions
    from data_service.ingest.common import IngestOptions
    from data_service.synth import SynthConfig, make_session

    out = {}
    s = make_session(SynthConfig(minutes=3 if quick else 10), 1)
    out["synthetic (exact times)"] = (s.spike_times, s.spike_units)
    if REAL.is_dir():
        (n,) = read_sessions(REAL / "mouse_A2929-200711.nwb", IngestOptions())
        out["NWB mouse (exact times)"] = (n.spike_times, n.spike_units)
        (m,) = read_sessions(REAL / "m1_stevenson_2011.mat", IngestOptions())
        out["M1 monkey (50 ms bins)"] = (m.spike_times, m.spike_units)
    return out


def measure(t: np.ndarray, u: np.ndarray, chunking: Chunking, windows: np.ndarray, workdir: Path) -> dict:
    g = zarr.open_group(str(workdir), mode="w", zarr_format=3)
    t0 = time.perf_counter()
    _write_sharded(g, "t", t, chunking)
    _write_sharded(g, "u", u.astype("<u2"), chunking)
    write_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file() and f.name != "zarr.json")
    ft, fu = open_sharded(workdir / "t"), open_sharded(workdir / "u")
    lo = np.searchsorted(t, windows)
    hi = np.searchsorted(t, windows + 1.0)
    t0 = time.perf_counter()
    for a, b in zip(lo, hi):
        CACHE.clear()
        ft.read(a, b)
        fu.read(a, b)
    cold_us = (time.perf_counter() - t0) / len(windows) * 1e6
    zt, zu = zarr.open_array(str(workdir / "t")), zarr.open_array(str(workdir / "u"))
    n_z = max(20, len(windows) // 10)
    t0 = time.perf_counter()
    for a, b in zip(lo[:n_z], hi[:n_z]):
        zt[a:b]
        zu[a:b]
    zarr_us = (time.perf_counter() - t0) / n_z * 1e6
    return {"bytes_per_spike": size / len(t), "write_s": write_s, "cold_us": cold_us, "zarr_us": zarr_us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    chunks = [4096, 16384] if a.quick else [1024, 4096, 16384, 65536]
    codecs = [("lz4", 5, "shuffle"), ("lz4", 5, "bitshuffle"), ("zstd", 3, "bitshuffle"), ("zstd", 5, "shuffle")]
    n_win = 150 if a.quick else 1000
    rng = np.random.default_rng(0)
    chosen_rows = []
    print(f"{'data':26s} {'chunk':>6s} {'codec':18s} {'B/spike':>8s} {'write s':>8s} {'cold read us':>13s} {'zarr-python us':>15s}")
    for name, (t, u) in datasets(a.quick).items():
        windows = rng.uniform(t[0], t[-1] - 1.0, n_win)
        print(f"{name:26s} {'raw':>6s} {'(float64 + uint16)':18s} {10.0:8.2f}")
        for c in chunks:
            for cname, clevel, shuffle in codecs:
                ck = Chunking(chunk=c, cname=cname, clevel=clevel, shuffle=shuffle)
                with tempfile.TemporaryDirectory() as d:
                    r = measure(t, u, ck, windows, Path(d))
                mark = " <- default" if ck == DEFAULT_CHUNKING else ""
                print(f"{name:26s} {c:6d} {f'{cname}{clevel}-{shuffle}':18s} {r['bytes_per_spike']:8.2f} "
                      f"{r['write_s']:8.2f} {r['cold_us']:13.1f} {r['zarr_us']:15.1f}{mark}")
                if mark:
                    chosen_rows.append(r)
    cold = float(np.mean([r["cold_us"] for r in chosen_rows]))
    zarr_us = float(np.mean([r["zarr_us"] for r in chosen_rows]))
    print(f"RESULT name=cold_window_read_us baseline=zarr-python ratio={zarr_us / cold:.1f}")


if __name__ == "__main__":
    main()
