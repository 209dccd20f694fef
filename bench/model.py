"""Training throughput and memory: popscale's packed POYO vs torch_brain's padded POYO.

Same configuration (poyo-11.8M: dim 128, depth 24, 4/8 heads, 32 latents/step, dropouts
0.2/0.4/0.2), same windows (random 1 s windows from a synthetic corpus whose sessions have
30-300 units, so a batch mixes session sizes), same loss (weighted MSE) and optimizer (AdamW,
with popscale's lazy embedding updates), 2 threads. torch_brain gets the very same tokens,
padded and masked the way its `collate` pads them (to a multiple of 8).

Throughput: training samples/s (forward + backward + step) after a warm-up step.
Memory: each variant runs in a fresh process; once model, optimizer and batches are built the
peak-RSS counter is reset, and the figure is the peak over the warm-up and timed steps minus the
RSS before them: what training needs on top of the model and the data (activations, gradients,
optimizer state; the last is the same for both).

Achieved FLOP/s: the analytical training FLOPs of the timed batches (`pretrain/model/flops.py`: the
matmuls of every projection, attention and feed-forward, x3 for forward + backward; popscale's
packed tokens for both, so padding the reference computes is not counted as work) over the timed
seconds, beside an fp32 matmul of the model's own shape ([4096, dim] @ [dim, 8 dim]) measured in
the same run, same threads: the rate this CPU reaches at these dimensions.

`--profile`: where popscale's step goes (torch.profiler over the timed steps, self CPU time per
group: projections and feed-forward matmuls, attention kernel (its matmuls, softmax, dropout
masks), elementwise (rotary, GEGLU, dropout, residuals), layer norms, optimizer, other).

    python bench/model.py [--quick] [--preset poyo-11.8M] [--batch 16] [--steps 3] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_service.reader import open_corpus  # noqa: E402
from data_service.synth import SynthConfig, synth_corpus  # noqa: E402
from pretrain.model.batch import concat  # noqa: E402
from pretrain.model.config import preset  # noqa: E402
from pretrain.model.flops import train_flops  # noqa: E402
from pretrain.model.loss import weighted_mse  # noqa: E402
from pretrain.model.poyo import POYO, count_parameters  # noqa: E402
from pretrain.run.optim import OptimConfig, build_optimizer  # noqa: E402
from pretrain.tokens.tokenizer import Tokenizer, TokenizerConfig  # noqa: E402

CORPUS = ROOT / "runs" / "bench" / "model-corpus"
WINDOW_S = 1.0  # seconds per sample, both models


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Linux >= 4.0: make VmHWM (peak RSS) start again from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(preset_name: str, batch: int, steps: int, seed: int = 0):
    """The corpus (made once), our model + tokenizer, and steps+1 batches of tokenized samples."""
    if not (CORPUS / "manifest.json").exists():
        synth_corpus(SynthConfig(sessions=12, subjects=3, minutes=3, min_units=30, max_units=300, seed=7), CORPUS)
    c = open_corpus(CORPUS)
    ids = c.session_ids
    cfg = preset(preset_name)
    units = [u for s in ids for u in c.session(s).unit_ids]
    model = POYO(cfg, units, ids)
    tok = Tokenizer(TokenizerConfig.build(cfg, window_s=WINDOW_S, target_scale={"hand_vel": 20.0}),
                    model.unit_emb, model.session_emb)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps + 1):
        samples = []
        for sid in rng.choice(ids, batch):
            r = c.session(sid)
            t0 = float(rng.uniform(r.domain[0, 0], r.domain[-1, 1] - WINDOW_S))
            samples.append(tok(r.read_window(t0, t0 + WINDOW_S), r))  # one window: a batch of one
        batches.append(samples)
    return cfg, model, units, ids, batches


def reference_model(cfg, units, ids):
    from torch_brain.models import POYO as TBPOYO

    m = TBPOYO(sequence_length=WINDOW_S, latent_step=cfg.latent_step, num_latents_per_step=cfg.latents_per_step,
               dim_out=2, dim=cfg.dim, depth=cfg.depth, dim_head=cfg.dim_head, cross_heads=cfg.cross_heads,
               self_heads=cfg.self_heads, ffn_dropout=cfg.ffn_dropout, lin_dropout=cfg.lin_dropout,
               atn_dropout=cfg.atn_dropout, emb_init_scale=cfg.emb_init_scale, t_min=cfg.t_min, t_max=cfg.t_max)
    m.unit_emb.initialize_vocab(list(units))
    m.session_emb.initialize_vocab(list(ids))
    return m


def reference_inputs(samples, units, ids, model) -> dict:
    """The same tokens, padded like torch_brain's collate (pad8 + masks)."""
    unit_map = np.asarray(model.unit_emb.tokenizer(list(units)))  # our global index -> theirs
    sess_map = np.asarray(model.session_emb.tokenizer(list(ids)))

    def pad(arrays, dtype, fill=0):
        n = max(len(a) for a in arrays)
        n = (n + 7) // 8 * 8
        out = np.full((len(arrays), n, *arrays[0].shape[1:]), fill, dtype=dtype)
        mask = np.zeros((len(arrays), n), dtype=bool)
        for i, a in enumerate(arrays):
            out[i, : len(a)] = a
            mask[i, : len(a)] = True
        return torch.from_numpy(out), torch.from_numpy(mask)

    ui, in_mask = pad([unit_map[s.unit_index] for s in samples], np.int64)
    it, _ = pad([s.input_time for s in samples], np.float32)
    tt, _ = pad([s.token_type for s in samples], np.int64)
    ot, out_mask = pad([s.output_time for s in samples], np.float32)
    y, _ = pad([s.target for s in samples], np.float32)
    w, _ = pad([s.weight for s in samples], np.float32)
    return dict(inputs=dict(
        input_unit_index=ui, input_timestamps=it, input_token_type=tt, input_mask=in_mask,
        latent_index=torch.from_numpy(np.stack([s.latent_index for s in samples])),
        latent_timestamps=torch.from_numpy(np.stack([s.latent_time for s in samples])),
        session_index=torch.from_numpy(sess_map[[ids.index(s.session_ids[0]) for s in samples]]),
        output_timestamps=ot, output_mask=out_mask), target=y, weight=w, mask=out_mask)


