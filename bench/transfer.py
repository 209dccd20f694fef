"""Transfer to an unseen session, leave-one-session-out over the real recordings: does a
pretrained POYO adapted by unit identification beat per-session decoders, and from how few labels?

For each held-out real session S (the five monkey sessions of ../shared/data/real/, hand
velocity, and the mouse, head direction: an angular readout the pretrained model does not have,
added at adaptation and scored as R² on (cos, sin); its baselines decode the same):
1. pretrain the demo recipe (configs/demo.yaml: poyo-1.3M, ridge warm start, locality prior) in
   this process on the demo's synthetic corpus plus every other session of `MONKEY` (the rat,
   mouse and BCI files of the real folder stay out, as in issue 10's table; cached per S under
   runs/bench/transfer/; 300 steps by default);
2. adapt it to S with `popscale finetune`'s code path: `unit-id` and `full` at label budgets of
   10 % and 100 % of S's train split, `unit-id-then-full` at 100 %, all with the same step budget
   (`--steps`) and validation schedule;
3. scratch: the same model and recipe (with `--model`: the single-session recipe, configs/real.yaml)
   trained on the labelled part of S alone, same steps, same validation schedule, the same model
   selection (best validation R²);
4. the baselines in the same harness: ridge (Wiener filter) and a GRU, each causal and
   non-causal (`pretrain/decoding/baselines.py`: POYO's stitched windows see the future, so the
   non-causal ones are its like-for-like comparison), tuned on valid.
Every arm: the same labels (a seed draws them), selection on the whole valid split (its seconds
are printed: at 10 % that is more time than the labels themselves), test scored once. Test R²
over the test split inside the eval intervals with a 95 % bootstrap interval over test trials
or blocks; training arms (and label draws) over `--seeds` seeds; wall time of each arm. Results
are kept in runs/bench/transfer/results-*.json as they come, so a stopped run continues.

    python bench/transfer.py [--quick] [--sessions chewie_demo,...] [--steps 100] [--pretrain-steps 300]

A seed added later: `--seeds 2 --first-seed 1` runs seed 1 only; `--grid 'gru.hiddens=400;gru.histories_s=1.0'`
narrows a baseline's grid to what an earlier seed chose on valid (recorded with each result: say so in a table).

--quick: one session (mihi_demo-te), a small pretraining (a 4-session synthetic corpus plus the
other real monkey sessions, 60 steps), 30 adaptation steps, one seed: about 5 minutes on 2 cores
(the comparison cannot be made in under a minute: it needs a pretraining).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_service.reader import open_corpus  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
MONKEY = ["mihi_demo-te", "chewie_demo", "m1_stevenson_2011", "s1_data", "mihi_demo-tr"]
MOUSE = "A2929-200711"
HD = "head_direction:angular:2=compass_direction[ry]"  # the mouse's behaviour: a new, angular readout
SIBLINGS = {"mihi_demo-te": "mihi_demo-tr", "mihi_demo-tr": "mihi_demo-te",  # same animal, in pretraining
            "R042-2013-08-20": "R042-2013-08-18"}
# the released checkpoint's fixed evaluation set (configs/release.yaml: it never saw these sessions)
EVAL = ["m1_stevenson_2011", "s1_data", "mihi_demo-te", "R042-2013-08-20", MOUSE]
RAT = {"R042-2013-08-20"}  # decoded: position (x, y)
ARMS = ["unit-id", "full", "unit-id-then-full", "scratch", "ridge", "gru", "ridge-nc", "gru-nc"]
# beyond the default arms: unit-id-x5 (unit-id at 5x the steps: its converged R2), full-causal (full
# fine-tuning as a causal readout, finetune --causal, scored by causal decoding: what `popscale serve` runs)
# and full-masked (the same with the attention masked by time, finetune --causal-mask: every sample learned)
EXTRA_ARMS = ["unit-id-x5", "full-causal", "full-masked"]
CAUSAL_ARMS = ("full-causal", "full-masked")
ADAPTED = ("unit-id", "full", "unit-id-then-full", "unit-id-x5", *CAUSAL_ARMS)  # the arms that adapt a pretrained model
EVAL_EVERY = 25  # validations every this many steps, for every trained arm (model selection)


def eval_every(steps: int) -> int:
    """Every 25 steps, at most 20 validations a run: long schedules choose their step on valid too."""
    return min(steps, max(EVAL_EVERY, steps // 20))
SPEED = "mihi_demo-te"  # the ~200-unit session the wall-time goal is measured on (and unit-id at 5x the steps)


def baseline_grid(spec: str | None) -> dict[str, dict[str, tuple]]:
    """'gru.hiddens=400;gru.histories_s=0.7,1.0' -> {"gru": {"hiddens": (400,), "histories_s": (0.7, 1.0)}}:
    a baseline's grid narrowed to settings an earlier run chose on valid (a second seed at seed 0's choice)."""
    out: dict[str, dict[str, tuple]] = {}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        key, eq, values = part.partition("=")
        method, dot, name = key.strip().partition(".")
        if not (eq and dot and method in ("ridge", "gru") and values):
            raise SystemExit(f"--grid {part!r}: expected METHOD.SETTING=V[,V...] with METHOD ridge or gru")
        out.setdefault(method, {})[name] = tuple(int(float(v)) if name == "hiddens" else float(v)
                                                 for v in values.split(","))
    return out


def build_corpus(out: Path, quick: bool) -> Path:
    """The demo's synthetic sessions and the real recordings, in one corpus (made once)."""
    from data_service.ingest import ingest
    from data_service.ingest.common import IngestOptions, load_metadata_file, options_for
    from data_service.synth import SynthConfig, synth_corpus

    root = out / "corpus"
    if (root / "manifest.json").exists():
        return root
    cfg = SynthConfig(sessions=4, subjects=2, minutes=2, seed=0) if quick else \
        SynthConfig(sessions=16, subjects=4, minutes=5, seed=0)
    synth_corpus(cfg, root, workers=2)
    meta = load_metadata_file(ROOT / "configs" / "real_recordings.yaml")
    report = ingest([REAL], root, lambda p: options_for(p, IngestOptions(), meta, {}))
    if not report.ok:
        raise SystemExit(f"ingest failed: {report.failures}")
    return root


