"""`popscale synth`: a seeded corpus of subjects x sessions x minutes, at any scale.

Session i depends only on (config, i): its subject's neuron pool is re-derived from the subject
seed, so sessions are generated independently, in parallel, one at a time per worker (memory is
bounded by one session whatever the corpus size), and a re-run skips the sessions already in.

Why pretraining across sessions should help: every session of a subject records a random subset
of the same pool of neurons (plus units never seen before), and all subjects' neurons are driven
by the same kind of movement dynamics; but unit ids are random per session, so a model has to
discover the correspondence from activity, as with real recordings.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..session import SessionData, SourceInfo, TimeSeries, interval_array
from ..splits import SplitConfig, make_splits
from ..store import CorpusStore, Staged, stage_session
from .behaviour import Behaviour, ReachStyle, reaching, rotational_drive
from .neurons import PARAM_COLUMNS, UnitParams, draw_units, log_rates, ou, refractory, spikes_from_rates

GENERATOR = "popscale-synth-1"
BLOCK_S = 60.0  # rates are computed a minute at a time to bound memory


@dataclass
class SynthConfig:
    sessions: int = 16
    subjects: int = 4
    minutes: float = 10.0  # mean session length; each session is 0.6x to 1.4x this
    seed: int = 0
    pool_size: int = 400  # neurons per subject
    min_units: int = 60
    max_units: int = 200
    new_unit_fraction: float = 0.25  # units of a session not in its subject's pool
    untuned_fraction: float = 0.2
    latent_dims: int = 3  # shared fluctuations unrelated to movement
    lag_s: float = 0.1  # neural activity leads movement
    behaviour_hz: float = 100.0
    center_out_fraction: float = 0.5
    # difficulty knobs (1.0 = the realistic default): movement tuning strength (depth, position,
    # speed and rotational weights) and firing rates, both multiplied
    tuning_scale: float = 1.0
    rate_scale: float = 1.0

    def fingerprint(self) -> str:
        """Everything session i depends on; not the session count, so a corpus can be grown."""
        params = {k: v for k, v in asdict(self).items() if k != "sessions"}
        for k in ("tuning_scale", "rate_scale"):  # added later: at their defaults, old fingerprints hold
            if params[k] == 1.0:
                del params[k]
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _rng(cfg: SynthConfig, *key) -> np.random.Generator:
    h = hashlib.sha256(json.dumps([cfg.seed, *key]).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def subject_id(j: int) -> str:
    return f"synth-m{j:02d}"


def session_id(cfg: SynthConfig, i: int) -> str:
    return f"{subject_id(i % cfg.subjects)}-s{i:05d}"


def session_source(cfg: SynthConfig, i: int) -> SourceInfo:
    sha = hashlib.sha256(f"{cfg.fingerprint()}:{i}".encode()).hexdigest()
    return SourceInfo(path=f"synth:{GENERATOR}", format="synthetic", sha256=sha, size_bytes=0, layout=GENERATOR)


def make_session(cfg: SynthConfig, i: int) -> SessionData:
    """Synthetic session i of the corpus described by cfg."""
    j = i % cfg.subjects
    subj = subject_id(j)
    sid = session_id(cfg, i)
    srng = _rng(cfg, "subject", j)
    pool = draw_units(cfg.pool_size, cfg.latent_dims, cfg.untuned_fraction, srng)
    style = ReachStyle(radius_cm=srng.uniform(7.0, 11.0), speed=srng.uniform(0.8, 1.25))
    rng = _rng(cfg, "session", i)

    hz = cfg.behaviour_hz
    duration = round(cfg.minutes * 60 * rng.uniform(0.6, 1.4) * hz) / hz  # a whole number of samples
    task = "center_out" if rng.random() < cfg.center_out_fraction else "random_target"
    beh = reaching(task, duration + cfg.lag_s, cfg.behaviour_hz, style, rng)
    n_units, table, latent, pool_index = _session_units(cfg, pool, rng)
    params = UnitParams(table, latent)
    n = int(round(duration * hz))
    vscale = 2.0 * style.radius_cm / (0.5 / style.speed)  # ~ peak reach speed
    t, u = _session_spikes(cfg, beh, style, params, n_units, n, vscale, rng)

    bt = beh.t[:n]
    s = SessionData(
        session_id=sid, subject=subj, spike_times=t, spike_units=u.astype(np.int64),
        unit_ids=np.asarray([f"{subj}/{sid}/{rng.bytes(4).hex()}" for _ in range(n_units)], dtype=np.str_),
        unit_areas=np.asarray(["M1"] * n_units, dtype=np.str_),
        domain=interval_array([0.0], [duration]), source=session_source(cfg, i),
        behaviour={
            "hand_vel": TimeSeries(bt.copy(), beh.vel[:n].astype(np.float32), ["x", "y"], unit="cm/s", sampling_rate=hz),
            "hand_pos": TimeSeries(bt.copy(), beh.pos[:n].astype(np.float32), ["x", "y"], unit="cm", sampling_rate=hz),
        },
        intervals=_session_intervals(beh, duration), species="synthetic", task=task,
        notes=[f"synthetic ({GENERATOR}); neural activity leads movement by {cfg.lag_s * 1e3:g} ms"],
        ground_truth={"pool_index": pool_index.astype(np.int32), "params": table.astype(np.float32),
                      "latent_weights": latent.astype(np.float32)},
        ground_truth_attrs={"generator": GENERATOR, "param_columns": PARAM_COLUMNS, "lag_s": cfg.lag_s,
                            "velocity_scale": vscale, "position_scale": style.radius_cm,
                            "subject_index": j, "config": asdict(cfg)},
    )
    make_splits(s, SplitConfig(seed=cfg.seed))
    return s


def _session_units(cfg: SynthConfig, pool: UnitParams,
                   rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The session's units: a random subset of the subject's pool plus new ones, in random order (draws in fixed order)."""
    n_units = int(rng.integers(cfg.min_units, cfg.max_units + 1))
    n_new = int(round(n_units * cfg.new_unit_fraction))
    pool_idx = rng.choice(cfg.pool_size, n_units - n_new, replace=False)
    fresh = draw_units(n_new, cfg.latent_dims, cfg.untuned_fraction, rng)
    table = np.concatenate([pool.table[pool_idx], fresh.table])
    latent = np.concatenate([pool.latent[pool_idx], fresh.latent])
    pool_index = np.concatenate([pool_idx, -np.ones(n_new, dtype=np.int64)])
    order = rng.permutation(n_units)
    table, latent, pool_index = table[order], latent[order], pool_index[order]
    table[:, 2] *= np.exp(rng.normal(0, 0.1, n_units))  # small per-session tuning changes
    if cfg.tuning_scale != 1.0:
        table[:, 2:7] *= cfg.tuning_scale  # depth, position (2), speed, rotational amplitude
    if cfg.rate_scale != 1.0:
        table[:, 0] += np.log(cfg.rate_scale)
    return n_units, table, latent, pool_index


