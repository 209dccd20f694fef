"""Shared fixtures: small sessions built in memory, and the project's real recordings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_service.session import SessionData, SourceInfo, TimeSeries, interval_array

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("POPSCALE_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(autouse=True)
def _mlflow_env_restored():
    """mlflow.set_tracking_uri / set_registry_uri write MLFLOW_* into os.environ, where they would leak
    into later tests and every subprocess those start."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def real_dir() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real recordings not found at {REAL} (set POPSCALE_REAL_DATA)")
    return REAL


def simple_session(session_id: str = "s1", *, duration: float = 120.0, n_units: int = 20, rate: float = 20.0,
                   seed: int = 0, sha: str | None = None) -> SessionData:
    """A valid session with uniform random spikes, 100 Hz behaviour and a few trials."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate * n_units * duration)
    t = np.sort(rng.uniform(0, duration, n))
    u = rng.integers(0, n_units, n)
    bt = np.arange(0, duration, 0.01)
    vals = np.stack([np.sin(bt), np.cos(bt)], axis=1).astype(np.float32)
    starts = np.arange(0, duration - 5, 6.0)
    return SessionData(
        session_id=session_id, subject="subj", spike_times=t, spike_units=u,
        unit_ids=np.asarray([f"subj/{session_id}/u{i}" for i in range(n_units)]),
        unit_areas=np.asarray(["M1"] * n_units), domain=interval_array([0.0], [duration]),
        source=SourceInfo("memory", "synthetic", sha or f"sha-{session_id}-{seed}", 0),
        behaviour={"hand_vel": TimeSeries(bt, vals, ["x", "y"], unit="cm/s", sampling_rate=100.0)},
        intervals={"trials": interval_array(starts, starts + 4.0)},
    )


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m popscale.cli ...` in a fresh process (used where a crash must be real)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "popscale.cli", *args], capture_output=True, text=True, env=e,
                       cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"popscale {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def result_line(stdout: str) -> dict[str, str]:
    line = [ln for ln in stdout.strip().splitlines() if ln.startswith("RESULT ")][-1]
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def window_batch(unit_index, input_time, token_type, latent_index, latent_time, output_time, target, weight,
                 session_index: int, output_readout=None):
    """One window's tokens, as arrays made by a test, in the one batch type (a batch of one)."""
    from pretrain.model.batch import PackedBatch

    n_out = len(output_time)
    return PackedBatch(
        unit_index=np.asarray(unit_index, dtype=np.int64), input_time=np.asarray(input_time, dtype=np.float32),
        token_type=np.asarray(token_type, dtype=np.int64), latent_index=np.asarray(latent_index, dtype=np.int64),
        latent_time=np.asarray(latent_time, dtype=np.float32), output_time=np.asarray(output_time, dtype=np.float32),
        output_readout=np.zeros(n_out, np.int64) if output_readout is None else np.asarray(output_readout, np.int64),
        output_session=np.full(n_out, session_index, dtype=np.int64), target=np.asarray(target, dtype=np.float32),
        weight=np.asarray(weight, dtype=np.float32), input_lens=[len(unit_index)], latent_lens=[len(latent_index)],
        output_lens=[n_out], session_ids=[""], t_starts=[0.0])


def packed(windows):
    """Windows joined into one batch, as torch tensors."""
    from pretrain.model.batch import concat

    return concat(list(windows)).to("cpu")


def random_samples(n: int, rng, n_units: int = 30, sessions: int = 3, lps: int = 4, dims: int = 2) -> list:
    """n windows of random tokens (model and optimizer tests)."""
    out = []
    for _ in range(n):
        k = int(rng.integers(5, 80))
        t = np.sort(rng.random(k)).astype(np.float32)
        no = int(rng.integers(3, 30))
        out.append(window_batch(
            unit_index=rng.integers(0, n_units, k), input_time=t, token_type=rng.integers(0, 3, k),
            latent_index=np.tile(np.arange(lps), 8), latent_time=np.repeat((np.arange(8) + 0.5) / 8, lps),
            output_time=np.sort(rng.random(no)), target=rng.normal(size=(no, dims)), weight=rng.uniform(0.1, 5, no),
            session_index=int(rng.integers(sessions))))
    return out


def nlb_style_nwb(path, with_units: bool = True):
    """An NWB laid out as the Neural Latents Benchmark's files on DANDI: units, and plain
    TimeSeries (hand_vel, cursor_pos) directly in the `behavior` processing module."""
    from datetime import datetime, timezone

    from pynwb import NWBHDF5IO, NWBFile, TimeSeries

    nwb = NWBFile(session_description="nlb-like", identifier="nlb1", session_start_time=datetime(2020, 1, 1,
                                                                                                   tzinfo=timezone.utc))
    rng = np.random.default_rng(0)
    if with_units:
        for _ in range(5):
            nwb.add_unit(spike_times=np.sort(rng.uniform(0, 60, 600)))
    t = np.arange(0, 60, 0.01)
    mod = nwb.create_processing_module("behavior", "behaviour")
    mod.add(TimeSeries(name="hand_vel", data=np.stack([np.sin(t), np.cos(t)], 1) * 100, timestamps=t, unit="mm/s"))
    mod.add(TimeSeries(name="cursor_pos", data=np.stack([t, -t], 1), timestamps=t, unit="mm"))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path
