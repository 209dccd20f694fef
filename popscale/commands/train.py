"""Commands that train: pretrain, finetune, sweeps and their scaling fits, and a run's tracking caught up.
Each command's flags sit beside its handler."""


from __future__ import annotations

import argparse

from pretrain.tracking.offline import register_command, sync_run

from .common import console, model_flag, result, say, tracking_flag


def add_pretrain(sub) -> None:
    s = sub.add_parser("pretrain", help="pretrain a model (Ray + DeepSpeed, tracked in MLflow)")
    s.add_argument("--config", default="configs/demo.yaml", help="YAML run config (default: the embedded demo)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.steps=50")
    s.add_argument("--resume", metavar="RUN", help="continue a run from its last checkpoint (its name)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--alias", help="point this alias of the registered model at the new version (default: none moves)")
    s.set_defaults(fn=cmd_pretrain)


def cmd_pretrain(a: argparse.Namespace) -> int:
    # deferred: importing torch only when used keeps start-up light
    from pretrain.run.config import load_config
    from pretrain.run.launch import pretrain

    cfg = load_config(a.config, a.set or [])  # a corpus named by --set must exist (no synthetic one is made)
    r = pretrain(cfg, resume=a.resume, show_progress=not a.no_progress, notify=say, alias=a.alias)
    say(f"run {r.name}: {r.steps} steps in {r.seconds / 60:.1f} min, validation R2 {r.valid_r2:.3f}")
    if r.registration == "registered":
        alias = a.alias or cfg.tracking.alias
        moved = (f"; @{alias} now points at it" if alias else
                 f" (no alias moved: `popscale promote {cfg.tracking.registered_model} {r.model_version} ALIAS`)")
        say(f"registered {r.model_uri} in {r.tracking_uri}{moved}")
    # Training succeeded, so the exit status is 0 even when the tracking server was away at the end:
    # then registered=pending, model_uri is the export's path and the warning above gives the command.
    result(valid_r2=f"{r.valid_r2:.4f}", model_uri=r.model_uri or "none", model_version=r.model_version or "none",
           registered={"registered": "yes", "pending": "pending"}.get(r.registration, "no"), tracking=r.tracking,
           run=r.name, mlflow_run_id=r.mlflow_run_id or "none", steps=r.steps, seconds=f"{r.seconds:.0f}")
    return 0


def add_finetune(sub) -> None:
    s = sub.add_parser("finetune", help="adapt a model to unseen sessions (unit identification or fine-tuning)")
    model_flag(s)
    s.add_argument("--corpus", required=True)
    s.add_argument("--session", action="append", help="a session to adapt to (repeat for several)")
    s.add_argument("--mode", default="unit-id", choices=["unit-id", "full", "unit-id-then-full"])
    s.add_argument("--labels", default="100%", help="label budget: 10%% of the train split, or a duration (2m, 90s)")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--unfreeze-after", type=int, help="unit-id-then-full: unit-id steps first (default half)")
    s.add_argument("--lr", type=float, help="learning rate (default: by the model's pretraining optimizer, "
                   "AdamW 1e-2 unit-id / 1e-3 full, LAMB 0.1 / 4e-3)")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--seed", type=int, default=0, help="seeds the label draw and the training")
    s.add_argument("--eval-every", type=int, default=25)
    s.add_argument("--warm-start", default="auto", help="auto (as the model was pretrained) | ridge | none")
    s.add_argument("--replace-session", action="store_true", help="adapt afresh to a session the model knows")
    s.add_argument("--readout", action="append", metavar="NAME:KIND:DIMS=BEHAVIOUR",
                   help="add a readout for a behaviour the model was not pretrained on (kind: continuous, angular, "
                        "categorical), e.g. head_direction:angular:2=compass_direction[ry]")
    s.add_argument("--behaviour", action="append", metavar="NAME",
                   help="decode only this behaviour of the sessions (repeat for several; default: every one the "
                        "model's readouts take); the others' labels are not used")
    s.add_argument("--causal", action="store_true",
                   help="a causal readout, what `popscale serve` runs: learn to predict at each window's end from the "
                        "spikes before it; selected and scored by causal decoding")
    s.add_argument("--causal-tail", type=float, metavar="SECONDS",
                   help="with --causal: the end of each window whose behaviour samples are learned (default: half "
                        "the window)")
    s.add_argument("--causal-mask", action="store_true",
                   help="mask the model's attention by time, so that no prediction anywhere in a window sees a later "
                        "spike and every behaviour sample is learned as a causal target (implies --causal)")
    s.add_argument("--set", action="append", metavar="train.KEY=VALUE",
                   help="a training setting of the adaptation, as pretrain --set takes it (repeat), e.g. "
                        "train.optim.trust=tensor with train.zero_stage=0")
    s.add_argument("--register", metavar="NAME", help="register the adapted model under this name")
    s.add_argument("--alias", help="with --register: point this alias at the new version")
    s.add_argument("--name", help="run name (default: sessions, mode and time)")
    s.add_argument("--out", default="runs/finetune")
    s.add_argument("--no-progress", action="store_true")
    tracking_flag(s)
    s.set_defaults(fn=cmd_finetune)


