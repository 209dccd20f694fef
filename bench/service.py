"""Training batches delivered per second per core: popscale's data service vs torch_brain's pipeline.

What a training worker receives, per window: a random 1 s training window of spikes and hand
velocity, unit dropout (kept units ~ triangular(30, 100, 300)), POYO tokens (a token per spike,
start/end tokens per kept unit, the latent grid, one output query per behaviour sample with its
scaled target and reach/hold loss weight), and batches of 32 as torch tensors. Both sides do
exactly that over the same sessions, same number of windows, one process, one thread:

- popscale: `data_service.service.LocalBatches(spec, 0, 1).iterate(...)` with the spec of the run
  plan, as a training worker gets it (`load_config` defaults, poyo-1.3M, global batch 32), then
  `PackedBatch.to("cpu")` (what the trainer does with each batch). The window order comes from
  `WindowIndex` (the train split). Optionally (--ray) also `RayBatches` (Ray Data actors).
- torch_brain 0.2.1: the same sessions as temporaldata HDF5 files (made by bench/reader.py's
  `build`), `torch_brain.datasets.Dataset` subclassed the way brainsets datasets are
  (`SpikingDatasetMixin`, sampling intervals = the `train_domain`), transform
  `UnitDropout(min_units=30, mode_units=100, max_units=300)`, then `POYO.tokenize` of
  torch_brain's own POYO (poyo-1.3M hyper-parameters, vocabularies initialised from the dataset)
  for the encoder inputs plus the decoder queries/targets/weights the way torch_brain's POYO
  example builds them (`examples/poyo/datasets/wrapper.py`, not shipped in the wheel),
  `RandomFixedWindowSampler` (train split, window 1 s, seeded), and
  `DataLoader(batch_size=32, collate_fn=torch_brain.batching.collate, num_workers=0)`.

Adaptations (the HDF5 files from bench/reader.py lack what brainsets files carry): each recording
gets its `session` description (id = recording id) and its unit ids as str (HDF5 stores bytes;
the vocabulary is keyed by str) once, when opened; a readout config (hand.vel / 20, weights
reach 5, hold 0.1, as popscale's tokenizer config) is attached in `get_recording_hook`, where
torch_brain's example attaches it.

Timing: every timed pass runs in a fresh process of its own (this script with --side), which
sets its pipeline up, makes one warm-up pass over the very windows timed (both read from the OS
page cache), then the timed pass; the two pipelines alternate `--repeats` times (the median pair
is the headline: the shared machine's speed drifts); in each pass the first batch (epoch setup:
index, sampler's epoch list) is not timed. A process of its own because a pass run in the process
where the other pipeline had run was slower (popscale's cold pass by ~25 %, 123 -> 155 us a
window, after one torch_brain pass: what that pass leaves on the heap; gc.freeze did not help),
and neither side runs after the other in training. popscale's decoded-chunk cache is cleared
before its headline pass (and also reported warm). windows/s = timed windows / wall seconds
(CPU-seconds figure alongside: shared machine).
The two augmentations draw kept-unit counts from different triangular shapes, so tokens per
window differ somewhat (printed); output queries per window are the same.

    python bench/service.py [--quick] [--sessions N] [--minutes M] [--subjects S] [--batches N] [--repeats R] [--ray]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))
from data_service import shards  # noqa: E402
from data_service.service import LocalBatches, RayBatches, ServiceSpec  # noqa: E402
from data_service.synth import SynthConfig  # noqa: E402
from pretrain.run.plan import build_plan  # noqa: E402
from pretrain.run.config import RunConfig, load_config  # noqa: E402
from reader import build  # noqa: E402

GLOBAL_BATCH = 32


@dataclass
class Timing:
    """One timed pass: windows, seconds (wall and CPU) and what was delivered."""

    windows: int
    wall_s: float
    cpu_s: float
    input_tokens: int
    output_queries: int

    @property
    def rate(self) -> float:
        return self.windows / self.wall_s

    @property
    def cpu_rate(self) -> float:
        return self.windows / self.cpu_s


def timed(batches: Iterator, count: Callable[[object], tuple[int, int, int]]) -> Timing:
    """Pull the first batch untimed (setup), then time the rest; `count` -> (windows, tokens, queries)."""
    next(batches)
    n = tok = q = 0
    w0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        dn, dt, dq = count(b)
        n, tok, q = n + dn, tok + dt, q + dq
    return Timing(n, time.perf_counter() - w0, time.process_time() - c0, tok, q)


# ---- popscale ------------------------------------------------------------------------------------------
def popscale_spec(corpus: Path) -> tuple[RunConfig, ServiceSpec, list[str]]:
    """The data-service spec exactly as a training worker gets it (defaults, poyo-1.3M)."""
    run = load_config(None, [f"data.corpus={corpus}", f"data.global_batch={GLOBAL_BATCH}"])
    plan = build_plan(run)
    return run, plan.service_spec(), plan.sessions


def popscale_count(served) -> tuple[int, int, int]:
    b = served.data.to("cpu")  # what the trainer does with every batch it receives
    return b.size, len(b.unit_index), len(b.output_time)


def run_popscale(spec: ServiceSpec, n_batches: int, clear_cache: bool) -> Timing:
    loader = LocalBatches(spec, 0, 1)
    for d in loader.iterate(0, n_batches + 1):  # warm-up: page cache, index, tokenizer plans
        d.data.to("cpu")
    if clear_cache:
        shards.CACHE.clear()
    return timed(loader.iterate(0, n_batches + 1), popscale_count)


RAY_CPUS = 2


def run_ray(spec: ServiceSpec, n_batches: int, actors: int, cpus_per_actor: float) -> tuple[Timing, float]:
    """RayBatches on a 2-CPU local Ray; returns the timing and the CPUs its builder actors reserve."""
    import ray

    if actors * cpus_per_actor > RAY_CPUS - 1:
        # Ray Data's range-read tasks need a CPU of their own: actors holding every CPU wait forever
        raise SystemExit(f"--ray-actors x --ray-cpus-per-actor must leave 1 of the {RAY_CPUS} Ray CPUs free")
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        loader = RayBatches(spec, 0, 1, actors=actors, cpus_per_actor=cpus_per_actor)
        for d in loader.iterate(0, n_batches + 1):  # warm-up (actors start, page cache)
            d.data.to("cpu")
        t = timed(loader.iterate(0, n_batches + 1), popscale_count)
    finally:
        ray.shutdown()
    return t, actors * cpus_per_actor


# ---- torch_brain ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Readout:
    """What torch_brain's POYO example calls PoyoReadoutConfig: where the target is and how to weigh it."""

    timestamp_key: str = "hand.timestamps"
    value_key: str = "hand.vel"
    normalize_std: float = 20.0  # popscale's target_scale for hand_vel
    weights: tuple[tuple[str, float], ...] = (("reach", 5.0), ("hold", 0.1))


