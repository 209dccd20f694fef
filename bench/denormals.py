"""What flushing denormal floats would save: training steps of a trained POYO with denormals flushed
to zero (torch.set_flush_denormal(True) before torch starts its threads) against the CPU's default,
side by side. popscale does not flush by default: the flag changes the float semantics of the whole
thread, numpy included (bench/RESULTS.md, ninth stop of issue 27).

The flag is per thread and copied when torch starts its pool, so each side runs in its own
process; sides alternate (flush, keep, flush, keep, ...) and each reports the median seconds of
its timed steps, after a few untimed ones. The steps are an adaptation's (`popscale finetune`'s
plan and engine, batches built beforehand): unit identification by default, the figure issue 27's
120 s goal is bound by. A trained model is what makes denormals: its attention is peaked, most
of each softmax row underflows.

    python bench/denormals.py [--quick] [--model models/poyo-real-1] [--corpus C --session S] [--mode unit-id]

Without --corpus, a 2-minute synthetic session is made in a temporary directory (`popscale synth`),
so the bench needs nothing but the repository. Ends with
`RESULT name=step_seconds value=<flushed> baseline=denormals_kept ratio=<flushed / kept>`.
"""

from __future__ import annotations

import argparse
import json
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

    if args.flush:  # before torch starts its pool: its threads copy the flag when they start
        torch.set_flush_denormal(True)
    from data_service.reader import open_corpus
    from data_service.service import build_batch
    from pretrain.finetune.config import FinetuneConfig
    from pretrain.finetune.plan import plan_adaptation
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
        probe = torch.full(((1 << 16) * torch.get_num_threads(),), 1e-30) * 1e-10  # denormal unless every thread flushes
        print(json.dumps({"median_s": statistics.median(times), "flushed": not bool(probe.any()),
                          "tokens": int(batches[0].unit_index.shape[0])}))


def side(args, keep: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", *([] if keep else ["--flush"]), "--model", args.model, "--corpus", args.corpus, "--session",
           args.session, "--mode", args.mode, "--steps", str(args.steps), "--warm", str(args.warm)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
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
    ap.add_argument("--flush", action="store_true", help=argparse.SUPPRESS)
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
