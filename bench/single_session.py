"""How fast POYO learns one real session from scratch: validation R² against steps and training
time for a base recipe and ablations one factor at a time around it.

Three stages, so that the training can run where the data stack's cluster parts are missing (a
lent GPU has torch but no Ray, DeepSpeed or MLflow):

    python bench/single_session.py prepare OUT --corpus C --sessions m1_stevenson_2011,s1_data \
        [--base configs/demo.yaml] [--variants base,lr=5e-3,...] [--steps 2000] [--seeds 0]
    python bench/single_session.py train OUT [--device cuda] [--jobs 12] [--corpus C]
    python bench/single_session.py baselines OUT --corpus C --sessions ... --seeds 0,1   # ridge, GRU
    python bench/single_session.py report OUT
    python bench/single_session.py --quick        # all three on one session, two variants, 30 steps

`prepare` builds every (session, variant, seed) run plan here (target statistics, the ridge warm
start): the very plan `popscale pretrain` would build. `train` runs each plan through the
project's own loop (`loop.run_loop`, `TrainStep`, the in-process data service, the stitched
evaluator on the valid split) with a plain-torch engine in place of DeepSpeed's: on one rank
ZeRO-1 is a plain optimizer step, so only the wrapper differs (gradient clipping, AdamW/LAMB with
lazy embedding rows, warmup + cosine, all from the plan). Training time excludes validation.
Model selection is on valid only; `--test` also scores test once at the best validation step (for
the final recipe, not for the screen). Results: OUT/results.jsonl, one JSON line a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# one factor at a time around the base; a variant is a list of run-config overrides
LAMB = ["train.optim.algo=lamb", "train.optim.lr=0.004"]
NO_UNIT_DROPOUT = ["data.augment.unit_dropout=false"]
WINDOW_2S = ["data.window_s=2.0"]
DEPTH_2 = ["model_overrides.depth=2"]
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "steps=6000": ["train.steps=6000"],
    "steps=1000": ["train.steps=1000"],
    "lr=1e-3": ["train.optim.lr=0.001"],
    "lr=5e-3": ["train.optim.lr=0.005"],
    "lr=1e-2": ["train.optim.lr=0.01"],
    "constant-lr": ["train.final_lr_ratio=1.0"],
    "lamb-4e-3": LAMB,
    "batch=8": ["data.global_batch=8"],
    "batch=32": ["data.global_batch=32"],
    "batch=64": ["data.global_batch=64"],
    "window=0.5s": ["data.window_s=0.5"],
    "window=2s": WINDOW_2S,
    "latents=8": ["model_overrides.latents_per_step=8"],
    "latents=32": ["model_overrides.latents_per_step=32"],
    "dim=128": ["model_overrides.dim=128"],
    "depth=2": DEPTH_2,
    "depth=12": ["model_overrides.depth=12"],
    "no-unit-dropout": NO_UNIT_DROPOUT,
    "no-warm-start": ["train.warm_start.method=none"],
    "no-locality": ["model_overrides.locality=0.0"],
    "t_min=1e-4": ["model_overrides.t_min=0.0001"],
    "t_min=0.05": ["model_overrides.t_min=0.05"],
    "dropout-ref": ["model_overrides.ffn_dropout=0.2", "model_overrides.lin_dropout=0.4",
                    "model_overrides.atn_dropout=0.2"],
    "wd=1e-2": ["train.optim.weight_decay=0.01"],
    # combinations of the factors that helped one at a time
    "lamb+window=2s": LAMB + WINDOW_2S,
    "lamb+window=2s+depth=2": LAMB + WINDOW_2S + DEPTH_2,
    "lamb+no-unit-dropout": LAMB + NO_UNIT_DROPOUT,
    "lamb+no-unit-dropout+depth=2": LAMB + NO_UNIT_DROPOUT + DEPTH_2,
    "lamb+window=2s+no-unit-dropout": LAMB + WINDOW_2S + NO_UNIT_DROPOUT,
    "lamb+window=2s+no-unit-dropout+depth=2": LAMB + WINDOW_2S + NO_UNIT_DROPOUT + DEPTH_2,
}


# ---- prepare (here: needs the corpus and the data stack) -------------------------------------------------
def prepare(out: Path, corpus: str, sessions: list[str], base: str, variants: list[str], steps: int,
            eval_every: int, seeds: list[int]) -> None:
    from pretrain.run.plan import build_plan
    from pretrain.run.config import load_config

    for s in sessions:
        for v in variants:
            extra = VARIANTS[v] if v in VARIANTS else [x for x in v.split("=", 1)[1].split(";")]
            for seed in seeds:
                d = out / "plans" / s / f"{v}-s{seed}"
                if (d / "plan.json").exists():
                    continue
                cfg = load_config(ROOT / base, [
                    f"data.corpus={Path(corpus).resolve()}", "data.synth=null", "data.loader=local",
                    f"data.sessions=[{s}]", f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 20)}",
                    f"train.eval_every={eval_every}", f"train.checkpoint_every={steps}", f"train.seed={seed}",
                    f"data.seed={seed}", *extra])
                plan = build_plan(cfg)
                d.mkdir(parents=True, exist_ok=True)
                plan.save(d)
                (d / "variant.json").write_text(json.dumps({"session": s, "variant": v, "seed": seed, "base": base,
                                                            "overrides": extra}))
                print(f"planned {s} {v} seed {seed}", flush=True)


# ---- train (anywhere torch is: the plain engine) ---------------------------------------------------------
class PlainEngine:
    """What the loop asks of DeepSpeed's engine, on one rank: module, forward, backward, and a step
    that clips, steps the optimizer and the LR schedule, and zeroes the gradients."""

    def __init__(self, plan, device: torch.device) -> None:
        from pretrain.run.build import build_model
        from pretrain.run.optim import build_optimizer, warmup_cosine

        t = plan.run.train
        torch.manual_seed(t.seed)
        self.module = build_model(plan, device)
        self.optimizer = build_optimizer(self.module, t.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, t.steps, t.warmup_steps, t.final_lr_ratio))
        self.clip = t.grad_clip
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def train(self) -> None:
        self.module.train()

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


class NoCheckpoints:
    last_step = 0

    def restore(self) -> int:
        return 0

    def save(self, step: int, metrics: dict) -> None:
        pass


class Curve:
    """The loop's evaluator: stitched valid R² (pretrain.decoding.evaluate, no plots), the training time so
    far (validation excluded), and the best state by valid R²."""

    def __init__(self, plan, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self.tokenizer = plan.make_tokenizer()
        self.points: list[dict] = []
        self.best, self.best_step, self.state = -np.inf, 0, None
        self.t0, self.paused = time.perf_counter(), 0.0

    def __call__(self, model, step: int, sink) -> dict[str, float]:
        from data_service.reader import open_corpus
        from pretrain.decoding.evaluate import evaluate

        t = time.perf_counter()
        train_s = t - self.t0 - self.paused
        res = evaluate(model, self.tokenizer, open_corpus(self.plan.corpus), self.plan.valid_sessions, "valid",
                       device=self.device)
        r2 = float(np.mean([r.r2 for r in res.values()])) if res else float("nan")
        self.points.append({"step": step, "valid_r2": r2, "train_s": train_s})
        if np.isfinite(r2) and r2 > self.best:
            self.best, self.best_step = r2, step
            self.state = {k: v.detach().clone() if hasattr(v, "detach") else v for k, v in model.state_dict().items()}
        self.paused += time.perf_counter() - t
        return {"valid_r2": r2}


def train_one(plan_dir: Path, device: str, corpus: str | None, threads: int, test: bool) -> dict:
    from data_service.service import LocalBatches
    from pretrain.run.loop import Dist, TrainStep, run_loop
    from pretrain.run.plan import RunPlan
    from pretrain.run.sinks import MemorySink

    torch.set_num_threads(threads)
    plan = RunPlan.load(plan_dir)
    if corpus:
        plan.run.data.corpus = str(Path(corpus).resolve())
    dev = torch.device(device)
    engine = PlainEngine(plan, dev)
    dist = Dist(0, 1, dev)
    step = TrainStep(engine, engine.scheduler, dist, plan.run.train.seed, [r.kind for r in plan.tokenizer.readouts])
    curve = Curve(plan, dev)
    sink = MemorySink()
    t0 = time.perf_counter()
    run_loop(plan, step, LocalBatches(plan.service_spec(), 0, 1), curve, NoCheckpoints(), sink, dist)
    out = {**json.loads((plan_dir / "variant.json").read_text()), "device": _device_name(dev),
           "threads": threads, "steps": plan.run.train.steps, "batch": plan.run.data.global_batch,
           "curve": curve.points, "best_valid_r2": curve.best, "best_step": curve.best_step,
           "wall_s": time.perf_counter() - t0, "train_s": curve.points[-1]["train_s"] if curve.points else None,
           "final_loss": sink.series("train_loss")[-1][1] if sink.series("train_loss") else None}
    if test and curve.state is not None:
        from data_service.reader import open_corpus
        from pretrain.decoding.evaluate import evaluate

        engine.module.load_state_dict(curve.state)
        engine.module.eval()
        res = evaluate(engine.module, curve.tokenizer, open_corpus(plan.corpus), plan.sessions, "test", device=dev)
        out["test_r2"] = float(np.mean([r.r2 for r in res.values()])) if res else float("nan")
        if len(res) == 1:  # the bootstrap interval over test trials / blocks (pretrain.decoding.metrics)
            out["test_ci"] = [float(x) for x in next(iter(res.values())).ci]
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores)"


def train_all(out: Path, device: str, jobs: int, corpus: str | None, threads: int, test: bool,
              budget_s: float | None, results: Path | None = None) -> None:
    """Every plan not yet in results.jsonl, `jobs` processes at a time, each appending its line."""
    results = results or out / "results.jsonl"
    done = set()
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["session"], r["variant"], r["seed"]))
    todo = []
    for d in sorted((out / "plans").glob("*/*")):
        v = json.loads((d / "variant.json").read_text())
        if (v["session"], v["variant"], v["seed"]) not in done:
            todo.append(d)
    # in VARIANTS' order (the base first), both sessions of a variant together: a run cut short
    # still holds complete comparisons
    rank = {v: i for i, v in enumerate(VARIANTS)}
    todo.sort(key=lambda d: (rank.get(d.name.rsplit("-s", 1)[0], len(rank)), d.name, d.parent.name))
    t0 = time.perf_counter()
    print(f"{len(todo)} runs on {device}, {jobs} at a time", flush=True)

    def one(d: Path) -> None:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            print(f"skipped {d} (time budget)", flush=True)
            return
        cmd = [sys.executable, __file__, "train-one", str(d), "--device", device, "--threads", str(threads),
               "--results", str(results)] + (["--corpus", corpus] if corpus else []) + (["--test"] if test else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] if p.returncode else p.stdout.strip().splitlines()[-1:]
        print(f"[{time.perf_counter() - t0:5.0f} s] {d.parent.name} {d.name}: {' '.join(tail)}", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


# ---- the per-session baselines beside it (here: the data stack) -------------------------------------------
def baselines(out: Path, corpus: str, sessions: list[str], seeds: list[int], threads: int) -> None:
    """Ridge and the GRU, causal and non-causal, tuned on valid (pretrain/decoding/baselines.py), test scored
    once with its bootstrap interval; the GRU once per seed. Appends to OUT/baselines.jsonl."""
    from data_service.reader import open_corpus
    from pretrain.decoding.baselines import run_baseline
    from pretrain.tokens.labels import LabelBudget

    torch.set_num_threads(threads)
    path = out / "baselines.jsonl"
    done = {(r["session"], r["method"], r["causal"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())
            } if path.exists() else set()
    c = open_corpus(corpus)
    for s in sessions:
        for method in ("ridge", "gru"):
            for causal in (True, False):
                for seed in (seeds if method == "gru" else seeds[:1]):
                    if (s, method, causal, seed) in done:
                        continue
                    r = run_baseline(method, c.session(s), LabelBudget.parse("100%"), seed, causal=causal)
                    row = {"session": s, "method": method, "causal": causal, "seed": seed, "test_r2": r.test_r2,
                           "test_ci": list(r.test_ci), "valid_r2": r.valid_r2, "params": r.params,
                           "seconds": r.seconds, "threads": threads}
                    with open(path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{s} {method} {'causal' if causal else 'non-causal'} seed {seed}: test {r.test_r2:.3f} "
                          f"{np.round(r.test_ci, 3).tolist()} valid {r.valid_r2:.3f} {r.params} ({r.seconds:.0f} s)",
                          flush=True)


# ---- report ----------------------------------------------------------------------------------------------
def report(out: Path, baselines: Path | None = None) -> list[dict]:
    """Markdown tables: per run the best valid R² (and its step), the last one, the test R² with its
    interval where `--test` scored it, training seconds and seconds a step (on the device named),
    and the difference to the base of the same session and seed; then the baselines, if given."""
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    rank = {v: i for i, v in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (r["session"], rank.get(r["variant"], len(rank)), r["variant"], r["seed"]))
    base = {(r["session"], r["seed"]): r["best_valid_r2"] for r in rows if r["variant"] == "base"}
    print("| session | variant | seed | best valid R² | at step | last | vs base | test R² [95 % CI] | train s | s/step "
          "| device |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        last = r["curve"][-1]["valid_r2"] if r["curve"] else float("nan")
        d = r["best_valid_r2"] - base.get((r["session"], r["seed"]), float("nan"))
        test = _with_ci(r["test_r2"], r.get("test_ci")) if "test_r2" in r else ""
        print(f"| {r['session']} | {r['variant']} | {r['seed']} | {r['best_valid_r2']:.3f} | {r['best_step']} | "
              f"{last:.3f} | {d:+.3f} | {test} | {r['train_s'] or 0:.0f} | {(r['train_s'] or 0) / r['steps']:.2f} | "
              f"{r['device']} |")
    if baselines and baselines.exists():
        print("\n| session | baseline | seed | test R² [95 % CI] | valid R² | chosen on valid | seconds |")
        print("|---|---|---:|---|---:|---|---:|")
        for b in sorted(map(json.loads, baselines.read_text().splitlines()),
                        key=lambda b: (b["session"], b["method"], not b["causal"], b["seed"])):
            name = f"{b['method']} {'causal' if b['causal'] else 'non-causal'}"
            chosen = ", ".join(f"{k} {v:g}" for k, v in b["params"].items() if k != "bin_s")
            print(f"| {b['session']} | {name} | {b['seed']} | {_with_ci(b['test_r2'], b['test_ci'])} | "
                  f"{b['valid_r2']:.3f} | {chosen} | {b['seconds']:.0f} |")
    return rows


def _with_ci(r2: float, ci: list[float] | None) -> str:
    return f"{r2:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{r2:.3f}"


def plot(out: Path, rows: list[dict], baselines: Path | None = None) -> Path:
    """Valid R² against steps (top) and training seconds (bottom), one column a session; the
    tuned GRU's and ridge's valid R² as horizontal lines when `baselines` (a baselines.jsonl) is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_rows = [json.loads(x) for x in baselines.read_text().splitlines()] if baselines and baselines.exists() else []
    sessions = sorted({r["session"] for r in rows})
    fig, axes = plt.subplots(2, len(sessions), figsize=(6 * len(sessions), 8), squeeze=False)
    for col, s in enumerate(sessions):
        for row, (key, label) in enumerate((("step", "step"), ("train_s", f"training seconds ({rows[0]['device']})"))):
            ax = axes[row][col]
            ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
            for r in (r for r in rows if r["session"] == s):
                ax.plot([p[key] for p in r["curve"]], [p["valid_r2"] for p in r["curve"]],
                        lw=2.5 if r["variant"] in ("base", "recipe") else 1, label=f"{r['variant']} s{r['seed']}")
            for b in (b for b in base_rows if b["session"] == s):
                style = "-" if b["method"] == "gru" else ":"
                ax.axhline(b["valid_r2"], color="k" if b["causal"] else "grey", ls=style, lw=0.8,
                           label=f"{b['method']} {'causal' if b['causal'] else 'non-causal'} s{b['seed']} (valid)")
            ax.set(title=s, xlabel=label, ylabel="valid R² (stitched)", ylim=(-0.2, 1.0))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    path = out / "curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", nargs="?", choices=["prepare", "train", "train-one", "baselines", "report"])
    ap.add_argument("path", nargs="?", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--corpus")
    ap.add_argument("--sessions", default="m1_stevenson_2011,s1_data")
    ap.add_argument("--base", default="configs/demo.yaml")
    ap.add_argument("--variants", help=f"comma-separated names ({', '.join(VARIANTS)}) or NAME=OVR;OVR")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-s", type=float, help="start no new run after this many seconds")
    ap.add_argument("--test", action="store_true", help="also score test once, at the best validation step")
    ap.add_argument("--results", type=Path)
    ap.add_argument("--baselines", type=Path, help="report: a baselines.jsonl whose valid R² to draw beside")
    a = ap.parse_args()
    if a.quick:
        out = ROOT / "runs" / "bench" / "single-quick"
        corpus = a.corpus or str(ROOT / "runs" / "real" / "corpus")
        prepare(out, corpus, a.sessions.split(",")[:1], a.base, ["base", "no-warm-start"], 30, 15, [0])
        train_all(out, a.device, 1, None, a.threads, False, None)
        rows = report(out)
        base = next(r for r in rows if r["variant"] == "base")
        other = next(r for r in rows if r["variant"] != "base")
        print(f"RESULT name=valid_r2 baseline=no-warm-start ratio={base['best_valid_r2'] / other['best_valid_r2']:.3f}")
        return
    if a.stage == "prepare":
        names = a.variants.split(",") if a.variants else list(VARIANTS)
        prepare(a.path, a.corpus, a.sessions.split(","), a.base, names, a.steps, a.eval_every,
                [int(s) for s in a.seeds.split(",")])
    elif a.stage == "train":
        train_all(a.path, a.device, a.jobs, a.corpus, a.threads, a.test, a.budget_s, a.results)
        if not a.results:
            plot(a.path, report(a.path))
    elif a.stage == "train-one":
        r = train_one(a.path, a.device, a.corpus, a.threads, a.test)
        with open(a.results, "a") as f:  # one line per run: appends of a line are atomic enough here
            f.write(json.dumps(r) + "\n")
        print(f"best valid R2 {r['best_valid_r2']:.3f} at step {r['best_step']}, {r['train_s']:.0f} s training")
    elif a.stage == "baselines":
        baselines(a.path, a.corpus, a.sessions.split(","), [int(x) for x in a.seeds.split(",")], a.threads)
    elif a.stage == "report":
        rows = report(a.path, a.baselines)
        print(f"plot: {plot(a.path, rows, a.baselines)}")
    else:
        ap.error("a stage (prepare, train, report) or --quick")


if __name__ == "__main__":
    main()
