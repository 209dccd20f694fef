"""GPU checks in one run: attention backends against a float64 CPU reference on packed batches,
and bf16 training throughput, MFU and peak memory for two model sizes, fp32 beside it.

The GPU host has torch but not the data stack (no Zarr, Ray, DeepSpeed or MLflow), so batches
are made here first by the real tokenizer from a synthetic corpus and travel as one npz:

    python bench/gpu.py --prepare .gpu/batches.npz [--quick]     # on the CPU machine
    python bench/gpu.py --batches .gpu/batches.npz --out DIR      # on the GPU (or CPU: slow)

Correctness (model in eval mode, no dropout; ||out - ref|| / ||ref||, fresh random inputs):
- attention alone: each backend (sdpa; xformers where it imports) on packed q/k/v with the
  batch's own lengths (encoder cross-attention spikes -> latents, decoder outputs -> latents,
  latent self-attention), forward and the gradients of q, k, v, in fp32 and bf16, against the
  `naive` per-sample definition in float64 on the CPU;
- the whole model: predictions and parameter gradients of the weighted MSE, fp32 and bf16
  autocast on the device against the same weights in float64 on the CPU.
Throughput (training mode, dropouts on, AdamW with popscale's lazy embedding updates, batches
already on the device): samples/s as the median of interleaved rounds (each variant timed
once per round, rounds repeated), peak allocated memory over the timed steps, and MFU: the
analytic training FLOPs (pretrain/model/flops.py) over the time, against a bf16 matmul measured in
the same run and against the datasheet's dense bf16 rate (989 TFLOP/s for H100/H200 SXM).
bf16 is autocast with fp32 master weights.

Ends with `RESULT name=bf16_train_samples_per_s baseline=fp32 ratio=<bf16 / fp32 samples/s of
the first size, sdpa>`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pretrain.model.attention import get_backend, naive, xformers_available  # noqa: E402
from pretrain.model.batch import ARRAYS, LISTS, PackedBatch, concat  # noqa: E402
from pretrain.model.config import preset  # noqa: E402
from pretrain.model.flops import train_flops  # noqa: E402
from pretrain.model.loss import weighted_mse  # noqa: E402
from pretrain.model.poyo import POYO, count_parameters  # noqa: E402
from pretrain.run.optim import OptimConfig, build_optimizer  # noqa: E402

PRESETS = ("poyo-11.8M", "poyo-76M")
BATCH = {"poyo-11.8M": 256, "poyo-76M": 64}  # windows a step: the larger model's activations need ~0.5 GB a window in fp32
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12}
WINDOW_S = 1.0


# ---- batches: made on the CPU machine, read on the GPU ---------------------------------------------
def prepare(path: Path, quick: bool) -> None:
    """A synthetic corpus (sessions of 30-300 units), tokenized by the real tokenizer for each
    preset's latent grid, saved as one compressed npz with the vocabularies."""
    from data_service.reader import open_corpus
    from data_service.synth import SynthConfig, synth_corpus
    from pretrain.tokens.tokenizer import Tokenizer, TokenizerConfig

    corpus = ROOT / "runs" / "bench" / "gpu-corpus"
    if not (corpus / "manifest.json").exists():
        synth_corpus(SynthConfig(sessions=12, subjects=3, minutes=3, min_units=30, max_units=300, seed=7), corpus)
    c = open_corpus(corpus)
    ids = list(c.session_ids)
    units = [u for s in ids for u in c.session(s).unit_ids]
    batch, n_batches = (16, 2) if quick else (256, 3)
    rng = np.random.default_rng(0)
    starts = [[(str(sid), float(rng.uniform(c.session(sid).domain[0, 0], c.session(sid).domain[-1, 1] - WINDOW_S)))
               for sid in rng.choice(ids, batch)] for _ in range(n_batches)]
    out: dict[str, np.ndarray] = {"units": np.array(units), "sessions": np.array(ids)}
    for name in PRESETS:
        cfg = preset(name)
        model = POYO(cfg, units, ids)
        tok = Tokenizer(TokenizerConfig.build(cfg, window_s=WINDOW_S, target_scale={"hand_vel": 20.0}),
                        model.unit_emb, model.session_emb)
        for i, windows in enumerate(starts):
            b = concat([tok(c.session(s).read_window(t, t + WINDOW_S), c.session(s)) for s, t in windows])
            for k in ARRAYS:
                v = getattr(b, k)
                out[f"{name}/{i}/{k}"] = v.astype(np.int32) if v.dtype == np.int64 else v
            for k in LISTS:
                out[f"{name}/{i}/{k}"] = np.asarray(getattr(b, k))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    n_tok = sum(len(out[f"{PRESETS[0]}/{i}/unit_index"]) for i in range(n_batches))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB): {n_batches} batches of {batch} windows, "
          f"{n_tok / (n_batches * batch):.0f} input tokens a window")