def pretrained(out: Path, corpus: Path, held: str, steps: int) -> Path:
    """The demo recipe pretrained on everything but `held` (exported with its plan; cached)."""
    from pretrain.run.plan import build_plan
    from pretrain.run.export import export_checkpoint
    from pretrain.run.config import load_config
    from pretrain.run.train import train_in_process

    export = out / f"pretrained-without-{held}-{steps}" / "export"
    if (export / "plan.json").exists():
        return export
    c = open_corpus(corpus)
    sessions = [s for s in c.session_ids if s != held and (c.rows[s]["source_format"] == "synthetic" or s in MONKEY)]
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.corpus={corpus}", "data.synth=null", "data.loader=local", f"train.steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
        f"data.sessions={json.dumps(sessions)}", "cluster.cpus_per_worker=2"])
    t0 = time.time()
    res = train_in_process(build_plan(cfg, progress=True), export.parent / "ckpt")
    print(f"  pretrained without {held}: {steps} steps in {time.time() - t0:.0f} s, valid R2 "
          f"{res.metrics.get('valid_r2', float('nan')):.3f}", flush=True)
    return export_checkpoint(res.checkpoint, export, {"corpus_fingerprint": c.fingerprint, "bench": "transfer"})


def scratch(out: Path, corpus: Path, held: str, labels: str, seed: int, steps: int,
            recipe: Path = ROOT / "configs" / "demo.yaml", settings: tuple[str, ...] = ()) -> dict:
    """`recipe` (the demo's by default; the released checkpoint's bench uses the single-session recipe,
    configs/real.yaml) trained from nothing on the labelled part of `held` alone for `steps` (its warm-up
    scaled with them), validated on the same schedule as the adaptations and kept at its best
    validation; test R2 with its interval."""
    from pretrain.finetune.select import BestValid
    from pretrain.decoding.evaluate import evaluate
    from pretrain.run.plan import build_plan
    from pretrain.run.config import load_config
    from pretrain.run.train import train_in_process

    base = load_config(recipe, [])
    # the demo's a tenth of the steps, as issue 25's tables ran it; another recipe's its own share of them
    warmup = max(1, steps // 10 if recipe.name == "demo.yaml" else
                 round(steps * base.train.warmup_steps / max(1, base.train.steps)))
    cfg = load_config(recipe, [
        f"data.corpus={corpus}", "data.synth=null", "data.loader=local", f"train.steps={steps}",
        f"train.warmup_steps={warmup}", f"train.eval_every={eval_every(steps)}",
        f"train.checkpoint_every={steps}", f"data.sessions={json.dumps([held])}", f"data.labels={labels}",
        f"data.seed={seed}", f"train.seed={seed}", "cluster.cpus_per_worker=2",
        *(["data.readouts={head_direction: [compass_direction]}", "data.readout_kinds={head_direction: angular}",
           "data.readout_columns={head_direction: ry}"] if held == MOUSE else []), *settings])
    if held == MOUSE:
        cfg.model_overrides = {**cfg.model_overrides, "readouts": {"head_direction": 2}}
    plan = build_plan(cfg)
    res = train_in_process(plan, out / "scratch" / f"{held}-{labels.rstrip('%')}-{seed}", wrap_evaluator=BestValid)
    res.model.load_state_dict(res.evaluator.state)
    c = open_corpus(corpus)
    r = evaluate(res.model, plan.make_tokenizer(), c, [held], "test")
    v = evaluate(res.model, plan.make_tokenizer(), c, [held], "valid")
    return {"test_r2": r[held].r2 if held in r else float("nan"), "test_ci": list(r[held].ci) if held in r else None,
            "valid_r2": v[held].r2 if held in v else float("nan"), "best_step": res.evaluator.best_step}