def _session_spikes(cfg: SynthConfig, beh: Behaviour, style: ReachStyle, params: UnitParams, n_units: int, n: int,
                    vscale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted spike times and units driven by the covariates at t + lag, made a block at a time to bound memory."""
    # covariates at t + lag, scaled to unit size
    hz = cfg.behaviour_hz
    dt = 1.0 / hz
    shift = int(round(cfg.lag_s * hz))
    vel = beh.vel[shift:shift + n] / vscale
    cov_all = {
        "vel": vel,
        "pos": beh.pos[shift:shift + n] / style.radius_cm,
        "speed": np.linalg.norm(vel, axis=1) - 0.3,
        "rot": rotational_drive(beh.t, beh.movements)[shift:shift + n],
        "latent": ou(n, cfg.latent_dims, dt, rng.uniform(0.3, 2.0, cfg.latent_dims), rng),
    }
    drift = ou(n, n_units, dt, 200.0, rng)
    gain = float(rng.normal(0, 0.1))

    times, units = [], []
    step = int(BLOCK_S * hz)
    for a in range(0, n, step):
        b = min(n, a + step)
        cov = {k: v[a:b] for k, v in cov_all.items()}
        rates = np.exp(log_rates(params, cov, drift[a:b], gain))
        t, u = spikes_from_rates(rates, a * dt, dt, rng)
        times.append(t)
        units.append(u)
    t = np.concatenate(times)
    u = np.concatenate(units)
    keep = refractory(t, u, rng)
    t, u = t[keep], u[keep]
    o = np.argsort(t, kind="stable")
    return t[o], u[o]


def _session_intervals(beh: Behaviour, duration: float) -> dict[str, np.ndarray]:
    """The behaviour's interval sets clipped to the session, empty rows dropped, plus `eval` (the reaches)."""
    intervals = {k: np.clip(v, 0, duration) for k, v in beh.intervals.items()}
    intervals = {k: v[v[:, 1] > v[:, 0]] for k, v in intervals.items()}
    intervals["eval"] = intervals.get("reach", interval_array([0], [duration]))
    return intervals


def _stage(root: str, cfg: SynthConfig, i: int) -> Staged:
    return stage_session(Path(root), make_session(cfg, i))


def synth_corpus(cfg: SynthConfig, corpus: str | Path, *, workers: int = 1, replace: bool = False,
                 on_session: Callable[[str, str], None] | None = None) -> dict[str, int]:
    """Generate cfg.sessions sessions into `corpus`; returns counts by status."""
    counts = {"added": 0, "replaced": 0, "unchanged": 0}
    with CorpusStore(corpus) as store:
        todo = []
        for i in range(cfg.sessions):
            sid = session_id(cfg, i)
            if store.check_new(sid, session_source(cfg, i).sha256, replace) == "unchanged":
                counts["unchanged"] += 1
                if on_session:
                    on_session(sid, "unchanged")
            else:
                todo.append(i)
        if workers <= 1:
            for i in todo:
                r = store.commit(_stage(str(store.root), cfg, i))
                counts[r.status] += 1
                if on_session:
                    on_session(r.session_id, r.status)
        else:
            ctx = mp.get_context("forkserver")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [pool.submit(_stage, str(store.root), cfg, i) for i in todo]
                for fut in as_completed(futures):
                    r = store.commit(fut.result())
                    counts[r.status] += 1
                    if on_session:
                        on_session(r.session_id, r.status)
    return counts