def tb_dataset_class():
    """A torch_brain Dataset for the synthetic sessions, written the way brainsets dataset classes are."""
    from torch_brain.data import SessionDescription
    from torch_brain.datasets import Dataset
    from torch_brain.datasets.mixins import SpikingDatasetMixin

    class SynthReaching(SpikingDatasetMixin, Dataset):
        # unit ids are already unique ("subject/session/unit"); brainsets classes such as
        # PerichMillerPopulation2018 prefix them with the session id on every get_recording, which
        # also turns HDF5's bytes into str; here that is done once at open (cheaper for torch_brain)
        spiking_dataset_mixin_uniquify_unit_ids = False

        def __init__(self, root: Path, recording_ids: list[str], transform: Callable | None = None) -> None:
            super().__init__(dataset_dir=root, recording_ids=recording_ids, transform=transform)
            for rid, data in self._data_objects.items():
                data.session = SessionDescription(id=rid)  # brainsets files carry this; bench/reader.py's do not
                data.units.id = np.asarray(data.units.id[:]).astype(str)  # the vocabulary is keyed by str

        def get_sampling_intervals(self, split: str | None = None) -> dict:
            key = "domain" if split is None else f"{split}_domain"
            return {rid: getattr(self.get_recording(rid), key) for rid in self.recording_ids}

        def get_recording_hook(self, data) -> None:
            super().get_recording_hook(data)
            data.readout_config = Readout()

    return SynthReaching


