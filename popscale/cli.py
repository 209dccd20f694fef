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
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from data_service.errors import ConfigError, CorpusError

console = Console(stderr=True)


def say(message: str) -> None:
    """One line to the user (stderr; never wrapped, so a script can grep it)."""
    console.print(escape(message), soft_wrap=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def result(**kv) -> None:
    print("RESULT " + " ".join(f"{k}={v}" for k, v in kv.items()), flush=True)


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
    from data_service.ingest.common import IngestOptions, load_metadata_file, options_for
    from data_service.splits import SplitConfig

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
    cli = {"subject": a.subject, "session_id": a.session_id, "species": a.species, "task": a.task,
           "area": a.area, "bin_width_s": a.bin_width}
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
        print(json.dumps(inv, indent=1))
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
    result(corpus=a.corpus, sessions=inv["sessions"], subjects=inv["subjects"], units=inv["units"],
           spikes=inv["spikes"], hours=f"{inv['hours']:.3f}", fingerprint=inv["fingerprint"])
    return 0


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
    from pretrain.launch import pretrain
    from pretrain.run_config import load_config

    cfg = load_config(a.config, a.set or [])
    keys = {o.partition("=")[0].strip() for o in a.set or []}
    if "data.corpus" in keys and not any(k == "data.synth" or k.startswith("data.synth.") for k in keys):
        cfg.data.synth = None  # a corpus named on the command line must exist: a typo never makes a new one
    r = pretrain(cfg, resume=a.resume, show_progress=not a.no_progress, notify=say)
    say(f"run {r.name}: {r.steps} steps in {r.seconds / 60:.1f} min, validation R2 {r.valid_r2:.3f}")
    if r.model_uri:
        say(f"registered {r.model_uri} (version {r.model_version}) in {r.tracking_uri}")
    result(valid_r2=f"{r.valid_r2:.4f}", model_uri=r.model_uri or "none", model_version=r.model_version or "none",
           run=r.name, mlflow_run_id=r.mlflow_run_id, steps=r.steps, seconds=f"{r.seconds:.0f}")
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
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("pretrain", help="pretrain a model (Ray + DeepSpeed, tracked in MLflow)")
    s.add_argument("--config", default="configs/demo.yaml", help="YAML run config (default: the embedded demo)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.steps=50")
    s.add_argument("--resume", metavar="RUN", help="continue a run from its last checkpoint (its name)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("verify", help="re-check checksums and invariants")
    s.add_argument("corpus")
    s.add_argument("--session", action="append")
    s.set_defaults(fn=cmd_verify)
    return p


def fail(message: str, kind: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
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
        if len(lines) > 1 or not isinstance(e, (ValueError, OSError, RuntimeError, CorpusError)):
            message = f"{message} (popscale --debug {args.command} ... shows the whole error)"
        fail(message, type(e).__name__)
        return 2 if isinstance(e, ConfigError) else 1  # 2: asked wrongly (usage); 1: input or job failed


if __name__ == "__main__":
    sys.exit(main())
