"""Soak: the data service at full speed for N minutes; after warm-up its memory must not creep.

What runs: the run config's data loader (`data.loader`: by default the pool of long-lived Ray actors
building POYO batches, data_service/actors.py; `--set data.loader=ray-data` for Ray Data, one
dataset of 2,048 blocks after another, as a long run has them) on the embedded Ray a training run
starts (`pretrain.run.launch.init_ray`: loopback, 1 GiB object store), with the data-service spec
of the run plan a training worker gets (`load_config` defaults, poyo-1.3M, global batch 32,
`data.data_actors`/`prefetch`/`buffer_mb`/`block_batches` defaults) over a synthetic corpus
(data_service.synth, made once under runs/bench/). The driver pulls batches as fast as they come
and does what the trainer does with each (`PackedBatch.to("cpu")`); nothing trains, so the
service runs flat out.

Every --interval seconds (default 5) a sampler thread records: windows/s over the interval; the
memory of the driver and of every process of the Ray session (found as in popscale.listeners:
descendants of the driver and processes naming the session directory), by kind (GCS, raylet,
agents, the batch-building actors (the pool's or Ray Data's), Ray Data's own actors - stats, autoscaling coordinator,
actor locations -, the pool of task workers, Ray's Python helpers), as RSS and as PSS (RSS counts the
pages shared between processes - the object store's mapping, libraries - once per process; PSS
splits them, so the sum of PSS is the memory the processes together hold); and the object store's
use (the raylet's FormatGlobalMemoryInfo stats, what `ray memory --stats-only` prints).

The object store's pages are counted once, from its shared-memory file, and left out of each
process's PSS (popscale/memory.py says why: in a probe with short datasets the plain sum of PSS grew
as the driver touched more of the store while its heap stayed flat; bench/RESULTS.md, issue 28's
seventh stop). That sum stays in the table and the CSV.

After a warm-up (the first 20 % of the run: 2 min of the default 10) a least-squares line is fitted
to the total (processes' PSS without the store's pages, plus the store's resident bytes, driver
included) against time: its slope in MB per minute with a 95 %
interval (t distribution; consecutive samples are correlated, so read the interval as optimistic).
Goal (issues 12 and 28): under 1 MB/min. The 10-minute run is a first look, `--minutes 60` issue 28's figure; --quick (1 minute, 12 s warm-up)
only shows the script works - a minute is too short to tell a slow leak from noise.

Writes bench/figures/soak/soak-<minutes>min.csv (one row per sample) and .png (windows/s and memory
components over time, warm-up shaded, the fitted line), prints a table, and ends with

    RESULT name=memory_slope_mb_per_min value=<MB/min> baseline=goal_1 ratio=<slope / 1 MB/min>

    python bench/soak.py [--quick] [--minutes N] [--interval S] [--sessions N]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # not a line per Ray dataset on the console

import argparse  # noqa: E402
import csv  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_service.synth import SynthConfig, synth_corpus  # noqa: E402
from popscale.listeners import session_pids  # noqa: E402
from popscale.memory import process_memory, store_resident_bytes  # noqa: E402
from pretrain.run.launch import init_ray  # noqa: E402
from pretrain.run.plan import build_plan  # noqa: E402
from pretrain.run.train import data_loader  # noqa: E402
from pretrain.run.config import load_config  # noqa: E402

GLOBAL_BATCH = 32
GOAL_MB_PER_MIN = 1.0
MB = 1e6
KINDS = ("driver", "gcs", "raylet", "agents", "data_actors", "data_system", "workers", "helpers")
DATA_SYSTEM = ("_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker")  # Ray Data's own actors
OUT = ROOT / "bench" / "figures" / "soak"


def kind_of(proc: psutil.Process, driver: int) -> str:
    """Which part of the service a process is, from its name (Ray names its workers ray::<what they run>)."""
    if proc.pid == driver:
        return "driver"
    name = proc.name()
    if name == "gcs_server":
        return "gcs"
    if name == "raylet":
        return "raylet"
    if "Agent" in name:  # ray::DashboardAgent, ray::RuntimeEnvAgent
        return "agents"
    # ray::_BuilderActor (the pool's, data.loader=ray), ray::MapWorker(MapBatches(_Builder)) (one per Ray dataset)
    if "_Builder" in name or "MapWorker" in name:
        return "data_actors"
    if any(a in name for a in DATA_SYSTEM):
        return "data_system"
    if name.startswith("ray::"):  # ray::IDLE: the worker pool (Ray Data's range-read tasks run there)
        return "workers"
    return "helpers"  # log_monitor.py, monitor.py and the like (and workers too young to be renamed)


@dataclass
class Sample:
    t_s: float
    windows: int
    windows_per_s: float
    object_store_mb: float
    processes: int
    pss_mb: dict[str, float]  # each kind's PSS without the object store's pages
    rss_mb: dict[str, float]
    count: dict[str, int]
    python_mb: float = float("nan")  # the driver's Python objects (tracemalloc; --trace only)
    store_resident_mb: float = 0.0  # the object store's shared-memory file: the bytes the kernel holds for it
    store_pss_mb: float = 0.0  # the store's pages as the processes' PSS counted them (what the old total held)

    @property
    def total_mb(self) -> float:
        """Every page once: the processes' own memory and the object store's file."""
        return sum(self.pss_mb.values()) + self.store_resident_mb

    @property
    def pss_sum_mb(self) -> float:
        """The plain sum of PSS (the store's pages as mapped): the total before the seventh stop."""
        return sum(self.pss_mb.values()) + self.store_pss_mb

    def row(self) -> dict:
        return {"t_s": f"{self.t_s:.2f}", "windows": self.windows, "windows_per_s": f"{self.windows_per_s:.2f}",
                "total_mb": f"{self.total_mb:.2f}", "total_pss_mb": f"{self.pss_sum_mb:.2f}",
                "total_rss_mb": f"{sum(self.rss_mb.values()):.2f}", "object_store_mb": f"{self.object_store_mb:.2f}",
                "store_resident_mb": f"{self.store_resident_mb:.2f}", "store_pss_mb": f"{self.store_pss_mb:.2f}",
                "processes": self.processes,
                **{f"{k}_pss_mb": f"{self.pss_mb[k]:.2f}" for k in KINDS},
                **{f"{k}_rss_mb": f"{self.rss_mb[k]:.2f}" for k in KINDS},
                **{f"{k}_processes": self.count[k] for k in KINDS}, "driver_python_mb": f"{self.python_mb:.2f}"}


class ObjectStore:
    """The object store's bytes in use, from the raylet (one small RPC; no per-object listing)."""

    def __init__(self) -> None:
        import ray
        from ray._private import internal_api

        self._api = internal_api
        # the address of *this* session: "auto" could find another Ray on a shared machine
        self._state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        node = next(n for n in self._state.node_table() if n["Alive"])
        self._where = (node["NodeManagerAddress"], node["NodeManagerPort"])

    def used_mb(self) -> float:
        try:
            reply = self._api.get_memory_info_reply(self._state, *self._where, timeout_seconds=10)
            return reply.store_stats.object_store_bytes_used / MB
        except Exception:  # noqa: BLE001 - a missed sample is NaN, not the end of the soak
            return float("nan")


class Sampler(threading.Thread):
    def __init__(self, interval: float, counter: list[int], store: ObjectStore) -> None:
        super().__init__(daemon=True)
        self.interval, self.counter, self.store = interval, counter, store
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self._procs: dict[int, psutil.Process] = {}  # psutil caches per-process state: keep the objects

    def sample(self, last: tuple[float, int] | None) -> Sample:
        driver = os.getpid()
        pss = dict.fromkeys(KINDS, 0.0)
        rss = dict.fromkeys(KINDS, 0.0)
        count = dict.fromkeys(KINDS, 0)
        pids = session_pids(driver)
        self._procs = {p: self._procs.get(p) or psutil.Process(p) for p in pids if psutil.pid_exists(p)}
        n, store_pss = 0, 0.0
        for proc in self._procs.values():
            try:
                k = kind_of(proc, driver)
                m = process_memory(proc)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            pss[k] += m.own_pss / MB
            store_pss += m.store_pss / MB
            rss[k] += m.rss / MB
            count[k] += 1
            n += 1
        t, w = time.monotonic() - self.t0, self.counter[0]
        rate = (w - last[1]) / (t - last[0]) if last and t > last[0] else float("nan")
        python = tracemalloc.get_traced_memory()[0] / MB if tracemalloc.is_tracing() else float("nan")
        resident = store_resident_bytes(self._procs) / MB  # the raylet holds its store open
        return Sample(t, w, rate, self.store.used_mb(), n, pss, rss, count, python, resident, store_pss)

    def run(self) -> None:
        last = None
        while not self.stop.is_set():
            s = self.sample(last)
            self.samples.append(s)
            last = (s.t_s, s.windows)
            self.stop.wait(self.interval)


BLOCK = 6  # samples per block for the headline fit (30 s at the default interval)


def blocks(t_min: np.ndarray, y: np.ndarray, size: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Medians of consecutive blocks of `size` samples (fewer than 4 blocks: the samples as they are).
    A block's median ignores a one-sample dip (a data actor being replaced between datasets, an
    idle worker exiting), and neighbouring blocks are far less correlated than neighbouring samples,
    so the fit's interval means more."""
    n = len(y) // size
    if n < 4:
        return t_min, y
    cut = n * size
    return t_min[:cut].reshape(n, size).mean(1), np.nanmedian(y[:cut].reshape(n, size), axis=1)


def slope(t_min: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares slope of y (MB) against t (min) and its 95 % interval (t distribution)."""
    from scipy import stats

    ok = np.isfinite(y)
    t_min, y = t_min[ok], y[ok]
    if len(y) < 3:
        return float("nan"), float("nan"), float("nan")
    fit = stats.linregress(t_min, y)
    half = stats.t.ppf(0.975, len(y) - 2) * fit.stderr
    return float(fit.slope), float(fit.slope - half), float(fit.slope + half)


def plot(samples: list[Sample], warmup_s: float, fit: tuple[float, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s.t_s for s in samples]) / 60
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True, height_ratios=(1, 2))
    ax1.plot(t, [s.windows_per_s for s in samples], color="tab:blue", lw=1.2)
    ax1.set_ylabel("windows/s (interval)")
    ax1.set_ylim(bottom=0)
    ax1.set_title(title, fontsize=10)
    total = np.array([s.total_mb for s in samples])
    ax2.plot(t, total, color="black", lw=1.8, label="total (each page once)")
    ax2.plot(t, [s.pss_sum_mb for s in samples], color="black", lw=1, ls="--", label="sum of PSS (store pages as mapped)")
    for k in KINDS:
        ax2.plot(t, [s.pss_mb[k] for s in samples], lw=1, label=f"{k} (PSS, store pages out)")
    ax2.plot(t, [s.store_resident_mb for s in samples], lw=1.2, color="tab:brown", label="object store file, resident")
    ax2.plot(t, [s.object_store_mb for s in samples], lw=1, ls="--", color="grey", label="object store in use")
    after = t >= warmup_s / 60
    if after.any():
        ax2.plot(t[after], fit[1] + fit[0] * t[after], color="red", lw=1, ls=":",
                 label=f"fit after warm-up: {fit[0]:+.2f} MB/min")
    for ax in (ax1, ax2):
        ax.axvspan(0, warmup_s / 60, color="0.92", zorder=0)
    ax2.set_ylabel("MB")
    ax2.set_xlabel("minutes (shaded: warm-up, not fitted)")
    ax2.set_yscale("symlog", linthresh=10)
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def shown(p: Path) -> str:
    p = p.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def corpus(sessions: int, minutes: float) -> Path:
    """The soak's synthetic corpus (made once: synth_corpus skips sessions already there)."""
    root = ROOT / "runs" / "bench" / f"soak-{sessions}x{minutes:g}min" / "corpus"
    if not (root / "manifest.json").exists():
        print(f"making a synthetic corpus at {root} ({sessions} sessions x {minutes:g} min)", file=sys.stderr)
    synth_corpus(SynthConfig(sessions=sessions, subjects=4, minutes=minutes, seed=0), root,
                 workers=os.cpu_count() or 1)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description="data-service soak: windows/s and memory over N minutes at full speed "
                                             "(the 10-minute default is the real figure; --quick only checks the script)")
    ap.add_argument("--quick", action="store_true", help="1 minute (12 s warm-up): a smoke run, not the figure")
    ap.add_argument("--minutes", type=float, help="how long the service runs (default 10; --quick: 1)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run not fitted (default 0.2)")
    ap.add_argument("--sessions", type=int, default=20, help="sessions of the synthetic corpus (default 20)")
    ap.add_argument("--session-minutes", type=float, default=5.0, help="minutes per session (default 5)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where the CSV and PNG go (default {shown(OUT)})")
    ap.add_argument("--trace", action="store_true",
                    help="trace the driver's Python allocations (tracemalloc; slows it): a row tells what of the "
                         "driver's growth is Python objects and what is native (Ray's core worker, Arrow, malloc)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a run-config override, e.g. data.block_batches=16 (named in the output files)")
    a = ap.parse_args()
    minutes = a.minutes or (1.0 if a.quick else 10.0)
    duration, warmup_s = minutes * 60, minutes * 60 * a.warmup
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    root = corpus(a.sessions, a.session_minutes)
    run = load_config(None, [f"data.corpus={root}", f"data.global_batch={GLOBAL_BATCH}", "data.loader=ray", *a.set])
    plan = build_plan(run)
    spec, d = plan.service_spec(), run.data
    init_ray(run)
    import ray

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    counter = [0]
    sampler = Sampler(a.interval, counter, ObjectStore())
    loader = data_loader(d, spec, 0, 1)
    print(f"soak: {type(loader).__name__} ({d.data_actors} actor(s), prefetch {d.prefetch}, buffer {d.buffer_mb} MB) on the "
          f"embedded Ray, {len(plan.sessions)} sessions, batches of {GLOBAL_BATCH} x 1 s windows, {minutes:g} min "
          f"({warmup_s / 60:.1f} min warm-up), a sample every {a.interval:g} s", file=sys.stderr)
    if a.trace:
        tracemalloc.start()
    sampler.start()
    try:
        with Progress(TextColumn("soak"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=Console(stderr=True)) as bar:
            task = bar.add_task("", total=duration, info="starting actors")
            stream = loader.iterate(0, 1 << 40)
            started = None  # the run's clock starts with the first batch (Ray Data's actors take a while)
            for served in stream:
                served.data.to("cpu")  # what the trainer does with every batch
                counter[0] += len(served.positions)
                now = time.monotonic() - sampler.t0
                if started is None:
                    started = now
                    bar.reset(task, total=duration, info="first batch")
                if sampler.samples:
                    s = sampler.samples[-1]
                    bar.update(task, completed=min(now - started, duration),
                               info=f"{s.windows_per_s:6.1f} windows/s  total {s.total_mb:7.1f} MB")
                if now - started >= duration:
                    break
            sampler.stop.set()  # the last sample is of the service still running, not of its shutdown
            sampler.join(timeout=60)
        if not sampler.samples:
            raise SystemExit("soak: no samples were taken")
        # written before Ray stops: a 60-minute run once lost every sample to a crash inside the shutdown
        # (a Ray thread calling into the stopped core worker ends the process: seen with Ray 2.60, not fixed here)
        tag = "".join(f"-{x.split('=', 1)[0].split('.')[-1].replace('_', '')}{x.split('=', 1)[1]}" for x in a.set)
        # warm-up: the start (until the first batch) and then the first --warmup of the run
        report(sampler.samples, counter[0], minutes, (started or 0.0) + warmup_s, a.interval, a.out,
               f"data-service soak, {minutes:g} min: {type(loader).__name__} on the embedded Ray, {len(plan.sessions)} "
               f"sessions, batch {GLOBAL_BATCH}, {d.block_batches} batches a block"
               + (f" ({', '.join(a.set)})" if a.set else ""), tag)
        stream.close()
    finally:
        sampler.stop.set()
        sampler.join(timeout=60)
        ray.shutdown()


def report(samples: list[Sample], windows: int, minutes: float, warmup_s: float, interval: float, out: Path,
           title: str, tag: str = "") -> None:
    """CSV, plot, the table and the RESULT line."""
    t_min = np.array([s.t_s for s in samples]) / 60
    fitted = t_min >= warmup_s / 60
    total = np.array([s.total_mb for s in samples])
    rows = [("total (each page once)", total),
            ("sum of PSS (store pages as mapped)", np.array([s.pss_sum_mb for s in samples])),
            ("total RSS (counts shared pages per process)", np.array([sum(s.rss_mb.values()) for s in samples])),
            *[(f"  {k} (PSS, store pages out)", np.array([s.pss_mb[k] for s in samples])) for k in KINDS],
            ("  object store file, resident", np.array([s.store_resident_mb for s in samples])),
            ("  object store pages as mapped (PSS)", np.array([s.store_pss_mb for s in samples])),
            ("  driver RSS", np.array([s.rss_mb["driver"] for s in samples])),
            *([("  driver's Python objects (tracemalloc)", np.array([s.python_mb for s in samples]))]
              if np.isfinite(samples[-1].python_mb) else []),
            ("object store in use", np.array([s.object_store_mb for s in samples]))]
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"soak-{minutes:g}min{tag}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(samples[0].row()))
        w.writeheader()
        w.writerows(s.row() for s in samples)

    def fit(y: np.ndarray) -> tuple[float, float, float]:
        return slope(*blocks(t_min[fitted], y[fitted]))

    m, lo, hi = fit(total)
    tb, yb = blocks(t_min[fitted], total[fitted])
    intercept = float(np.nanmean(yb) - m * np.mean(tb)) if len(yb) else float("nan")
    plot(samples, warmup_s, (m, intercept), stem.with_suffix(".png"),
         f"{title}\nslope after warm-up {m:+.2f} MB/min (95 % {lo:+.2f} .. {hi:+.2f})")

    rates = np.array([s.windows_per_s for s in samples])[fitted]
    rate = f"{np.nanmean(rates):.1f} windows/s after warm-up (5th percentile of intervals " \
           f"{np.nanpercentile(rates, 5):.1f})" if np.isfinite(rates).any() else "no samples after warm-up"
    counts = ", ".join(f"{k} {samples[-1].count[k]}" for k in KINDS if samples[-1].count[k])
    print(f"{len(samples)} samples every {interval:g} s, {len(tb)} fitted points ({'medians of ' + str(BLOCK) + '-sample blocks' if len(tb) < fitted.sum() else 'samples'}) "
          f"after {warmup_s / 60:.1f} min warm-up; {windows} windows in {samples[-1].t_s:.0f} s, {rate}; "
          f"processes at the end: {counts}")
    print(f"{'memory (MB)':46s} {'start':>8s} {'warm':>8s} {'end':>8s} {'max':>8s}   MB/min after warm-up (95 %)")
    first_fit = int(np.argmax(fitted)) if fitted.any() else 0
    for name, y in rows:
        sm, slo, shi = fit(y)
        print(f"{name:46s} {y[0]:8.1f} {y[first_fit]:8.1f} {y[-1]:8.1f} {np.nanmax(y):8.1f}   "
              f"{sm:+8.3f} ({slo:+.3f} .. {shi:+.3f})")
    verdict = "meets" if hi < GOAL_MB_PER_MIN else "within noise of" if m < GOAL_MB_PER_MIN else "misses"
    # per batch served: the growth a run pays whatever its speed (a faster service grows faster per minute)
    per_min_batches = float(np.nanmean(rates)) / GLOBAL_BATCH if np.isfinite(rates).any() else float("nan")
    print(f"memory per 10,000 batches after warm-up: {m / per_min_batches / 60 * 1e4:+.2f} MB "
          f"({per_min_batches * 60:.0f} batches/min)")
    print(f"memory slope after warm-up {m:+.3f} MB/min (95 % {lo:+.3f} .. {hi:+.3f}): {verdict} the goal of "
          f"< {GOAL_MB_PER_MIN:g} MB/min{' (a short run: not the figure, which is the 10-minute run)' if minutes < 10 else ''}")
    print(f"samples: {shown(stem.with_suffix('.csv'))}; plot: {shown(stem.with_suffix('.png'))}")
    print(f"RESULT name=memory_slope_mb_per_min value={m:.3f} baseline=goal_1 ratio={m / GOAL_MB_PER_MIN:.3f}")

if __name__ == "__main__":
    main()