class PoyoSamples(torch.utils.data.Dataset):
    """(X, Y) per window as torch_brain's POYO example builds them: X = model.tokenize(window),
    Y = decoder query times, scaled targets, loss weights, masks (pad8 for its collate)."""

    def __init__(self, dataset, tokenize: Callable) -> None:
        self.dataset, self.tokenize = dataset, tokenize

    def __getitem__(self, index):
        from torch_brain.batching import pad8
        from torch_brain.utils import isin_interval

        data = self.dataset[index]
        x = self.tokenize(data)
        cfg = data.readout_config
        t = data.get_nested_attribute(cfg.timestamp_key)
        y = data.get_nested_attribute(cfg.value_key) / cfg.normalize_std
        w = np.ones(len(t), dtype=np.float32)
        for key, value in cfg.weights:
            w[isin_interval(t, data.get_nested_attribute(key))] *= value
        return x, dict(timestamps=pad8(t.astype(np.float32)), values=pad8(y.astype(np.float32)), weights=pad8(w),
                       output_mask=pad8(np.ones(len(t), dtype=bool)), eval_mask=pad8(np.ones(len(t), dtype=bool)),
                       session_id=data.session.id, absolute_start=data.absolute_start)


def tb_count(batch) -> tuple[int, int, int]:
    x, y = batch
    return len(x["session_index"]), int(x["input_mask"].sum()), int(y["output_mask"].sum())


def run_torch_brain(h5dir: Path, sessions: list[str], n_batches: int, run: RunConfig) -> Timing:
    from model import reference_model
    from torch_brain.batching import collate
    from torch_brain.samplers import RandomFixedWindowSampler
    from torch_brain.transforms import UnitDropout

    ds = tb_dataset_class()(h5dir, sessions, transform=UnitDropout(min_units=30, mode_units=100, max_units=300))
    model = reference_model(run.model_config(), ds.get_unit_ids(), ds.recording_ids)  # poyo-1.3M
    samples = PoyoSamples(ds, model.tokenize)
    intervals = ds.get_sampling_intervals("train")

    def loader() -> Iterator:
        """n_batches + 1 batches, epoch after epoch as a training loop would iterate the DataLoader."""
        np.random.seed(0)  # UnitDropout draws from numpy's global generator
        sampler = RandomFixedWindowSampler(sampling_intervals=intervals, window_length=model.sequence_length,
                                           generator=torch.Generator().manual_seed(0))
        dl = torch.utils.data.DataLoader(samples, sampler=sampler, batch_size=GLOBAL_BATCH, collate_fn=collate,
                                         num_workers=0, drop_last=True)
        left = n_batches + 1
        while left:
            for batch in dl:
                yield batch
                left -= 1
                if not left:
                    return

    for _ in loader():  # warm-up over the very windows timed below
        pass
    return timed(loader(), tb_count)


# ---- main ----------------------------------------------------------------------------------------------
SIDES = ("popscale", "popscale-warm", "torch_brain", "ray")


def one_side(a: argparse.Namespace, corpus: Path, h5dir: Path) -> Timing:
    """One timed pass of one pipeline, in this process (what `--side` runs)."""
    run, spec, sessions = popscale_spec(corpus)
    if a.side == "torch_brain":
        return run_torch_brain(h5dir, sessions, a.batches, run)
    if a.side == "ray":
        return run_ray(spec, a.batches, a.ray_actors, a.ray_cpus_per_actor)[0]
    return run_popscale(spec, a.batches, clear_cache=a.side == "popscale")