def run(variant: str, preset_name: str, batch: int, steps: int, profile: bool = False) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg, model, units, ids, batches = setup(preset_name, batch, steps)
    if variant == "popscale":
        data = [concat(b).to("cpu") for b in batches]
        opt = build_optimizer(model, OptimConfig(lr=1e-4))

        def step(b):
            loss, _ = weighted_mse(model(b), b, model.readout_names)
            opt.zero_grad()
            loss.backward()
            opt.step()
        tokens = sum(sum(b.input_lens) for b in data[1:])
        slots = tokens
        n_lat = len(data[0].latent_index) // batch
        flops = sum(sum(train_flops(cfg, i, o, n_lat) for i, o in zip(b.input_lens, b.output_lens)) for b in data[1:])
    else:
        model = reference_model(cfg, units, ids)
        data = [reference_inputs(b, units, ids, model) for b in batches]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(d):
            out = model(**d["inputs"])
            err = (out - d["target"]).pow(2).mean(-1) * d["weight"] * d["mask"]
            loss = err.sum() / (d["weight"] * d["mask"]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        tokens = sum(int(d["inputs"]["input_mask"].sum()) for d in data[1:])
        slots = sum(d["inputs"]["input_mask"].numel() for d in data[1:])
        ours = [concat(b) for b in batches[1:]]  # the same work, counted on the unpadded tokens
        n_lat = len(ours[0].latent_index) // batch
        flops = sum(sum(train_flops(cfg, i, o, n_lat) for i, o in zip(b.input_lens, b.output_lens)) for b in ours)
    model.train()
    before = rss_mb()
    reset_peak_rss()
    step(data[0])  # warm-up (also builds optimizer state)
    t = time.perf_counter()
    for d in data[1:]:
        step(d)
    dt = time.perf_counter() - t
    peak = peak_rss_mb()
    out = {"variant": variant, "samples_per_s": batch * steps / dt, "peak_mb": peak, "step_mb": peak - before,
           "params": count_parameters(model) if variant == "popscale" else None,
           "input_tokens": tokens, "input_slots": slots, "gflops": flops / dt / 1e9,
           "matmul_gflops": matmul_rate(cfg.dim)}
    if profile and variant == "popscale":
        out["profile"] = profile_steps(step, data[1:])
    return out


def matmul_rate(dim: int, rows: int = 4096, reps: int = 30) -> float:
    """GFLOP/s of an fp32 [rows, dim] @ [dim, 8 dim] matmul (a feed-forward's input projection)
    on this process's threads: the roof the model's own shapes allow on this CPU."""
    a, b = torch.randn(rows, dim), torch.randn(dim, 8 * dim)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * rows * dim * 8 * dim * reps / (time.perf_counter() - t) / 1e9


# op name -> group, for --profile (self CPU time; autograd Functions' own time is their Python and numpy work)
GROUPS = [
    ("attention kernel", ("_PackedDropoutAttention", "aten::bmm", "aten::_softmax", "aten::ge", "aten::addcmul_",
                          "aten::_scaled_dot_product", "aten::_softmax_backward")),
    ("projection + feed-forward matmuls", ("aten::mm", "aten::addmm")),
    ("GEGLU (+ its dropout)", ("_GegluDropout", "aten::gelu", "aten::gelu_backward")),
    ("layer norms", ("aten::native_layer_norm",)),
    ("optimizer", ("Optimizer.step", "aten::_foreach", "aten::lerp", "aten::addcdiv", "aten::sqrt")),
    ("elementwise and copies (rotary, dropout, residuals, masks to float)", ("aten::mul", "aten::copy_", "aten::add",
                                                                             "aten::_to_copy", "aten::cat", "_Dropout")),
]


def profile_steps(step, data) -> list[tuple[str, float]]:
    """Seconds of self CPU time per group over the given steps (summed over threads' ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for d in data:
            step(d)
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        group = next((g for g, keys in GROUPS if any(e.key.startswith(k) for k in keys)), "other")
        totals[group] = totals.get(group, 0.0) + e.self_cpu_time_total / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--preset", default="poyo-11.8M")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--profile", action="store_true", help="also break popscale's step down by op group")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    batch = a.batch or (4 if a.quick else 16)
    steps = a.steps or (1 if a.quick else 3)
    if a.worker:
        print(json.dumps(run(a.worker, a.preset, batch, steps, a.profile)))
        return
    res = {}
    for variant in ("popscale", "torch_brain"):
        p = subprocess.run([sys.executable, __file__, "--worker", variant, "--preset", a.preset, "--batch", str(batch),
                            "--steps", str(steps)] + (["--profile"] if a.profile else []), capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if p.returncode != 0:
            sys.exit(f"{variant} failed:\n{p.stderr[-3000:]}")
        res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    ours, ref = res["popscale"], res["torch_brain"]
    print(f"{a.preset} ({ours['params'] / 1e6:.2f} M parameters without vocabularies), batch {batch}, {steps} timed "
          f"step(s), 2 threads; input tokens {ours['input_tokens']:,} (torch_brain pads them to "
          f"{ref['input_slots']:,} slots: {1 - ref['input_tokens'] / ref['input_slots']:.0%} padding)")
    print(f"{'':28s} {'samples/s':>10s} {'step peak MB':>13s} {'process peak MB':>16s}")
    for name, r in (("popscale (packed)", ours), ("torch_brain POYO (padded)", ref)):
        print(f"{name:28s} {r['samples_per_s']:10.2f} {r['step_mb']:13.0f} {r['peak_mb']:16.0f}")
    for name, r in (("popscale", ours), ("torch_brain", ref)):
        print(f"{name}: {r['gflops']:.1f} GFLOP/s achieved (analytical training FLOPs of the unpadded tokens) vs "
              f"{r['matmul_gflops']:.1f} GFLOP/s for an fp32 [4096, {preset(a.preset).dim}] @ "
              f"[{preset(a.preset).dim}, {8 * preset(a.preset).dim}] matmul in the same process: "
              f"{r['gflops'] / r['matmul_gflops']:.0%} of it")
    if "profile" in ours:
        total = sum(sec for _, sec in ours["profile"])
        print(f"where popscale's {steps} timed step(s) go (self CPU time, {total:.1f} s over both threads):")
        for group, sec in ours["profile"]:
            print(f"  {group:70s} {sec:7.2f} s {sec / total:6.1%}")
    print(f"throughput ratio {ours['samples_per_s'] / ref['samples_per_s']:.2f}x (goal >= 2.5x); "
          f"step memory ratio {ours['step_mb'] / ref['step_mb']:.2f} (goal <= 0.5)")
    print(f"RESULT name=train_samples_per_s baseline=torch_brain-POYO ratio={ours['samples_per_s'] / ref['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
