"""Pretrain the released checkpoint on one machine without Ray, in resumable chunks (issue 27).

The plan is `--config`'s (configs/release.yaml by default), built once and kept in OUT/plan.json;
every call trains it from its newest checkpoint up to `--until` steps with the same loop `popscale
pretrain`'s workers run (`train_in_process`), appends the curve to OUT/curve.jsonl and redraws OUT/curve.png. The
learning-rate schedule follows the plan's `train.steps`, so stopping early leaves it mid-schedule.

    python scripts/release_pretrain.py --until 2000            # then again with a larger --until
    python scripts/release_pretrain.py --export models/NAME    # the newest checkpoint as an export
    python scripts/release_pretrain.py --out runs/other --set train.steps=2000   # a variant of the plan

Last line: RESULT step=<n> valid_r2=<latest> seconds=<this call>.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class CurveSink:
    """Every logged metric appended to curve.jsonl as it comes (a stopped chunk keeps its curve)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[str, float] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.last.update(metrics)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if "valid_r2" in metrics or ("train_loss" in metrics and step % 500 == 0):
            print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())
                                               if k in ("train_loss", "valid_r2", "lr", "samples_per_s")), flush=True)

    def artifact(self, path: str, folder: str) -> None:
        pass


def plot(curve: Path, out: Path) -> None:
    """Training loss and validation R² against steps (every chunk so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in curve.read_text().splitlines()]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    valid = [(r["step"], r["valid_r2"]) for r in rows if "valid_r2" in r]
    if loss:
        a.plot(*zip(*loss), lw=0.8)
    a.set(xlabel="step", ylabel="training loss", yscale="log", title="pretraining loss")
    if valid:
        b.plot(*zip(*valid), "o-")
    b.set(xlabel="step", ylabel="valid R²", title="validation R² (pretraining sessions)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# the fixed evaluation set: sessions the released model never sees (issue 27; MODEL_CARD.md)
EVALUATION = {"m1_stevenson_2011": "monkey M1 (an animal not in pretraining)",
              "s1_data": "monkey S1 area 2 (an animal and an area not in pretraining)",
              "A2929-200711": "mouse anterior thalamus + CA1, head direction (a species not in pretraining)",
              "mihi_demo-te": "monkey Mihi M1 (its sibling session mihi_demo-tr is in pretraining)",
              "R042-2013-08-20": "rat R042 CA1, position (its sibling session R042-2013-08-18 is in pretraining)"}


def card(export: Path, plan, step: int, curve: Path, recipe: str = "configs/release.yaml") -> None:
    """MODEL_CARD.md: what the model saw, what it never saw, how it was trained, how well."""
    from data_service.reader import open_corpus

    rows = open_corpus(plan.corpus).rows
    synthetic = sorted(s for s in plan.sessions if rows[s]["source_format"] == "synthetic")
    seen = sorted(s for s in plan.sessions if s not in synthetic)
    leak = sorted(set(plan.sessions) & set(EVALUATION))
    if leak:
        raise SystemExit(f"evaluation session(s) {leak} are in the plan's pretraining sessions")
    logged = [json.loads(x) for x in curve.read_text().splitlines()] if curve.exists() else []
    valid = [r for r in logged if "valid_r2" in r and r["step"] <= step]
    last = valid[-1] if valid else {}
    t = plan.run.train
    lines = [
        f"# {export.name}: POYO ({plan.run.model}) pretrained on {len(seen)} real and {len(synthetic)} synthetic "
        "sessions", "",
        "Released with popscale (issue 27). Weights: model.safetensors (fp32); config.json, vocab.json and plan.json "
        "say everything else. Register it with `popscale register models/" + export.name + " --name poyo-real "
        "--alias released`; adapt it with `popscale finetune --model poyo-real@released ...` or "
        f"`--model models/{export.name}`.", "",
        "## Sessions it saw (pretraining)",
        *[f"- {s}" for s in seen],
        *([f"- {len(synthetic)} synthetic reaching sessions of 4 simulated monkeys, hand velocity (`popscale synth "
           "--sessions 16 --subjects 4 --minutes 5 --seed 0`): " + ", ".join(synthetic)] if synthetic else []), "",
        "## Sessions it never saw (the fixed evaluation set)",
        *[f"- {s}: {why}" for s, why in EVALUATION.items()], "",
        "## Recipe",
        f"- {recipe}: {plan.run.model}, {plan.run.model_overrides}, readouts "
        f"{dict(plan.model.readouts)}; LAMB lr {t.optim.lr}, {t.warmup_steps} warm-up steps, cosine over "
        f"{t.steps} steps, global batch {plan.run.data.global_batch}, ridge warm start, no unit dropout"
        + (f"; session weights {dict(plan.run.data.session_weights)} (windows drawn per second of a session, "
           "times its weight)" if plan.run.data.session_weights else "") + ".",
        f"- Trained {step} steps on one CPU process (2 cores) with the loop `popscale pretrain`'s workers run "
        "(scripts/release_pretrain.py: train_in_process, resumable in chunks), not through Ray.",
        "- The monkey .mat sessions are binned counts (spike times placed at seeded random times within "
        "50 ms bins; golub's 33 ms): the model sees bin-width timing for them.", "",
        "## Figures",
        f"- Validation R² on the real pretraining sessions at step {last.get('step', '?')}: "
        f"{last.get('valid_r2', float('nan')):.3f} (" + ", ".join(
            f"{k.split('.', 1)[1]} {v:.3f}" for k, v in last.items() if k.startswith("valid_r2.")) + ")",
        "- Transfer to the evaluation set (unit-id, full fine-tuning, scratch, ridge and GRU; test R² with 95 % "
        "intervals, two seeds): bench/RESULTS.md, \"The released checkpoint on unseen sessions\".", "",
        "## Intended use",
        "Adapting to new recordings of spiking neurons with behaviour (velocity, position; head direction through a "
        "new readout) by unit identification or fine-tuning. A research model: not validated for clinical use.", ""]
    (export / "MODEL_CARD.md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "release.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "release"))
    ap.add_argument("--until", type=int, help="train up to this step (≤ the plan's train.steps)")
    ap.add_argument("--export", metavar="DIR", help="export the newest checkpoint to DIR")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of --config (YAML value), e.g. train.steps=2000; only when OUT has no plan yet")
    a = ap.parse_args()

    import torch

    from data_service.errors import ConfigError
    from pretrain.run.config import load_config
    from pretrain.run.export import export_checkpoint
    from pretrain.run.plan import RunPlan, build_plan
    from pretrain.run.train import train_in_process

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if (out / "plan.json").exists():
        if a.set:
            raise SystemExit(f"{out}/plan.json exists: --set applies only when a plan is built (a new --out)")
        plan = RunPlan.load(out)
    else:
        try:
            run = load_config(a.config, a.set)
        except ConfigError as e:  # a bad --set or config: one line, nothing built
            print(f"error: {e}\nRESULT error=ConfigError", file=sys.stderr)
            return 2
        plan = build_plan(run, progress=True)
        plan.save(out)
    if a.export:
        cfg = Path(a.config).resolve()
        recipe = str(cfg.relative_to(ROOT)) if cfg.is_relative_to(ROOT) else a.config
        ckpts = sorted((out / "checkpoints").glob("step*"), key=lambda p: int(p.name.lstrip("step_")))
        if not ckpts:  # one line, not an IndexError
            print(f"error: {out / 'checkpoints'} holds no checkpoint yet: run without --export first\n"
                  "RESULT error=NoCheckpoint", file=sys.stderr)
            return 2
        ckpt = ckpts[-1]
        step = int(ckpt.name.lstrip("step_"))
        export = export_checkpoint(ckpt, a.export, {"corpus_fingerprint": plan.corpus_fingerprint,
                                                    "recipe": recipe, "step": step,
                                                    "trained_with": "scripts/release_pretrain.py"})
        card(export, plan, step, out / "curve.jsonl", recipe)
        print(f"exported {ckpt.name} to {export}")
        print(f"RESULT step={step} export={export} seconds={time.time() - t0:.0f}")
        return 0
    until = min(a.until or plan.run.train.steps, plan.run.train.steps)
    plan = dataclasses.replace(plan, run=dataclasses.replace(
        plan.run, train=dataclasses.replace(plan.run.train, stop_at=until)))
    sink = CurveSink(out / "curve.jsonl")
    res = train_in_process(plan, out / "checkpoints", sink=sink)
    plot(out / "curve.jsonl", out / "curve.png")
    valid = res.metrics.get("valid_r2", sink.last.get("valid_r2", float("nan")))
    print(f"RESULT step={until} valid_r2={valid:.4f} seconds={time.time() - t0:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