def run_arm(out: Path, corpus: Path, held: str, arm: str, labels: str, seed: int, steps: int, pre_steps: int,
            model: Path | None = None, lr: float | None = None, causal_tail: float | None = None,
            grid: dict | None = None, settings: tuple[str, ...] = ()) -> dict:
    from pretrain.finetune.finetune import _scored_seconds

    t0 = time.time()
    reader = open_corpus(corpus).session(held)
    common = {"valid_s": _scored_seconds(reader, "valid")}
    if arm.split("-nc")[0] in ("ridge", "gru"):
        from pretrain.decoding.baselines import run_baseline
        from pretrain.tokens.labels import LabelBudget

        what = ({"behaviour": "compass_direction[ry]", "kind": "angular"} if held == MOUSE else
                {"behaviour": "position[x,y]"} if held in RAT else {})
        method = arm.split("-nc")[0]
        narrowed = (grid or {}).get(method, {})
        r = run_baseline(method, reader, LabelBudget.parse(labels), seed, causal=not arm.endswith("-nc"),
                         **what, **narrowed)
        return {"test_r2": r.test_r2, "test_ci": list(r.test_ci), "valid_r2": r.valid_r2, "params": r.params,
                "labelled_s": r.labelled_s, "seconds": time.time() - t0, **common,
                **({"grid": {k: list(v) for k, v in narrowed.items()}} if narrowed else {})}
    if arm == "scratch":
        recipe = ROOT / "configs" / ("real.yaml" if model else "demo.yaml")  # the released model's: the single-session recipe
        return {**scratch(out, corpus, held, labels, seed, steps, recipe, settings), "seconds": time.time() - t0,
                "recipe": recipe.name, **common}
    from pretrain.finetune.config import FinetuneConfig
    from pretrain.finetune.finetune import finetune

    src = model or pretrained(out, corpus, held, pre_steps)
    name = f"{held}-{arm}-{steps}-{labels.rstrip('%')}-{seed}" + (f"-lr{lr:g}" if lr else "")
    causal, masked = arm in CAUSAL_ARMS, arm == "full-masked"
    if arm == "unit-id-x5":
        arm, steps = "unit-id", 5 * steps
    arm = "full" if causal else arm
    rates = {} if lr is None else {"lr_full": lr} if arm == "full" else {"lr_unit_id": lr}
    r = finetune(FinetuneConfig(model=str(src), corpus=str(corpus), sessions=[held], mode=arm, labels=labels,
                                steps=steps, seed=seed, eval_every=eval_every(steps), **rates, causal=causal,
                                causal_tail_s=causal_tail if causal else None, causal_mask=masked,
                                tracking_uri=f"sqlite:///{out / 'mlflow.db'}", out=str(out / "finetune"),
                                name=name,
                                readouts=[HD] if held == MOUSE else [],
                                # what the baselines decode, with the same labels: the mouse's head direction only
                                behaviours=["compass_direction"] if held == MOUSE else [],
                                train_settings=list(settings)),
                 notify=lambda m: None, show_progress=False)
    per = r.per_session[held]
    other = {}
    if arm == "full":  # the same model scored the other way: the R2 causality costs, or a causal readout gives back
        from pretrain.decoding.evaluate import predict_session
        from pretrain.tracking.export import load_exported

        m, tok = load_exported(r.export)
        res = predict_session(m, tok, open_corpus(corpus).session(held), "test", causal=not causal)
        other = {"test_r2_stitched" if causal else "test_r2_causal": res.r2 if res is not None else float("nan")}
    return {"test_r2": r.test_r2, "test_ci": per["test_ci"], "valid_r2": r.valid_r2, "best_step": r.best_step,
            "labelled_s": r.labelled_s[held], "seconds": r.seconds, **other, **common}


