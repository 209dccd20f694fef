"""What flushing denormal floats saves: training steps of a trained POYO as popscale runs them (denormals
flushed to zero inside the step, in the calling thread and torch's pool: pretrain/model/numerics.py)
against the CPU's default (POPSCALE_KEEP_DENORMALS=1), side by side.

Each side runs in its own process, with torch's pool started before popscale is imported (as in a
user's process: the flush must reach a pool that already runs); sides alternate (flush, keep, flush,
keep, ...) and each reports the median seconds of its timed steps, after a few untimed ones. The steps are an adaptation's (`popscale finetune`'s
plan and engine, batches built beforehand): unit identification by default, the figure issue 27's
120 s goal is bound by. A trained model is what makes denormals: its attention is peaked, most
of each softmax row underflows.

    python bench/denormals.py [--quick] [--model models/poyo-real-1] [--corpus C --session S] [--mode unit-id]

Without --corpus, a 2-minute synthetic session is made in a temporary directory (`popscale synth`),
so the bench needs nothing but the repository. Ends with
`RESULT name=step_seconds value=<flushed> baseline=denormals_kept ratio=<flushed / kept>`
(below 1: flushing saves time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args) -> None:
    """One side: build the adaptation, run `warm` untimed and `steps` timed steps, print JSON."""
    import torch

    torch.ones(1 << 22).add_(1)  # torch's pool starts here, before anything of popscale
    from data_service.reader import open_corpus
    from data_service.service import build_batch
    from pretrain.finetune.config import FinetuneConfig
    from pretrain.finetune.plan import plan_adaptation
    from pretrain.model.numerics import flushed, thread_flushes
    from pretrain.run.train import _parts, _single_process_group

    cfg = FinetuneConfig(model=args.model, corpus=args.corpus, sessions=[args.session], mode=args.mode,
                         labels="100%", steps=args.warm + args.steps, replace_session=True)
    plan, _ = plan_adaptation(cfg, Path(args.model), open_corpus(args.corpus))
    with _single_process_group():
        parts = _parts(plan, 0, 1)
        batches = [build_batch(parts.spec, i, 0, 1).data for i in range(args.warm + args.steps)]
        times = []
        for i, b in enumerate(batches):
            t = time.perf_counter()
            parts.step(i, [b])
            if i >= args.warm:
                times.append(time.perf_counter() - t)
        tiny = torch.full(((1 << 16) * torch.get_num_threads(),), 1e-30)
        with flushed():
            probe = tiny * 1e-10  # denormal unless every thread flushes
        if thread_flushes():
            raise SystemExit("the main thread still flushes denormals after the steps")
        print(json.dumps({"median_s": statistics.median(times), "flushed": not bool(probe.any()),
                          "tokens": int(batches[0].unit_index.shape[0])}))


def side(args, keep: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--corpus", args.corpus, "--session",
           args.session, "--mode", args.mode, "--steps", str(args.steps), "--warm", str(args.warm)]
    env = {k: v for k, v in os.environ.items() if k != "POPSCALE_KEEP_DENORMALS"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**env, **({"POPSCALE_KEEP_DENORMALS": "1"} if keep else {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic(root: Path) -> tuple[str, str]:
    corpus = root / "corpus"
    subprocess.run([sys.executable, "-m", "popscale.cli", "synth", "--corpus", str(corpus), "--sessions", "1",
                    "--subjects", "1", "--minutes", "2", "--seed", "7"], check=True, capture_output=True, cwd=ROOT)
    from data_service.reader import open_corpus  # the data layer: no torch in this process

    return str(corpus), open_corpus(str(corpus)).session_ids[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 pairs of 6 timed steps")
    ap.add_argument("--model", default=str(ROOT / "models" / "poyo-real-1"))
    ap.add_argument("--corpus", help="default: a synthetic session made here")
    ap.add_argument("--session")
    ap.add_argument("--mode", default="unit-id", choices=["unit-id", "full"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.steps, args.pairs = 6, 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.corpus is None:
            args.corpus, args.session = synthetic(Path(tmp))
        elif args.session is None:
            ap.error("--corpus needs --session")
        runs: dict[str, list[float]] = {"flushed": [], "kept": []}
        for k in range(args.pairs):
            for name in ("flushed", "kept"):
                r = side(args, keep=name == "kept")
                if r["flushed"] != (name == "flushed"):
                    raise SystemExit(f"the {name} side's thread pool did not {'flush' if name == 'flushed' else 'keep'} "
                                     "denormals: the comparison would be meaningless")
                runs[name].append(r["median_s"])
                print(f"pair {k + 1}/{args.pairs} {name:8s} {r['median_s'] * 1e3:7.1f} ms a step "
                      f"({r['tokens']} spike tokens a batch)", flush=True)
    flushed, kept = statistics.median(runs["flushed"]), statistics.median(runs["kept"])
    print(f"{args.mode} steps of {Path(args.model).name} on {args.session}: flushed {flushed * 1e3:.1f} ms, "
          f"kept {kept * 1e3:.1f} ms (medians of {args.pairs} alternating runs of {args.steps} steps)")
    print(f"RESULT name=step_seconds value={flushed:.4f} baseline=denormals_kept ratio={flushed / kept:.3f}")


if __name__ == "__main__":
    main()
