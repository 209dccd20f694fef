"""The `popscale` command. Subcommands are thin: parse, call one library function, print.

Every subcommand ends with one `RESULT key=value ...` line so scripts can read the outcome;
exit status is 0 on success, 1 when some input failed (the rest was still done), 2 on usage
(a bad flag, config key, override, config file or model preset). An error is one line,
`error: ...`, naming the key or the file, then `RESULT error=<kind>`; `popscale --debug ...`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from data_service.errors import ConfigError, CorpusError
from data_service.remote import redact

console = Console(stderr=True)


def say(message: str) -> None:
    """One line to the user (stderr; never wrapped, so a script can grep it); URL passwords masked."""
    console.print(escape(redact(message)), soft_wrap=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def result(**kv) -> None:
    print("RESULT " + " ".join(f"{k}={redact(v)}" for k, v in kv.items()), flush=True)


# ---- synth ------------------------------------------------------------------------------------------
def cmd_synth(a: argparse.Namespace) -> int:
    from data_service.synth import SynthConfig, synth_corpus

    cfg = SynthConfig(sessions=a.sessions, subjects=a.subjects, minutes=a.minutes, seed=a.seed,
                      pool_size=a.pool_size, min_units=a.min_units, max_units=a.max_units)
    with _progress() as p:
        task = p.add_task(f"synth → {a.corpus}", total=cfg.sessions)
        counts = synth_corpus(cfg, a.corpus, workers=a.workers, replace=a.replace,
                              on_session=lambda sid, st: p.advance(task))
    console.print(f"synthetic corpus {a.corpus}: {counts['added']} added, {counts['replaced']} replaced, "
                  f"{counts['unchanged']} already present")
    result(corpus=a.corpus, sessions=cfg.sessions, **counts)
    return 0


# ---- ingest -------------------------------------------------------------------------------------------
def cmd_ingest(a: argparse.Namespace) -> int:
    from data_service.ingest import expand_sources, ingest
    from data_service.ingest.common import IngestOptions, check_bin_width, load_metadata_file, options_for
    from data_service.splits import SplitConfig

    # what the command line says is checked before the corpus is opened (or made): usage first, then sources
    for flag, v in (("--valid-frac", a.valid_frac), ("--test-frac", a.test_frac)):
        if not 0 <= v < 1:
            raise ConfigError(f"{flag} {v:g}: must be a fraction in [0, 1)")
    if a.valid_frac + a.test_frac >= 1:
        raise ConfigError(f"--valid-frac {a.valid_frac:g} + --test-frac {a.test_frac:g} leave no training data")
    if not a.gap >= 0:
        raise ConfigError(f"--gap {a.gap:g}: must be >= 0 seconds")

    def bin_width_ok(v, where: str) -> None:
        try:
            check_bin_width(v, file=where, session=None)
        except CorpusError as e:
            raise ConfigError(f"{where}: {e.message}") from None

    if a.bin_width is not None:
        bin_width_ok(a.bin_width, "--bin-width")
    base = IngestOptions(seed=a.seed, drop_nan_behaviour=a.drop_nan_behaviour,
                         splits=SplitConfig(fractions=(1 - a.valid_frac - a.test_frac, a.valid_frac, a.test_frac),
                                            gap_s=a.gap, seed=a.seed))
    meta = {}
    if a.meta:  # a metadata file is configuration: a bad one is a usage error, found before any file is read
        try:
            meta = load_metadata_file(a.meta)
            for entry in meta.values():
                base.merged(entry)
        except CorpusError as e:
            raise ConfigError(f"metadata file {a.meta}: {e.message}") from None  # (the message names no file)
        for name, entry in meta.items():
            if entry.get("bin_width_s") is not None:
                bin_width_ok(entry["bin_width_s"], f"metadata file {a.meta}: {name}: bin_width_s")
    cli = {"subject": a.subject, "session_id": a.session_id, "species": a.species, "task": a.task,
           "area": a.area, "bin_width_s": a.bin_width}
    missing = [s for s in a.sources if not Path(s).exists()]
    if missing:
        raise CorpusError("no such file or directory" + (f" (and {len(missing) - 1} more of the sources named)"
                                                         if len(missing) > 1 else ""), file=missing[0])
    sources = expand_sources(a.sources)
    if a.session_id and len(sources) > 1:
        raise ConfigError("--session-id applies to a single source file")
    with _progress() as p:
        task = p.add_task(f"ingest → {a.corpus}", total=len(sources))
        report = ingest(sources, a.corpus, lambda path: options_for(path, base, meta, cli), replace=a.replace,
                        on_file=lambda path, st: p.advance(task))
    for note in report.recovered:
        console.print(f"[yellow]recovered:[/yellow] {escape(note)}")
    for f, sid, status in report.results:
        console.print(escape(f"  {status:9s} {sid}  ({f})"))
    for _file, err in report.failures:
        console.print(f"[red]FAILED[/red] {escape(err)}")
    n = {s: sum(1 for r in report.results if r[2] == s) for s in ("added", "replaced", "unchanged")}
    result(corpus=a.corpus, files=len(sources), failed=len(report.failures), **n)
    return 0 if report.ok else 1


# ---- inspect ------------------------------------------------------------------------------------------
def cmd_inspect(a: argparse.Namespace) -> int:
    from data_service.inventory import summarize
    from data_service.reader import Corpus

    Corpus(a.corpus)  # refuses a directory that is not a corpus, with a clear error
    inv = summarize(a.corpus)
    if a.plot:
        from data_service.plots import plot_session

        sid = a.session or (inv["session_rows"][0]["session_id"] if inv["session_rows"] else None)
        if sid is None:
            console.print("[red]the corpus is empty: nothing to plot[/red]")
            return 1
        console.print(f"plot of {sid}: {plot_session(a.corpus, sid, a.plot, t0=a.t0, seconds=a.seconds)}")
    if a.json:
        print(json.dumps({**inv, "readouts": readout_report(inv["session_rows"], a.config)}, indent=1))
    else:
        out = Console(width=None if sys.stdout.isatty() else 160)
        out.print(f"[bold]{inv['corpus']}[/bold]  fingerprint {inv['fingerprint']}")
        out.print(f"{inv['sessions']} sessions, {inv['subjects']} subjects, {inv['units']:,} units, "
                  f"{inv['spikes']:,} spikes, {inv['hours']:.2f} h "
                  f"(train {inv['split_hours']['train']:.2f} h, valid {inv['split_hours']['valid']:.2f} h, "
                  f"test {inv['split_hours']['test']:.2f} h)")
        out.print("behaviours: " + ", ".join(f"{k} ({v})" for k, v in sorted(inv["behaviours"].items())))
        out.print("sources: " + ", ".join(f"{k} ({v})" for k, v in sorted(inv["source_formats"].items())))
        rows = inv["session_rows"]
        shown = rows if a.all else rows[:20]
        t = Table(show_lines=False)
        for col in ("session", "subject", "task", "units", "spikes", "minutes", "train/valid/test s",
                    "behaviours", "timing"):
            t.add_column(col)
        for r in shown:
            t.add_row(r["session_id"], r["subject"], r["task"], str(r["n_units"]), f"{r['n_spikes']:,}",
                      f"{r['duration_s'] / 60:.1f}", f"{r['train_s']:.0f}/{r['valid_s']:.0f}/{r['test_s']:.0f}",
                      ",".join(r["behaviours"]),
                      f"{r['timing_resolution_s'] * 1e3:g} ms bins" if r["timing_resolution_s"] else "exact")
        out.print(t)
        if len(rows) > len(shown):
            out.print(f"... {len(rows) - len(shown)} more sessions (--all to list them)")
        for line in _readout_lines(readout_report(rows, a.config)):
            out.print(escape(line))
    result(corpus=a.corpus, sessions=inv["sessions"], subjects=inv["subjects"], units=inv["units"],
           spikes=inv["spikes"], hours=f"{inv['hours']:.3f}", fingerprint=inv["fingerprint"])
    return 0


def readout_report(rows: list[dict], config: str | None) -> dict:
    """Which sessions feed which readout (the first accepted behaviour a session has), and the
    sessions no readout decodes (they would not be trained on)."""
    from pretrain.run.config import load_config

    readouts = load_config(config).data.readouts
    fed: dict[str, dict[str, list[str]]] = {r: {} for r in readouts}
    orphans = {}
    for r in rows:
        hit = False
        for name, accepted in readouts.items():
            b = next((x for x in accepted if x in r["behaviours"]), None)
            if b is not None:
                fed[name].setdefault(b, []).append(r["session_id"])
                hit = True
        if not hit:
            orphans[r["session_id"]] = list(r["behaviours"])
    return {"config": config or "defaults", "readouts": fed, "no_readout": orphans}


def _readout_lines(rep: dict) -> list[str]:
    src = rep["config"] if rep["config"] != "defaults" else "the default data.readouts"
    lines = [f"readout {name} (from {src}): " + (", ".join(f"{b} in {len(v)} sessions" for b, v in fed.items())
                                                or "no session") for name, fed in rep["readouts"].items()]
    orphans = [f"{s} (has {', '.join(b) or 'no behaviour'})" for s, b in rep["no_readout"].items()]
    if orphans:
        lines.append(f"no readout decodes {len(orphans)} session(s), they would not be trained on: "
                     + "; ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else ""))
    return lines


# ---- verify -------------------------------------------------------------------------------------------
def cmd_verify(a: argparse.Namespace) -> int:
    from data_service.manifest import read_manifest
    from data_service.verify import verify

    if not Path(a.corpus).is_dir():
        raise CorpusError("no corpus directory here", file=a.corpus)
    try:
        total = len(a.session) if a.session else len(read_manifest(Path(a.corpus)))
    except ValueError:  # an unreadable manifest: verify() reports it
        total = 0
    with _progress() as p:
        task = p.add_task(f"verify {a.corpus}", total=total or None)
        report = verify(a.corpus, sessions=a.session, on_session=lambda sid: p.advance(task))
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    for prob in report.problems:
        console.print(f"[red]PROBLEM[/red] {escape(str(prob))}")
    if report.ok:
        console.print(f"[green]ok[/green]: {report.sessions_checked} sessions, {report.arrays_checked} arrays verified")
    result(corpus=a.corpus, sessions=report.sessions_checked, arrays=report.arrays_checked,
           problems=len(report.problems))
    return 0 if report.ok else 1


# ---- pretrain -----------------------------------------------------------------------------------------
def cmd_pretrain(a: argparse.Namespace) -> int:
    from pretrain.run.config import load_config
    from pretrain.run.launch import pretrain

    cfg = load_config(a.config, a.set or [])
    keys = {o.partition("=")[0].strip() for o in a.set or []}
    if "data.corpus" in keys and not any(k == "data.synth" or k.startswith("data.synth.") for k in keys):
        cfg.data.synth = None  # a corpus named on the command line must exist: a typo never makes a new one
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


# ---- the registry: models, promote, pull --------------------------------------------------------------------
def _tracking(a: argparse.Namespace) -> str:
    from pretrain.tracking.config import TrackingConfig
    from pretrain.tracking.mlflow_runs import tracking_uri

    return tracking_uri(TrackingConfig(uri=a.tracking_uri))


def cmd_models(a: argparse.Namespace) -> int:
    from pretrain.tracking.registry import versions

    uri = _tracking(a)
    rows, aliases = versions(uri, a.name)
    by_version: dict[str, list[str]] = {}
    for al, v in aliases.items():
        by_version.setdefault(v, []).append("@" + al)
    t = Table(title=f"{a.name} in {uri}")
    for col in ("version", "aliases", "kind", "valid/test R2", "source", "run"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["version"], " ".join(sorted(by_version.get(r["version"], []))), r.get("kind", ""),
                  r.get("valid_r2", r.get("test_r2", "")), r.get("source_model", ""), r.get("ray_run", r["run_id"] or ""))
    Console(width=160).print(t)
    result(name=a.name, versions=len(rows), aliases=",".join(f"{k}:{v}" for k, v in sorted(aliases.items())) or "none")
    return 0


def cmd_promote(a: argparse.Namespace) -> int:
    from pretrain.tracking.registry import promote

    before = promote(_tracking(a), a.name, a.version, a.alias)
    say(f"@{a.alias} of {a.name}: version {before or '(none)'} -> {a.version}")
    result(model_uri=f"models:/{a.name}@{a.alias}", version=a.version, previous=before or "none")
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    from pretrain.tracking.registry import pull

    uri = a.model if a.model.startswith("models:/") else f"models:/{a.model}"
    ref, path = pull(uri, _tracking(a), a.cache)
    if a.out:
        import shutil

        shutil.copytree(path, a.out, dirs_exist_ok=True)
        path = Path(a.out)
    say(f"{uri} is {ref.uri}: weights, config, vocabularies and model card in {path}")
    result(model_uri=ref.uri, path=path)
    return 0


# ---- with the tracking server back: tracking-sync, register ----------------------------------------------
def cmd_tracking_sync(a: argparse.Namespace) -> int:
    from pretrain.tracking.offline import register_command, sync_run

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


def cmd_register(a: argparse.Namespace) -> int:
    from pretrain.tracking.offline import register_export

    version, uri, run_id, rep = register_export(a.export, a.run, name=a.name, alias=a.alias, uri=a.tracking_uri)
    if rep is not None and (rep.created or rep.metrics or rep.ended):
        say(f"{a.run}: " + ", ".join([*([f"created its MLflow run {run_id}"] if rep.created else []),
                                      f"{rep.metrics} kept metric records sent", *([f"set {rep.ended}"] if rep.ended else [])]))
    say(f"registered {a.export} as {uri} (run {run_id})" + (f"; @{a.alias} now points at it" if a.alias else ""))
    result(model_uri=uri, model_version=version, mlflow_run_id=run_id)
    return 0


# ---- finetune -----------------------------------------------------------------------------------------
def cmd_finetune(a: argparse.Namespace) -> int:
    from pretrain.finetune.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(model=a.model, corpus=a.corpus, sessions=a.session or [], mode=a.mode, labels=a.labels,
                         steps=a.steps, unfreeze_after=a.unfreeze_after, batch=a.batch, seed=a.seed,
                         eval_every=a.eval_every, warm_start=a.warm_start, replace_session=a.replace_session,
                         register=a.register, alias=a.alias, tracking_uri=a.tracking_uri, out=a.out, name=a.name,
                         readouts=a.readout or [],
                         **({"lr_unit_id": a.lr} if a.lr and a.mode != "full" else {}),
                         **({"lr_full": a.lr} if a.lr and a.mode == "full" else {}))
    r = finetune(cfg, notify=say, show_progress=not a.no_progress)
    for s, v in r.per_session.items():
        say(f"  {s}: test R2 {v['test']:.3f} [95 % {v['test_ci'][0]:.3f}, {v['test_ci'][1]:.3f}], valid R2 "
            f"{v['valid']:.3f} ({r.labelled_s[s]:.0f} s of labels to train on; selection on {v['valid_s']:.0f} s of valid)")
    say(f"finetune {r.name}: {r.mode} in {r.seconds:.0f} s, best validation at step {r.best_step}; model {r.model_uri}")
    result(test_r2=f"{r.test_r2:.4f}", valid_r2=f"{r.valid_r2:.4f}", model_uri=r.model_uri, seconds=f"{r.seconds:.0f}",
           mode=r.mode, labels=r.labels, source=r.source)
    return 0


# ---- evaluate, decode ---------------------------------------------------------------------------------
def _load_model(a: argparse.Namespace):
    from pretrain.tracking.registry import load

    return load(a.model, _tracking(a) if a.model.startswith("models:/") else None, a.cache)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from data_service.reader import open_corpus
    from pretrain.decoding.evaluate import plot_session, predict_session

    corpus = open_corpus(a.corpus)  # a mistyped corpus fails before a model is pulled from the registry
    model, tok, path = _load_model(a)
    known = set(model.session_emb.ids)
    sessions = a.session or [s for s in corpus.session_ids if s in known]
    if not sessions:
        raise CorpusError(f"no session of the corpus is in the model's vocabulary ({len(known)} sessions); "
                          "name one with --session after adapting the model to it (popscale finetune)",
                          file=a.corpus)
    from pretrain.decoding.stitch import UnknownRecording

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}
    for sid in sessions:
        if sid not in corpus.rows:
            raise CorpusError("session not in the corpus", file=a.corpus, session=sid)
        if sid not in known:
            raise UnknownRecording(f"session {sid}: not in the model's vocabulary; adapt first: popscale finetune "
                                   f"--model {a.model} --corpus {a.corpus} --session {sid}")
        r = predict_session(model, tok, corpus.session(sid), a.split)
        if r is None:
            say(f"  {sid}: nothing to score in its {a.split} split (no behaviour the model decodes there)")
            continue
        results[sid] = r
        rows += [(sid, b, v, r.per_behaviour_ci.get(b, (float("nan"),) * 2)) for b, v in r.per_behaviour.items()]
        plot_session(r, str(out / f"{sid}_{a.split}.png"), split=a.split)
    t = Table(title=f"{a.model}: R2 on the {a.split} split (95 % bootstrap interval over trials or 10 s blocks)")
    for col in ("session", "behaviour", "R2", "95 % interval"):
        t.add_column(col)
    for sid, b, v, (lo, hi) in rows:
        t.add_row(sid, b, f"{v:.4f}", f"[{lo:.3f}, {hi:.3f}]")
    mean = float(sum(r.r2 for r in results.values()) / len(results)) if results else float("nan")
    t.add_row("mean", "", f"{mean:.4f}", "")
    Console(width=120).print(t)
    report = {"model": a.model, "path": str(path), "corpus": a.corpus, "split": a.split, "r2": mean,
              "sessions": {s: {"r2": r.r2, "ci95": list(r.ci), "per_behaviour": r.per_behaviour,
                               "per_behaviour_ci95": {b: list(c) for b, c in r.per_behaviour_ci.items()},
                               "samples": len(r.times)}
                           for s, r in results.items()}}
    (out / "evaluate.json").write_text(json.dumps(report, indent=1))
    say(f"table in {out / 'evaluate.json'}, plots of decoded vs true in {out}")
    result(r2=f"{mean:.4f}", split=a.split, sessions=len(results), json=out / "evaluate.json")
    return 0


def _input_session(a: argparse.Namespace, tmp: str):
    """(corpus, session id) to decode: the named one, or the one ingested from --input."""
    from data_service.reader import open_corpus

    if a.input:
        from data_service.ingest import ingest
        from data_service.ingest.common import IngestOptions

        report = ingest([a.input], Path(tmp) / "corpus", lambda _p: IngestOptions())
        if not report.ok:
            raise CorpusError(report.failures[0][1])
        ids = [sid for _, sid, _ in report.results]
        if a.session:
            if a.session not in ids:
                raise CorpusError(f"no session {a.session!r} in the file (it has {ids})", file=a.input)
            ids = [a.session]
        if len(ids) != 1:
            raise ConfigError(f"{a.input} holds sessions {ids}: choose one with --session")
        return open_corpus(Path(tmp) / "corpus"), ids[0]
    if not (a.corpus and a.session):
        raise ConfigError("decode needs --input FILE or both --corpus C and --session S")
    return open_corpus(a.corpus), a.session


def cmd_decode(a: argparse.Namespace) -> int:
    import tempfile

    from pretrain.decoding.stitch import decode_session, plot_decoded, write_csv, write_nwb

    out = Path(a.out)
    if out.suffix not in (".csv", ".nwb"):
        raise ConfigError(f"--out {a.out}: the predictions go to a .csv or an .nwb file")
    model, tok, _ = _load_model(a)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, sid = _input_session(a, tmp)
        if sid not in corpus.rows:
            raise CorpusError("session not in the corpus", file=str(corpus.root), session=sid)
        reader = corpus.session(sid)
        rows = None
        if a.split:
            rows = reader.intervals.get(a.split)
            if rows is None or not len(rows):
                raise CorpusError(f"the session has no {a.split} split", file=str(corpus.root), session=sid)
        decoded = decode_session(model, tok, reader, rows, hz=a.hz, model_uri=a.model)
        units = {b: meta.get("unit", "unknown") for b, meta in reader.attrs.get("behaviour", {}).items()}
        if out.suffix == ".csv":
            write_csv(decoded, out)
        else:
            write_nwb(decoded, out, source=a.input or f"{a.corpus}:{sid}", units=units)
        plot = plot_decoded(decoded, out.with_suffix(".png"), reader)
    n = sum(int((d.windows > 0).sum()) for d in decoded.values())
    say(f"decoded {sid}: {n} timestamped predictions ({', '.join(f'{d.readout}: {d.behaviour}' for d in decoded.values())})"
        f" in {out}; plot {plot}")
    result(out=out, session=sid, predictions=n, plot=plot)
    return 0


# ---- baseline -----------------------------------------------------------------------------------------
def cmd_baseline(a: argparse.Namespace) -> int:
    from data_service.reader import open_corpus
    from pretrain.decoding.baselines import run_baseline
    from pretrain.tokens.labels import LabelBudget

    budget = LabelBudget.parse(a.labels)
    corpus = open_corpus(a.corpus)
    if a.session not in corpus.rows:
        raise CorpusError("session not in the corpus", file=a.corpus, session=a.session)
    r = run_baseline(a.method, corpus.session(a.session), budget, a.seed, a.window, a.behaviour, a.kind,
                     causal=not a.non_causal)
    variant = "causal" if r.causal else "non-causal"
    say(f"{r.method} ({variant}) on {r.session} ({r.behaviour}, {budget} labels = {r.labelled_s:.0f} s): test R2 "
        f"{r.test_r2:.4f} [95 % {r.test_ci[0]:.3f}, {r.test_ci[1]:.3f}], valid R2 {r.valid_r2:.4f} (chosen on "
        f"{r.valid_s:.0f} s of valid: {r.params}; {r.seconds:.0f} s)")
    result(test_r2=f"{r.test_r2:.4f}", test_ci_low=f"{r.test_ci[0]:.4f}", test_ci_high=f"{r.test_ci[1]:.4f}",
           valid_r2=f"{r.valid_r2:.4f}", method=r.method, variant=variant, session=r.session, labels=budget,
           seconds=f"{r.seconds:.0f}")
    return 0


# ---- scaling sweeps ---------------------------------------------------------------------------------------
def cmd_sweep(a: argparse.Namespace) -> int:
    from pretrain.scaling.plan import load_sweep
    from pretrain.scaling.sweep import run_sweep

    cfg = load_sweep(a.config, a.set or [])
    r = run_sweep(cfg, a.tracking_uri, notify=say, show_progress=not a.no_progress, only=a.point)
    say(f"sweep {r.name}: {r.points} points ({r.ran} run now, {r.skipped} finished before) in {r.seconds / 60:.1f} min;"
        f" fit it with `popscale scaling-fit --sweep {r.name}`")
    result(sweep=r.name, points=r.points, ran=r.ran, skipped=r.skipped, parent_run_id=r.parent_run_id,
           directory=r.directory, seconds=f"{r.seconds:.0f}")
    return 0


def cmd_scaling_fit(a: argparse.Namespace) -> int:
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


# ---- push: a corpus onto shared object storage -------------------------------------------------------------
def cmd_push(a: argparse.Namespace) -> int:
    from data_service.manifest import read_manifest
    from data_service.push import push_corpus

    n = len(read_manifest(Path(a.corpus)))
    with _progress() as p:
        task = p.add_task(f"push → {a.url}", total=n)
        counts = push_corpus(a.corpus, a.url, replace=a.replace, on_session=lambda sid, st: p.advance(task))
    say(f"{a.url}: {counts['uploaded']} sessions uploaded, {counts['replaced']} replaced, {counts['unchanged']} "
        f"already there; train from it with --set data.corpus={a.url}")
    result(url=a.url, sessions=n, **counts)
    return 0


# ---- cluster jobs: submit, jobs ------------------------------------------------------------------------
def _env_pairs(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for kv in pairs or []:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--env {kv!r}: expected KEY=VALUE")
        out[k.strip()] = v
    return out


def cmd_submit(a: argparse.Namespace) -> int:
    from popscale.jobs import SubmitOptions, job_address, submit

    cmd = list(a.entrypoint)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    o = SubmitOptions(entrypoint=cmd, address=a.address, working_dir=a.working_dir, env=_env_pairs(a.env),
                      wait=not a.no_wait, submission_id=a.job_id, entrypoint_num_cpus=a.num_cpus,
                      entrypoint_num_gpus=a.num_gpus)
    say(f"submitting `{' '.join(cmd)}` to {job_address(a.address)} (working dir {Path(a.working_dir).resolve()})")
    job_id, status = submit(o)
    say(f"job {job_id}: {status}" + ("" if o.wait else f"; follow it with `popscale jobs logs {job_id} --follow`"))
    result(job_id=job_id, status=status, address=job_address(a.address))
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def cmd_jobs(a: argparse.Namespace) -> int:
    from popscale.jobs import client, follow, job_address, status_name

    if a.action != "list" and not a.job_id:
        raise ConfigError(f"popscale jobs {a.action} needs a job id (popscale jobs list shows them)")
    c = client(a.address)
    if a.action == "list":
        jobs = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
        t = Table(title=f"jobs on {redact(job_address(a.address))}")
        for col in ("job id", "status", "entrypoint", "started"):
            t.add_column(col)
        for j in jobs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else ""
            t.add_row(j.submission_id or j.job_id or "", status_name(j.status), redact(j.entrypoint), started)
        Console(width=160).print(t)
        result(jobs=len(jobs), running=sum(status_name(j.status) == "RUNNING" for j in jobs))
        return 0
    if a.action == "logs":
        if a.follow:
            status = follow(c, a.job_id)
        else:
            sys.stdout.write(c.get_job_logs(a.job_id))
            status = status_name(c.get_job_status(a.job_id))
        result(job_id=a.job_id, status=status)
        return 0
    if a.action == "status":
        status = status_name(c.get_job_status(a.job_id))
        result(job_id=a.job_id, status=status)
        return 0
    stopped = c.stop_job(a.job_id)
    say(f"job {a.job_id}: " + ("stop requested" if stopped else "was not running"))
    result(job_id=a.job_id, stopped=str(stopped).lower(), status=status_name(c.get_job_status(a.job_id)))
    return 0


# ---- parser -------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors end like every other error
        self.print_usage(sys.stderr)
        fail(f"{self.prog}: {message}", "usage")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="popscale", description="Pretraining for neural population decoding.")
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="make a synthetic corpus of reaching sessions")
    s.add_argument("--corpus", required=True)
    s.add_argument("--sessions", type=int, default=16)
    s.add_argument("--subjects", type=int, default=4)
    s.add_argument("--minutes", type=float, default=10.0, help="mean session length")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--pool-size", type=int, default=400, help="neurons per subject")
    s.add_argument("--min-units", type=int, default=60)
    s.add_argument("--max-units", type=int, default=200)
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--replace", action="store_true")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("ingest", help="add NWB, MAT or temporaldata files to a corpus")
    s.add_argument("sources", nargs="+", help="files or directories")
    s.add_argument("--corpus", required=True)
    s.add_argument("--meta", help="YAML mapping file names to metadata (subject, species, task, area, bin_width_s)")
    s.add_argument("--subject")
    s.add_argument("--session-id")
    s.add_argument("--species")
    s.add_argument("--task")
    s.add_argument("--area", help="brain area for units whose area the file does not give")
    s.add_argument("--bin-width", type=float, help="bin width in seconds for binned counts that do not store it")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--valid-frac", type=float, default=0.1)
    s.add_argument("--test-frac", type=float, default=0.2)
    s.add_argument("--gap", type=float, default=1.0, help="seconds kept between train and held-out data")
    s.add_argument("--drop-nan-behaviour", action="store_true")
    s.add_argument("--replace", action="store_true", help="overwrite sessions with the same id")
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("inspect", help="what a corpus holds")
    s.add_argument("corpus")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="list every session")
    s.add_argument("--plot", help="write a PNG of a stretch of one session")
    s.add_argument("--session")
    s.add_argument("--t0", type=float)
    s.add_argument("--seconds", type=float, default=10.0)
    s.add_argument("--config", help="a run config whose data.readouts to match sessions against (default: the defaults)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("pretrain", help="pretrain a model (Ray + DeepSpeed, tracked in MLflow)")
    s.add_argument("--config", default="configs/demo.yaml", help="YAML run config (default: the embedded demo)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.steps=50")
    s.add_argument("--resume", metavar="RUN", help="continue a run from its last checkpoint (its name)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_pretrain)

    s.add_argument("--alias", help="point this alias of the registered model at the new version (default: none moves)")

    def tracking_flag(s):
        s.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")

    def model_flag(s):
        s.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported directory")

    s = sub.add_parser("tracking-sync", help="send a run's MLflow record kept while the server was away "
                                             "(creates its run if it had none)")
    s.add_argument("run_dir", help="the run's directory (cluster.storage_path/RUN: it holds popscale_run.json)")
    s.add_argument("--tracking-uri", help="MLflow store (default: the one the run used, else $MLFLOW_TRACKING_URI, "
                                          "else runs/mlflow.db)")
    s.set_defaults(fn=cmd_tracking_sync)

    s = sub.add_parser("register", help="register an exported model as a new version (what a run could not do "
                                        "while the server was away)")
    s.add_argument("export", help="the exported model's directory (model.safetensors + config.json)")
    s.add_argument("--run", required=True, help="the run's directory (synced first) or its MLflow run id")
    s.add_argument("--name", help="registered model (default: what the run kept, else popscale-poyo)")
    s.add_argument("--alias", help="point this alias at the new version (default: what the run kept, else none)")
    s.add_argument("--tracking-uri", help="MLflow store (default: the one the run used, else $MLFLOW_TRACKING_URI, "
                                          "else runs/mlflow.db)")
    s.set_defaults(fn=cmd_register)

    s = sub.add_parser("models", help="a registered model's versions and which version each alias points at")
    s.add_argument("name", nargs="?", default="popscale-poyo")
    tracking_flag(s)
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("promote", help="point an alias of a registered model at a version")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("alias")
    tracking_flag(s)
    s.set_defaults(fn=cmd_promote)

    s = sub.add_parser("pull", help="fetch a registered model's files (safetensors + JSON) into a local cache")
    s.add_argument("model", help="NAME@ALIAS, NAME/VERSION or a models:/ URI")
    s.add_argument("--out", help="also copy the files here")
    s.add_argument("--cache", default="runs/models")
    tracking_flag(s)
    s.set_defaults(fn=cmd_pull)

    s = sub.add_parser("finetune", help="adapt a model to unseen sessions (unit identification or fine-tuning)")
    model_flag(s)
    s.add_argument("--corpus", required=True)
    s.add_argument("--session", action="append", help="a session to adapt to (repeat for several)")
    s.add_argument("--mode", default="unit-id", choices=["unit-id", "full", "unit-id-then-full"])
    s.add_argument("--labels", default="100%", help="label budget: 10%% of the train split, or a duration (2m, 90s)")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--unfreeze-after", type=int, help="unit-id-then-full: unit-id steps first (default half)")
    s.add_argument("--lr", type=float, help="learning rate (default 1e-2 unit-id, 1e-3 full)")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--seed", type=int, default=0, help="seeds the label draw and the training")
    s.add_argument("--eval-every", type=int, default=25)
    s.add_argument("--warm-start", default="auto", help="auto (as the model was pretrained) | ridge | none")
    s.add_argument("--replace-session", action="store_true", help="adapt afresh to a session the model knows")
    s.add_argument("--readout", action="append", metavar="NAME:KIND:DIMS=BEHAVIOUR",
                   help="add a readout for a behaviour the model was not pretrained on (kind: continuous, angular, "
                        "categorical), e.g. head_direction:angular:2=compass_direction[ry]")
    s.add_argument("--register", metavar="NAME", help="register the adapted model under this name")
    s.add_argument("--alias", help="with --register: point this alias at the new version")
    s.add_argument("--name", help="run name (default: sessions, mode and time)")
    s.add_argument("--out", default="runs/finetune")
    s.add_argument("--no-progress", action="store_true")
    tracking_flag(s)
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("evaluate", help="R2 of a model per session and behaviour (stitched windows), table + JSON + plots")
    model_flag(s)
    s.add_argument("--corpus", required=True)
    s.add_argument("--session", action="append", help="default: every session of the corpus the model knows")
    s.add_argument("--split", default="test", choices=["train", "valid", "test"])
    s.add_argument("--out", default="runs/evaluate")
    s.add_argument("--cache", default="runs/models")
    tracking_flag(s)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("decode", help="decode a whole recording into timestamped predictions (CSV or NWB) + a plot")
    model_flag(s)
    s.add_argument("--input", help="a recording file (NWB, MAT, temporaldata) of a session the model knows")
    s.add_argument("--corpus")
    s.add_argument("--session")
    s.add_argument("--out", required=True, help="PRED.csv or PRED.nwb (a PNG is written beside it)")
    s.add_argument("--hz", type=float, default=100.0, help="query rate where the recording has no behaviour samples")
    s.add_argument("--split", choices=["train", "valid", "test"],
                   help="decode only this split's intervals, with the windows `evaluate` uses (default: everything)")
    s.add_argument("--cache", default="runs/models")
    tracking_flag(s)
    s.set_defaults(fn=cmd_decode)

    s = sub.add_parser("baseline", help="a per-session baseline (Wiener filter, GRU) in the same harness")
    s.add_argument("--method", required=True, choices=["ridge", "gru"])
    s.add_argument("--corpus", required=True)
    s.add_argument("--session", required=True)
    s.add_argument("--labels", default="100%", help="label budget, as for finetune (10%%, 2m)")
    s.add_argument("--behaviour", help="default: the first a readout decodes (hand_vel, ...); NAME[COLUMN] takes one column")
    s.add_argument("--kind", default="continuous", choices=["continuous", "angular"],
                   help="angular: an angle in radians, scored as R2 on (cos, sin) like the model's angular readout")
    s.add_argument("--seed", type=int, default=0, help="seeds the label draw (and the GRU)")
    s.add_argument("--window", type=float, default=1.0, help="labels come in stretches of at least this (s)")
    s.add_argument("--non-causal", action="store_true",
                   help="also read 0.3 s of spikes after each sample (baselines.AFTER_S; POYO's stitched windows see the future "
                        "too); the default reads only the past")
    s.set_defaults(fn=cmd_baseline)

    s = sub.add_parser("sweep", help="a scaling sweep: one pretraining run per point, on Ray, tracked in MLflow")
    s.add_argument("--config", required=True, help="sweep YAML (configs/sweeps/*.yaml)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a sweep-file value, e.g. budget.steps=50")
    s.add_argument("--point", action="append", help="run only this point (its key; repeatable)")
    s.add_argument("--no-progress", action="store_true")
    tracking_flag(s)
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("scaling-fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to a sweep, with bootstrap intervals")
    s.add_argument("--sweep", required=True, help="the sweep's name, its directory, or its MLflow parent run id")
    s.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    s.add_argument("--budget", type=float, help="training FLOPs for the compute-optimal allocation (default: the "
                                                "largest point's)")
    s.add_argument("--storage", default="runs/sweeps", help="where sweeps keep their state (the sweep file's storage)")
    s.add_argument("--out", help="directory for the summary and plots (default: <sweep dir>/fit)")
    tracking_flag(s)
    s.set_defaults(fn=cmd_scaling_fit)

    def address_flag(s):
        s.add_argument("--address", help="the cluster's Jobs API (default: $RAY_API_SERVER_ADDRESS, else "
                                          "http://127.0.0.1:8265)")

    s = sub.add_parser("submit", help="run a popscale command as a job on a Ray cluster (Ray Jobs API), streaming its logs",
                       usage="popscale submit [--address URL] [--no-wait] ... -- popscale COMMAND ...")
    address_flag(s)
    s.add_argument("--working-dir", default=".", help="shipped with the job (runs/, .venv/, .git/ excluded)")
    s.add_argument("--env", action="append", metavar="KEY=VALUE", help="an environment variable for the job (repeatable)")
    s.add_argument("--job-id", help="the job's id (default: Ray's raysubmit_...)")
    s.add_argument("--num-cpus", type=float, help="CPUs reserved for the job's driver")
    s.add_argument("--num-gpus", type=float, help="GPUs reserved for the job's driver")
    s.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- popscale pretrain")
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("jobs", help="list, follow, check or stop Ray cluster jobs")
    s.add_argument("action", choices=["list", "logs", "status", "stop"])
    s.add_argument("job_id", nargs="?")
    s.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    address_flag(s)
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser("push", help="copy a local corpus to shared object storage (s3://bucket/prefix), manifest last")
    s.add_argument("corpus", help="the local corpus")
    s.add_argument("url", help="where it goes, e.g. s3://bucket/corpora/NAME (endpoint: $AWS_ENDPOINT_URL)")
    s.add_argument("--replace", action="store_true", help="overwrite sessions there whose content differs")
    s.set_defaults(fn=cmd_push)

    s = sub.add_parser("verify", help="re-check checksums and invariants")
    s.add_argument("corpus")
    s.add_argument("--session", action="append")
    s.set_defaults(fn=cmd_verify)
    return p


def fail(message: str, kind: str) -> None:
    console.print(f"[red]error:[/red] {escape(redact(message))}", soft_wrap=True, highlight=False)
    result(error=kind)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - every error ends as one line and a RESULT line
        if args.debug:
            raise
        message = str(e)
        if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in message:
            message = f"{e.filename}: {e.strerror or e}"
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()] or [type(e).__name__]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # e.g. a worker's traceback
        if len(lines) > 1 or not isinstance(e, (ValueError, OSError, RuntimeError, CorpusError, LookupError)):
            message = f"{message} (popscale --debug {args.command} ... shows the whole error)"
        fail(message, type(e).__name__)
        return 2 if isinstance(e, ConfigError) else 1  # 2: asked wrongly (usage); 1: input or job failed


if __name__ == "__main__":
    sys.exit(main())