def cell(rows: list[dict]) -> str:
    """Mean test R2 over seeds, the seeds' mean 95 % bootstrap bounds, and the spread over seeds."""
    if not rows:
        return "-"
    r2 = [r["test_r2"] for r in rows]
    cis = np.array([r["test_ci"] for r in rows if r.get("test_ci")], dtype=np.float64).reshape(-1, 2)
    ci = f" [{np.nanmean(cis[:, 0]):.2f}, {np.nanmean(cis[:, 1]):.2f}]" if len(cis) and np.isfinite(cis).any() else ""
    sd = f" ±{np.std(r2, ddof=1):.3f}" if len(r2) > 1 else ""
    return f"{np.mean(r2):.3f}{ci}{sd}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="--quick: one session, small pretraining, ~5 min (it needs a pretraining, "
                                        "so not under a minute)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sessions", help=f"comma-separated (default: {','.join(MONKEY + [MOUSE])})")
    ap.add_argument("--steps", type=int, help="adaptation (and from-scratch) steps (default 100; quick 30)")
    ap.add_argument("--pretrain-steps", type=int, help="default 300; quick 60")
    ap.add_argument("--seeds", type=int, help="seeds of every arm: the label draw and the training (default 2; quick 1)")
    ap.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS + EXTRA_ARMS)} (default: "
                                   f"{','.join(ARMS)})")
    ap.add_argument("--labels", default="10%,100%", help="label budgets to run (default 10%%,100%%)")
    ap.add_argument("--report", action="store_true", help="print the tables from the results kept so far; run nothing")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "transfer"))
    ap.add_argument("--model", help="adapt this export (e.g. models/poyo-real-1) instead of pretraining one per session; "
                                    f"sessions default to its evaluation set ({','.join(EVAL)})")
    ap.add_argument("--corpus", help="the corpus holding the sessions (default: made under --out; with --model, the "
                                     "corpus the model was pretrained from: runs/real/corpus)")
    ap.add_argument("--lrs", help="learning rates to choose from on valid, per adapted arm: unit-id (and the first "
                                  "phase of unit-id-then-full) and full, e.g. 'unit-id=0.01,0.03;full=0.001,0.003' "
                                  "(default: finetune's own, one run); chosen on seed 0's valid split, the "
                                  "other seeds run the chosen rate")
    ap.add_argument("--causal-tail", type=float, help="full-causal: seconds at each window's end whose samples are "
                                                      "learned (default: finetune's, half the window)")
    ap.add_argument("--reuse", help="a results file of an earlier run on the same session store: its ridge and GRU "
                                    "results (no model in them: the same splits, label draws and code) are taken "
                                    "instead of running them again")
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds from this one (the earlier ones ran before)")
    ap.add_argument("--grid", help="narrow a baseline's grid to settings chosen on valid before, e.g. "
                                   "'gru.hiddens=400;gru.histories_s=1.0' (recorded with each result)")
    ap.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                    help="a training setting of every adapted and from-scratch arm (repeat), e.g. train.optim.trust=tensor "
                         "with train.zero_stage=0; recorded with each result (give such a run its own --out)")
    a = ap.parse_args()
    if any(not x.startswith("train.") for x in a.set):
        raise SystemExit(f"--set {a.set}: only train.* settings (what finetune's adaptation takes too)")
    if not REAL.is_dir():
        raise SystemExit(f"the real recordings are not at {REAL}")
    import pretrain.finetune.finetune  # noqa: F401 - everything this run uses, loaded once at the start
    import pretrain.decoding.baselines  # noqa: F401
    import pretrain.run.train  # noqa: F401
    out = Path(a.out) / ("quick" if a.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    model = Path(a.model).resolve() if a.model else None
    default = EVAL if model else MONKEY[:3] + [MOUSE] + MONKEY[3:]
    sessions = a.sessions.split(",") if a.sessions else (["mihi_demo-te"] if a.quick else default)
    steps = a.steps or (30 if a.quick else 100)
    pre = a.pretrain_steps or (60 if a.quick else 300)
    seeds = a.seeds or (1 if a.quick else 2)
    if a.corpus or model:
        corpus = Path(a.corpus or ROOT / "runs" / "real" / "corpus").resolve()
    else:
        corpus = out / "corpus" if a.report else build_corpus(out, a.quick)
    # v2: the fixed harness (issue 25); v1 files are not mixed in; v3: one released model for every session
    store = out / (f"results-v3-{model.name}-{steps}.json" if model else f"results-v2-{pre}-{steps}.json")
    results = json.loads(store.read_text()) if store.exists() else {}
    if a.reuse:
        kept = {k: v for k, v in json.loads(Path(a.reuse).read_text()).items()
                if k.split("|")[1].split("-nc")[0] in ("ridge", "gru") and k not in results}
        results.update(kept)
        print(f"reused {len(kept)} baseline results from {a.reuse}")
    arms = a.arms.split(",") if a.arms else ARMS
    unknown = sorted(set(arms) - set(ARMS + EXTRA_ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown} (known: {', '.join(ARMS + EXTRA_ARMS)})")
    plan = [(s, arm, lab, seed) for s in sessions for arm in arms if arm != "unit-id-x5" for lab in a.labels.split(",")
            for seed in range(a.first_seed, seeds) if not (arm == "unit-id-then-full" and lab == "10%" and model is None)]
    if SPEED in sessions and (not a.arms or "unit-id-x5" in arms):
        plan.append((SPEED, "unit-id-x5", "100%", 0))
    grid = {k: [float(x) for x in v.split(",")] for k, _, v in
            (part.partition("=") for part in (a.lrs or "").split(";") if part)}
    narrow = baseline_grid(a.grid)
    for s, arm, lab, seed in plan:
        key = f"{s}|{arm}|{lab}|{seed}"
        if key in results or a.report:
            continue
        rates = grid.get("full" if arm in ("full", *CAUSAL_ARMS) else "unit-id", [None]) if arm in ADAPTED else [None]
        first = results.get(f"{s}|{arm}|{lab}|0")
        if seed > 0 and len(rates) > 1 and first is not None:
            rates = [first["lr"]]  # the schedule is chosen on seed 0's valid split; the other seeds repeat it
        short = results.get(f"{s}|unit-id|{lab}|0")
        if arm == "unit-id-x5" and len(rates) > 1 and short is not None:
            rates = [short["lr"]]  # 5x the steps at the rate chosen for unit-id: its converged R2
        for lr in rates:  # each candidate kept under its own key; the arm's row is the one best on valid
            ck = key if lr is None else f"{s}|{arm}@{lr:g}|{lab}|{seed}"
            if ck not in results:
                results[ck] = {**run_arm(out, corpus, s, arm, lab, seed, steps, pre, model, lr, a.causal_tail, narrow,
                                         tuple(a.set)), "lr": lr, **({"train_settings": a.set} if a.set else {}),
                               **({"causal_tail": a.causal_tail} if arm in CAUSAL_ARMS and a.causal_tail else {})}
                store.write_text(json.dumps(results, indent=1))
        if rates != [None]:
            cands = [results[f"{s}|{arm}@{lr:g}|{lab}|{seed}"] for lr in rates]
            best = max(cands, key=lambda r: r["valid_r2"])
            # seconds: the chosen run's (what an adaptation costs once its rate is known); the search's in its own field
            results[key] = {**best, "search_seconds": sum(r["seconds"] for r in cands), "chosen_from": rates}
            store.write_text(json.dumps(results, indent=1))
        r = results[key]
        print(f"{s:18s} {arm:18s} {lab:>4s} seed {seed}: test R2 {r['test_r2']:.3f} {r.get('test_ci')} "
              f"({r['seconds']:.0f} s" + (f", lr {r['lr']:g} chosen on valid" if len(rates) > 1 else "") + ")",
              flush=True)

    def rows(s, arm, lab):
        return [v for k, v in results.items() if k.startswith(f"{s}|{arm}|{lab}|")]

    def mean(s, arm, lab):
        return float(np.mean([r["test_r2"] for r in rows(s, arm, lab)])) if rows(s, arm, lab) else float("nan")

    cols = [(arm, lab) for arm in ARMS for lab in ("10%", "100%")
            if not (arm == "unit-id-then-full" and lab == "10%" and model is None)]
    print(f"\ntest R2 [95 % bootstrap over test trials or blocks, mean of the seeds' bounds] ±sd over {seeds} seeds; "
          + (f"pretrained: {model.name}" if model else f"pretraining {pre} steps") +
          f", adaptation and scratch {steps} steps, validation every {eval_every(steps)}")
    print("| session | sibling in pretraining | valid s (selection) | " + " | ".join(f"{a_} {lab}" for a_, lab in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for s in sessions:
        vs = next((r["valid_s"] for k, r in results.items() if k.startswith(f"{s}|") and "valid_s" in r), float("nan"))
        print(f"| {s} | {SIBLINGS.get(s, 'no')} | {vs:.0f} | " + " | ".join(cell(rows(s, a_, lab)) for a_, lab in cols) + " |")
    print("\nwall time per run, s (mean over seeds; pretraining not included)")
    print("| session | " + " | ".join(f"{a_} {lab}" for a_, lab in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for s in sessions:
        print(f"| {s} | " + " | ".join(f"{np.mean([r['seconds'] for r in rows(s, a_, lab)]):.0f}" if rows(s, a_, lab)
                                       else "-" for a_, lab in cols) + " |")
    avg = {c: float(np.nanmean([mean(s, *c) for s in sessions])) for c in cols}
    monkeys = [s for s in sessions if s != MOUSE and s not in RAT]
    def chosen(s, arms, lab):
        """Test R2 of the arm with the best mean validation R2 (test never chooses)."""
        ran = [x for x in arms if rows(s, x, lab)]
        if not ran:
            return float("nan")
        return mean(s, max(ran, key=lambda x: np.mean([r["valid_r2"] for r in rows(s, x, lab)])), lab)

    best_base = {s: chosen(s, ("ridge", "gru", "ridge-nc", "gru-nc"), "100%") for s in sessions}
    best_pre = {s: chosen(s, ("unit-id", "full", "unit-id-then-full"), "100%") for s in sessions}
    print(f"\nbest pretrained 100% >= best per-session baseline 100% on "
          f"{sum(best_pre[s] >= best_base[s] for s in sessions)}/{len(sessions)} sessions")
    print(f"unit-id 10% > scratch 10% on {sum(mean(s, 'unit-id', '10%') > mean(s, 'scratch', '10%') for s in sessions)}"
          f"/{len(sessions)} sessions; unit-id 10% >= ridge 10% on "
          f"{sum(mean(s, 'unit-id', '10%') >= mean(s, 'ridge', '10%') for s in sessions)}/{len(sessions)}")
    if monkeys:
        print(f"best pretrained 100% - best baseline 100%, mean over the monkey sessions: "
              f"{np.mean([best_pre[s] - best_base[s] for s in monkeys]):+.3f}")
    long = results.get(f"{SPEED}|unit-id-x5|100%|0")
    short = rows(SPEED, "unit-id", "100%")
    if short and long:
        print(f"unit-id on {SPEED} ({open_corpus(corpus).rows[SPEED]['n_units']} units): {short[0]['seconds']:.0f} s, "
              f"test R2 {short[0]['test_r2']:.3f} vs {long['test_r2']:.3f} after 5x the steps")
    causal_cost(sessions, rows)
    uid10, ridge100 = avg[("unit-id", "10%")], avg[("ridge", "100%")]
    ratio = uid10 / ridge100 if ridge100 > 0 else float("nan")
    print(f"RESULT name=unit_id_10pct_test_r2 baseline=ridge_100pct ratio={ratio:.3f}")


def causal_cost(sessions: list[str], rows) -> None:
    """The R2 causality costs at 100 % labels, per session: full fine-tuning scored stitched and
    causally (the same models), full fine-tuning as a causal readout (full-causal), and the causal
    GRU and ridge (history only). Printed when full-causal has run."""
    have = [s for s in sessions if rows(s, "full-causal", "100%") or rows(s, "full-masked", "100%")]
    if not have:
        return

    def c(s, arm, field="test_r2"):
        got = [r[field] for r in rows(s, arm, "100%") if field in r]
        if not got:
            return "-"
        ci = [r["test_ci"] for r in rows(s, arm, "100%") if field == "test_r2" and r.get("test_ci")]
        return f"{np.mean(got):.3f}" + (f" [{np.mean([x[0] for x in ci]):.2f}, {np.mean([x[1] for x in ci]):.2f}]"
                                        if ci else "")

    print("\nthe cost of causality at 100 % labels: test R2 (seeds' mean [95 % interval])")
    print("| session | full, stitched | full, causal decoding | full-causal (finetune --causal) | full-causal, stitched "
          "| full-masked (finetune --causal-mask) | full-masked, stitched | GRU (causal) | ridge (causal) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in have:
        print(f"| {s} | {c(s, 'full')} | {c(s, 'full', 'test_r2_causal')} | {c(s, 'full-causal')} | "
              f"{c(s, 'full-causal', 'test_r2_stitched')} | {c(s, 'full-masked')} | {c(s, 'full-masked', 'test_r2_stitched')} "
              f"| {c(s, 'gru')} | {c(s, 'ridge')} |")


if __name__ == "__main__":
    main()
