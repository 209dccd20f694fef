"""Commands on corpora: synth, ingest, inspect, verify, push.
Each command's flags sit beside its handler."""


from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from data_service.errors import ConfigError, CorpusError
from pretrain.run.progress import progress_bar

from .common import console, result, say


def add_synth(sub) -> None:
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


def cmd_synth(a: argparse.Namespace) -> int:
    # deferred: importing zarr only when used keeps start-up light
    from data_service.synth import SynthConfig, synth_corpus

    cfg = SynthConfig(sessions=a.sessions, subjects=a.subjects, minutes=a.minutes, seed=a.seed,
                      pool_size=a.pool_size, min_units=a.min_units, max_units=a.max_units)
    with progress_bar(f"synth → {a.corpus}", cfg.sessions, console=console) as bar:
        counts = synth_corpus(cfg, a.corpus, workers=a.workers, replace=a.replace,
                              on_session=lambda sid, st: bar.advance())
    console.print(f"synthetic corpus {a.corpus}: {counts['added']} added, {counts['replaced']} replaced, "
                  f"{counts['unchanged']} already present")
    result(corpus=a.corpus, sessions=cfg.sessions, **counts)
    return 0


def add_ingest(sub) -> None:
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


def cmd_ingest(a: argparse.Namespace) -> int:
    # deferred: importing h5py, numpy only when used keeps start-up light
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
    with progress_bar(f"ingest → {a.corpus}", len(sources), console=console) as bar:
        report = ingest(sources, a.corpus, lambda path: options_for(path, base, meta, cli), replace=a.replace,
                        on_file=lambda path, st: bar.advance())
    for note in report.recovered:
        console.print(f"[yellow]recovered:[/yellow] {escape(note)}")
    for f, sid, status in report.results:
        console.print(escape(f"  {status:9s} {sid}  ({f})"))
    for _file, err in report.failures:
        console.print(f"[red]FAILED[/red] {escape(err)}")
    n = {s: sum(1 for r in report.results if r[2] == s) for s in ("added", "replaced", "unchanged")}
    result(corpus=a.corpus, files=len(sources), failed=len(report.failures), **n)
    return 0 if report.ok else 1


def readout_report(rows: list[dict], config: str | None) -> dict:
    """Which sessions feed which readout (the first accepted behaviour a session has), and the
    sessions no readout decodes (they would not be trained on)."""
    # deferred: importing torch only when used keeps start-up light
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


def add_inspect(sub) -> None:
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


def cmd_inspect(a: argparse.Namespace) -> int:
    # deferred: importing zarr only when used keeps start-up light
    from data_service.inventory import summarize
    from data_service.reader import Corpus

    Corpus(a.corpus)  # refuses a directory that is not a corpus, with a clear error
    inv = summarize(a.corpus)
    if a.plot:
        # deferred: importing zarr only when used keeps start-up light
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


def add_verify(sub) -> None:
    s = sub.add_parser("verify", help="re-check checksums and invariants")
    s.add_argument("corpus")
    s.add_argument("--session", action="append")
    s.set_defaults(fn=cmd_verify)


def cmd_verify(a: argparse.Namespace) -> int:
    # deferred: importing zarr only when used keeps start-up light
    from data_service.manifest import read_manifest
    from data_service.verify import verify

    if not Path(a.corpus).is_dir():
        raise CorpusError("no corpus directory here", file=a.corpus)
    try:
        total = len(a.session) if a.session else len(read_manifest(Path(a.corpus)))
    except ValueError:  # an unreadable manifest: verify() reports it
        total = 0
    with progress_bar(f"verify {a.corpus}", total or None, console=console) as bar:
        report = verify(a.corpus, sessions=a.session, on_session=lambda sid: bar.advance())
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    for prob in report.problems:
        console.print(f"[red]PROBLEM[/red] {escape(str(prob))}")
    if report.ok:
        console.print(f"[green]ok[/green]: {report.sessions_checked} sessions, {report.arrays_checked} arrays verified")
    result(corpus=a.corpus, sessions=report.sessions_checked, arrays=report.arrays_checked,
           problems=len(report.problems))
    return 0 if report.ok else 1


def add_push(sub) -> None:
    s = sub.add_parser("push", help="copy a local corpus to shared object storage (s3://bucket/prefix), manifest last")
    s.add_argument("corpus", help="the local corpus")
    s.add_argument("url", help="where it goes, e.g. s3://bucket/corpora/NAME (endpoint: $AWS_ENDPOINT_URL)")
    s.add_argument("--replace", action="store_true", help="overwrite sessions there whose content differs")
    s.set_defaults(fn=cmd_push)


def cmd_push(a: argparse.Namespace) -> int:
    # deferred: importing zarr only when used keeps start-up light
    from data_service.manifest import read_manifest
    from data_service.push import push_corpus

    n = len(read_manifest(Path(a.corpus)))
    with progress_bar(f"push → {a.url}", n, console=console) as bar:
        counts = push_corpus(a.corpus, a.url, replace=a.replace, on_session=lambda sid, st: bar.advance())
    say(f"{a.url}: {counts['uploaded']} sessions uploaded, {counts['replaced']} replaced, {counts['unchanged']} "
        f"already there; train from it with --set data.corpus={a.url}")
    result(url=a.url, sessions=n, **counts)
    return 0


def add_commands(sub) -> None:
    add_synth(sub)
    add_ingest(sub)
    add_inspect(sub)
    add_verify(sub)
    add_push(sub)