def cmd_finetune(a: argparse.Namespace) -> int:
    # deferred: importing torch only when used keeps start-up light
    from pretrain.finetune.config import FinetuneConfig
    from pretrain.finetune.finetune import finetune

    cfg = FinetuneConfig(model=a.model, corpus=a.corpus, sessions=a.session or [], mode=a.mode, labels=a.labels,
                         steps=a.steps, unfreeze_after=a.unfreeze_after, batch=a.batch, seed=a.seed,
                         eval_every=a.eval_every, warm_start=a.warm_start, replace_session=a.replace_session,
                         register=a.register, alias=a.alias, tracking_uri=a.tracking_uri, out=a.out, name=a.name,
                         readouts=a.readout or [], behaviours=a.behaviour or [],
                         causal=a.causal, causal_tail_s=a.causal_tail, causal_mask=a.causal_mask,
                         train_settings=a.set or [],
                         **({"lr_unit_id": a.lr} if a.lr and a.mode != "full" else {}),
                         **({"lr_full": a.lr} if a.lr and a.mode == "full" else {}))
    r = finetune(cfg, notify=say, show_progress=not a.no_progress)
    for s, v in r.per_session.items():
        say(f"  {s}: {'causal ' if cfg.causal else ''}test R2 {v['test']:.3f} [95 % {v['test_ci'][0]:.3f}, {v['test_ci'][1]:.3f}], valid R2 "
            f"{v['valid']:.3f} ({r.labelled_s[s]:.0f} s of labels to train on; selection on {v['valid_s']:.0f} s of valid)")
    say(f"finetune {r.name}: {r.mode} in {r.seconds:.0f} s, best validation at step {r.best_step}; model {r.model_uri}")
    result(test_r2=f"{r.test_r2:.4f}", valid_r2=f"{r.valid_r2:.4f}", model_uri=r.model_uri, seconds=f"{r.seconds:.0f}",
           mode=r.mode, labels=r.labels, source=r.source)
    return 0


def add_sweep(sub) -> None:
    s = sub.add_parser("sweep", help="a scaling sweep: one pretraining run per point, on Ray, tracked in MLflow")
    s.add_argument("--config", required=True, help="sweep YAML (configs/sweeps/*.yaml)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a sweep-file value, e.g. budget.steps=50")
    s.add_argument("--point", action="append", help="run only this point (its key; repeatable)")
    s.add_argument("--no-progress", action="store_true")
    tracking_flag(s)
    s.set_defaults(fn=cmd_sweep)