def load(path: Path) -> tuple[list[str], list[str], dict[str, list[PackedBatch]]]:
    z = np.load(path)
    units, ids = [str(u) for u in z["units"]], [str(s) for s in z["sessions"]]
    batches: dict[str, list[PackedBatch]] = {}
    for name in PRESETS:
        i = 0
        while f"{name}/{i}/unit_index" in z:
            arrays = {k: z[f"{name}/{i}/{k}"] for k in ARRAYS}
            arrays = {k: v.astype(np.int64) if v.dtype == np.int32 else v for k, v in arrays.items()}
            lists = {k: z[f"{name}/{i}/{k}"].tolist() for k in LISTS}
            batches.setdefault(name, []).append(PackedBatch(**arrays, **lists))
            i += 1
    return units, ids, batches


# ---- correctness -----------------------------------------------------------------------------------
def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def backend_names(device: torch.device) -> list[str]:
    return ["sdpa"] + (["xformers"] if device.type == "cuda" and xformers_available() else [])


def check_attention(b: PackedBatch, device: torch.device, heads: int = 8, dim_head: int = 64) -> list[dict]:
    """Each backend against `naive` in float64 on the CPU, forward and q/k/v gradients."""
    shapes = {"encoder (latents <- spikes)": (b.latent_lens, b.input_lens),
              "decoder (outputs <- latents)": (b.output_lens, b.latent_lens),
              "processor (latents <- latents)": (b.latent_lens, b.latent_lens)}
    rows = []
    g = torch.Generator().manual_seed(1)
    for what, (q_lens, k_lens) in shapes.items():
        tq, tk = sum(q_lens), sum(k_lens)
        q, k, v = (torch.randn(n, heads, dim_head, generator=g, dtype=torch.float64) for n in (tq, tk, tk))
        grad_out = torch.randn(tq, heads, dim_head, generator=g, dtype=torch.float64)
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = naive(*ref_in, q_lens, k_lens)
        ref.backward(grad_out)
        for name in backend_names(device):
            backend = get_backend(name, device)
            for dtype in (torch.float32, torch.bfloat16):
                xs = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
                try:
                    out = backend(*xs, q_lens, k_lens)
                    out.backward(grad_out.to(device, dtype))
                except Exception as e:  # noqa: BLE001 - reported as a row, the other checks still run
                    print(f"attention {what} {name} {dtype}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                rows.append({"check": f"attention {what}", "backend": name, "dtype": str(dtype).split(".")[-1],
                             "out": rel(out, ref), "dq": rel(xs[0].grad, ref_in[0].grad),
                             "dk": rel(xs[1].grad, ref_in[1].grad), "dv": rel(xs[2].grad, ref_in[2].grad),
                             "tokens": f"{tq} x {tk}"})
    return rows


def check_model(name: str, units, ids, b: PackedBatch, device: torch.device) -> list[dict]:
    """The whole model's predictions and gradients on one packed batch against float64 on the CPU."""
    cfg = preset(name, backend="sdpa")
    torch.manual_seed(0)
    ref_model = POYO(cfg, units, ids).double().eval()
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in ref_model.state_dict().items()}
    cpu_b = b.to("cpu")
    ref_b = PackedBatch(**{k: (v.double() if v.is_floating_point() else v) for k, v in
                           ((k, getattr(cpu_b, k)) for k in ARRAYS)}, **{k: getattr(cpu_b, k) for k in LISTS})
    loss, _ = weighted_mse(ref_model(ref_b), ref_b, ref_model.readout_names)
    ref_pred = ref_model(ref_b)[ref_model.readout_names[0]].detach()
    loss.backward()
    ref_grads = torch.cat([p.grad.flatten() for p in ref_model.parameters() if p.grad is not None])
    rows = []
    db = b.to(device)
    for backend in backend_names(device):
        model = POYO(preset(name, backend=backend), units, ids, device=device).eval()
        model.load_state_dict(state)
        for dtype in (torch.float32, torch.bfloat16):
            model.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                preds = model(db)
                loss, _ = weighted_mse(preds, db, model.readout_names)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            rows.append({"check": f"model {name}", "backend": backend, "dtype": str(dtype).split(".")[-1],
                         "out": rel(preds[model.readout_names[0]], ref_pred), "grads": rel(grads, ref_grads),
                         "tokens": f"{len(b.unit_index)} in {b.size} windows"})
    return rows