def spawn(side: str, a: argparse.Namespace) -> Timing:
    """One timed pass in a fresh process: neither pipeline runs on what the other left behind."""
    cmd = [sys.executable, __file__, "--side", side, "--sessions", str(a.sessions), "--minutes", str(a.minutes),
           "--subjects", str(a.subjects), "--batches", str(a.batches), "--ray-actors", str(a.ray_actors),
           "--ray-cpus-per-actor", str(a.ray_cpus_per_actor)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return Timing(**json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description="popscale data service vs torch_brain pipeline, windows/s per core")
    ap.add_argument("--quick", action="store_true", help="20 sessions x 2 min, 50 batches (< 1 min once built)")
    ap.add_argument("--sessions", type=int)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--subjects", type=int, default=8, help="(the 1,000-session comparison of issue 13: --sessions 1000 "
                    "--subjects 20 --minutes 6.5; building it takes ~10 min once, then it is reused)")
    ap.add_argument("--batches", type=int, help=f"timed batches of {GLOBAL_BATCH} windows per pipeline")
    ap.add_argument("--repeats", type=int, help="alternating (popscale cold, torch_brain) pairs timed; the median "
                    "pair is reported (default 3, --quick 1)")
    ap.add_argument("--ray", action="store_true", help="also measure RayBatches (starts a 2-CPU Ray)")
    ap.add_argument("--ray-actors", type=int, default=1)
    ap.add_argument("--ray-cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one timed pass, printed as JSON (spawn)
    a = ap.parse_args()
    a.sessions = a.sessions or (20 if a.quick else 200)
    a.minutes = a.minutes or (2.0 if a.quick else 10.0)
    a.batches = a.batches or (50 if a.quick else 150)
    a.repeats = max(1, a.repeats or (1 if a.quick else 3))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)

    # the same corpus bench/reader.py builds (shared directory: built once, reused by both benchmarks)
    cfg = SynthConfig(sessions=a.sessions, subjects=a.subjects, minutes=a.minutes, seed=0)
    tag = "" if a.subjects == 8 else f"-{a.subjects}subjects"
    corpus, h5dir = build(cfg, ROOT / "runs" / "bench" / f"reader-{a.sessions}x{a.minutes:g}min{tag}")
    if a.side:
        print(json.dumps(asdict(one_side(a, corpus, h5dir))))
        return
    _, _, sessions = popscale_spec(corpus)
    windows = a.batches * GLOBAL_BATCH
    print(f"{len(sessions)} sessions (popscale Zarr corpus and the same sessions as temporaldata HDF5), "
          f"{a.batches} timed batches x {GLOBAL_BATCH} = {windows} random 1 s train windows per pipeline; "
          f"one thread; every timed pass in a fresh process")

    # the machine is shared and its speed drifts by tens of percent within minutes: the two sides are
    # timed in alternation, `repeats` times, and the headline is the median of the paired ratios
    pairs = [(spawn("popscale", a), spawn("torch_brain", a)) for _ in range(a.repeats)]
    ratios = [c.rate / t.rate for c, t in pairs]
    mid = sorted(range(len(pairs)), key=lambda i: ratios[i])[len(pairs) // 2]
    cold, tb = pairs[mid]
    warm = spawn("popscale-warm", a)
    ray_row = None
    if a.ray:
        cpus = a.ray_actors * a.ray_cpus_per_actor
        ray_row = (f"popscale RayBatches ({a.ray_actors} actor(s) reserving {cpus:g} CPU; total, not per core)",
                   spawn("ray", a))
    assert cold.windows == warm.windows == tb.windows == windows, "both pipelines must deliver the same windows"

    print(f"{'pipeline':68s} {'windows/s/core':>14s} {'per CPU-s':>10s} {'vs baseline':>11s} "
          f"{'tokens/win':>10s} {'queries/win':>11s}")
    rows = [
        (f"popscale LocalBatches (decoded-chunk cache cleared first, {shards.CACHE.max_bytes >> 20} MB)", cold),
        ("popscale LocalBatches (decoded-chunk cache warm from the warm-up pass)", warm),
        ("torch_brain Dataset+UnitDropout+POYO.tokenize+collate (DataLoader)", tb),
    ]
    for name, t in rows:
        print(f"{name:68s} {t.rate:14.1f} {t.cpu_rate:10.1f} {t.rate / tb.rate:10.1f}x "
              f"{t.input_tokens / t.windows:10.0f} {t.output_queries / t.windows:11.0f}")
    if ray_row:
        name, t = ray_row
        print(f"{name:68s} {t.rate:14.1f} {'':>10s} {t.rate / tb.rate:10.1f}x "
              f"{t.input_tokens / t.windows:10.0f} {t.output_queries / t.windows:11.0f}")
    if len(pairs) > 1:
        print("alternating passes (popscale cold, torch_brain): " + "; ".join(
            f"{c.rate:.0f} vs {t.rate:.0f} = {c.rate / t.rate:.1f}x" for c, t in pairs) + " (the median pair is above)")
    print(f"popscale {cold.rate:.1f} windows/s/core vs torch_brain {tb.rate:.1f}: {cold.rate / tb.rate:.1f}x "
          f"(goal >= 10x; median of {len(pairs)} alternating pairs)")
    print(f"RESULT name=service_windows_per_s_per_core baseline=torch_brain ratio={cold.rate / tb.rate:.1f}")


if __name__ == "__main__":
    main()