def cmd_sweep(a: argparse.Namespace) -> int:
    # deferred: importing torch only when used keeps start-up light
    from pretrain.scaling.plan import load_sweep
    from pretrain.scaling.sweep import run_sweep

    cfg = load_sweep(a.config, a.set or [])
    r = run_sweep(cfg, a.tracking_uri, notify=say, show_progress=not a.no_progress, only=a.point)
    say(f"sweep {r.name}: {r.points} points ({r.ran} run now, {r.skipped} finished before) in {r.seconds / 60:.1f} min;"
        f" fit it with `popscale scaling-fit --sweep {r.name}`")
    result(sweep=r.name, points=r.points, ran=r.ran, skipped=r.skipped, parent_run_id=r.parent_run_id,
           directory=r.directory, seconds=f"{r.seconds:.0f}")
    return 0


def add_scaling_fit(sub) -> None:
    s = sub.add_parser("scaling-fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to a sweep, with bootstrap intervals")
    s.add_argument("--sweep", required=True, help="the sweep's name, its directory, or its MLflow parent run id")
    s.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    s.add_argument("--budget", type=float, help="training FLOPs for the compute-optimal allocation (default: the "
                                                "largest point's)")
    s.add_argument("--storage", default="runs/sweeps", help="where sweeps keep their state (the sweep file's storage)")
    s.add_argument("--out", help="directory for the summary and plots (default: <sweep dir>/fit)")
    tracking_flag(s)
    s.set_defaults(fn=cmd_scaling_fit)


def cmd_scaling_fit(a: argparse.Namespace) -> int:
    # deferred: importing scipy only when used keeps start-up light
    from pretrain.scaling.report import scaling_fit

    rep, md, parent = scaling_fit(a.sweep, a.tracking_uri, a.storage, a.resamples, a.budget, a.out)
    console.print(md.read_text(), markup=False, highlight=False)
    law = rep.law.values() if rep.law else {}
    ci = rep.intervals
    result(alpha=f"{law['alpha']:.4f}" if law else "nan", beta=f"{law['beta']:.4f}" if law else "nan",
           **({"alpha_ci": f"{ci['alpha'][0]:.3f}..{ci['alpha'][1]:.3f}",
               "beta_ci": f"{ci['beta'][0]:.3f}..{ci['beta'][1]:.3f}"} if law else {}),
           E=f"{law['E']:.4g}" if law else "nan", warnings=len(rep.warnings), summary=md, parent_run_id=parent)
    return 0


def add_tracking_sync(sub) -> None:
    s = sub.add_parser("tracking-sync", help="send a run's MLflow record kept while the server was away "
                                             "(creates its run if it had none)")
    s.add_argument("run_dir", help="the run's directory (cluster.storage_path/RUN: it holds popscale_run.json)")
    s.add_argument("--tracking-uri", help="MLflow store (default: the one the run used, else $MLFLOW_TRACKING_URI, "
                                          "else runs/mlflow.db)")
    s.set_defaults(fn=cmd_tracking_sync)


def cmd_tracking_sync(a: argparse.Namespace) -> int:
    rep = sync_run(a.run_dir, a.tracking_uri)
    done = [f"created its MLflow run {rep.run_id}" if rep.created else f"MLflow run {rep.run_id}",
            f"{rep.metrics} kept metric records sent", *([f"set {rep.ended}"] if rep.ended else [])]
    say(f"{a.run_dir}: " + ", ".join(done) + f" ({rep.tracking_uri})")
    if rep.registration:
        r = rep.registration
        say("its model is not registered yet: " + register_command(r["export"], a.run_dir, r["name"], r.get("alias"),
                                                                   rep.tracking_uri))
    result(run_dir=a.run_dir, mlflow_run_id=rep.run_id, created=str(rep.created).lower(), metrics_sent=rep.metrics,
           ended=rep.ended or "none", registration="pending" if rep.registration else "none")
    return 0


def add_commands(sub) -> None:
    add_pretrain(sub)
    add_finetune(sub)
    add_sweep(sub)
    add_scaling_fit(sub)
    add_tracking_sync(sub)