# ---- throughput ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, n: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul (median of timed repeats after warm-up), random data."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


class Variant:
    """One (size, precision, backend) training setup, kept alive across rounds."""

    def __init__(self, name: str, dtype: str, backend: str, units, ids, batches: list[PackedBatch],
                 device: torch.device) -> None:
        self.name, self.dtype, self.backend, self.device = name, dtype, backend, device
        torch.manual_seed(0)
        self.cfg = preset(name, backend=backend)
        self.model = POYO(self.cfg, units, ids, device=device).train()
        self.opt = build_optimizer(self.model, OptimConfig(lr=1e-4))
        self.data = [b.to(device) for b in batches]
        n_lat = len(batches[0].latent_index) // batches[0].size
        self.flops = [sum(train_flops(self.cfg, i, o, n_lat) for i, o in zip(b.input_lens, b.output_lens))
                      for b in batches]
        self.samples = [b.size for b in batches]
        self.times: list[float] = []
        self.rates: list[float] = []
        self.peak_gb = 0.0
        self.step_gb = 0.0
        self.losses: list[float] = []

    def step(self, b: PackedBatch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            loss, _ = weighted_mse(self.model(b), b, self.model.readout_names)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def run(self, steps: int, warmup: int) -> None:
        for i in range(warmup):
            self.step(self.data[i % len(self.data)])
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        t = time.perf_counter()
        flops = samples = 0
        losses = []
        for i in range(steps):
            j = i % len(self.data)
            losses.append(self.step(self.data[j]))
            flops, samples = flops + self.flops[j], samples + self.samples[j]
        sync(self.device)
        dt = time.perf_counter() - t
        self.times.append(dt)
        self.rates.append(samples / dt)
        self.achieved = flops / dt
        self.losses = [float(x) for x in losses]
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_gb = max(self.peak_gb, peak / 2**30)
            self.step_gb = max(self.step_gb, (peak - before) / 2**30)

    @property
    def samples_per_s(self) -> float:
        return statistics.median(self.rates)

    @property
    def flops_per_s(self) -> float:
        return statistics.median(self.rates) / (sum(self.samples) / len(self.samples)) * \
            (sum(self.flops) / len(self.flops))


def profile_top(v: Variant, n: int = 25) -> str:
    """Device time per kernel over two steps (torch.profiler), the top n."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if v.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for b in v.data[:2]:
            v.step(b)
        sync(v.device)
    key = "self_cuda_time_total" if v.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n)


# ---- report ----------------------------------------------------------------------------------------
def fmt(x: float | None) -> str:
    return "-" if x is None else "nan" if not math.isfinite(x) else f"{x:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small batches, one size, few steps")
    ap.add_argument("--prepare", type=Path, help="write the batches npz here (on the CPU machine) and stop")
    ap.add_argument("--batches", type=Path, default=ROOT / ".gpu" / "batches.npz")
    ap.add_argument("--out", type=Path, help="write results.json and profile.txt here")
    ap.add_argument("--steps", type=int, help="timed steps a round")
    ap.add_argument("--rounds", type=int, help="interleaved rounds")
    a = ap.parse_args()
    if a.prepare:
        prepare(a.prepare, a.quick)
        return
    if not a.batches.exists():
        prepare(a.batches, a.quick)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    xf = xformers_available() if device.type == "cuda" else False
    xf_version = None
    if xf:
        import xformers
        xf_version = xformers.__version__
    print(f"device {dev_name}; torch {torch.__version__}; xformers {xf_version or 'not available'}", flush=True)
    units, ids, batches = load(a.batches)
    presets = PRESETS[:1] if a.quick else PRESETS
    b0 = batches[PRESETS[0]][0]
    # correctness on 16 windows (float64 on the CPU is the slow side)
    few = _first_windows(b0, 16 if not a.quick else 4)
    checks = check_attention(few, device) + check_model(PRESETS[0], units, ids, few, device)
    print(f"\ncorrectness: ||x - float64 CPU reference|| / ||reference||  ({time.perf_counter() - t0:.0f} s)")
    print(f"{'check':36s} {'backend':9s} {'dtype':9s} {'out':>8s} {'dq|param':>9s} {'dk':>8s} {'dv':>8s}  tokens")
    for r in checks:
        print(f"{r['check']:36s} {r['backend']:9s} {r['dtype']:9s} {fmt(r['out']):>8s} "
              f"{fmt(r.get('dq', r.get('grads'))):>9s} {fmt(r.get('dk')):>8s} {fmt(r.get('dv')):>8s}  {r['tokens']}", flush=True)

    ceiling = matmul_ceiling(device, 8192 if device.type == "cuda" else 1024)
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in dev_name), None)
    steps = a.steps or (2 if a.quick else 6)
    rounds = a.rounds or (1 if a.quick else 3)
    variants = []
    for name in presets:
        data = [_first_windows(b, 4 if a.quick else BATCH[name]) for b in batches[name]]
        for dtype, backend in [("fp32", "sdpa"), ("bf16", "sdpa")] + ([("bf16", "xformers")] if xf else []):
            variants.append(Variant(name, dtype, backend, units, ids, data, device))
    for r in range(rounds):
        for v in variants:
            try:
                v.run(steps, warmup=2 if r == 0 else 0)
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, the rest still run
                v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"{v.name} {v.dtype} {v.backend}: {v.error}", flush=True)
        print(f"round {r + 1}/{rounds} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    variants = [v for v in variants if v.rates]
    print(f"\ntraining: batch {variants[0].samples[0]} windows of {WINDOW_S:g} s, {steps} timed steps x {rounds} "
          f"interleaved rounds (median), batches on the device; bf16 matmul ceiling measured "
          f"{ceiling / 1e12:.0f} TFLOP/s" + (f", datasheet {datasheet / 1e12:.0f}" if datasheet else ""))
    print(f"{'preset':11s} {'params':>7s} {'dtype':5s} {'backend':9s} {'samples/s':>10s} {'rounds':>18s} "
          f"{'TFLOP/s':>8s} {'MFU meas.':>9s} {'MFU sheet':>9s} {'peak GB':>8s} {'step GB':>8s} {'loss':>7s}")
    rows = []
    for v in variants:
        fl = v.flops_per_s
        row = {"preset": v.name, "params_m": count_parameters(v.model) / 1e6, "dtype": v.dtype, "backend": v.backend,
               "samples_per_s": v.samples_per_s, "rounds": v.rates, "tflops": fl / 1e12, "mfu_measured": fl / ceiling,
               "mfu_datasheet": fl / datasheet if datasheet else None, "peak_gb": v.peak_gb, "step_gb": v.step_gb,
               "last_loss": v.losses[-1]}
        rows.append(row)
        print(f"{v.name:11s} {row['params_m']:6.1f}M {v.dtype:5s} {v.backend:9s} {v.samples_per_s:10.1f} "
              f"{'/'.join(f'{x:.0f}' for x in v.rates):>18s} {fl / 1e12:8.2f} {fl / ceiling:9.1%} "
              f"{(fl / datasheet if datasheet else float('nan')):9.1%} {v.peak_gb:8.2f} {v.step_gb:8.2f} "
              f"{v.losses[-1]:7.3f}")
    profile = ""
    if a.out:
        main_v = next(v for v in variants if v.dtype == "bf16")
        profile = profile_top(main_v)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "profile.txt").write_text(f"{main_v.name} {main_v.dtype} {main_v.backend}\n{profile}")
        (a.out / "results.json").write_text(json.dumps(
            {"device": dev_name, "torch": torch.__version__, "xformers": xf_version, "matmul_ceiling": ceiling,
             "checks": checks, "training": rows}, indent=1))
        print("\n" + "\n".join(profile.splitlines()[:18]))
    fp32 = next(v for v in variants if v.name == presets[0] and v.dtype == "fp32")
    bf16 = next(v for v in variants if v.name == presets[0] and v.dtype == "bf16" and v.backend == "sdpa")
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(f"RESULT name=bf16_train_samples_per_s baseline=fp32 ratio={bf16.samples_per_s / fp32.samples_per_s:.2f}")


def _first_windows(b: PackedBatch, n: int) -> PackedBatch:
    """The first n windows of a packed batch."""
    if n >= b.size:
        return b
    cut = {w: int(sum(getattr(b, f"{w}_lens")[:n])) for w in ("input", "latent", "output")}
    field_of = {"unit_index": "input", "input_time": "input", "token_type": "input", "latent_index": "latent",
                "latent_time": "latent", "output_time": "output", "output_readout": "output",
                "output_session": "output", "target": "output", "weight": "output"}
    return PackedBatch(**{k: getattr(b, k)[: cut[field_of[k]]] for k in ARRAYS},
                       **{k: list(getattr(b, k))[:n] for k in LISTS})


if __name__ == "__main__":
    main()
