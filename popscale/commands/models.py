"""Commands on trained models: the registry (models, promote, pull, register), evaluate, decode and the
per-session baselines.
Each command's flags sit beside its handler."""


from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data_service.errors import ConfigError, CorpusError
from pretrain.tracking.config import TrackingConfig
from pretrain.tracking.mlflow_runs import tracking_uri
from pretrain.tracking.offline import register_export
from pretrain.tracking.tracked_run import register_alone

from .common import model_flag, result, say, tracking_flag


def _tracking(a: argparse.Namespace) -> str:
    return tracking_uri(TrackingConfig(uri=a.tracking_uri))


def add_models(sub) -> None:
    s = sub.add_parser("models", help="a registered model's versions and which version each alias points at")
    s.add_argument("name", nargs="?", default="popscale-poyo")
    tracking_flag(s)
    s.set_defaults(fn=cmd_models)


def cmd_models(a: argparse.Namespace) -> int:
    # deferred: importing torch only when used keeps start-up light
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


def add_promote(sub) -> None:
    s = sub.add_parser("promote", help="point an alias of a registered model at a version")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("alias")
    tracking_flag(s)
    s.set_defaults(fn=cmd_promote)


def cmd_promote(a: argparse.Namespace) -> int:
    # deferred: importing torch only when used keeps start-up light
    from pretrain.tracking.registry import promote

    before = promote(_tracking(a), a.name, a.version, a.alias)
    say(f"@{a.alias} of {a.name}: version {before or '(none)'} -> {a.version}")
    result(model_uri=f"models:/{a.name}@{a.alias}", version=a.version, previous=before or "none")
    return 0


def add_pull(sub) -> None:
    s = sub.add_parser("pull", help="fetch a registered model's files (safetensors + JSON) into a local cache")
    s.add_argument("model", help="NAME@ALIAS, NAME/VERSION or a models:/ URI")
    s.add_argument("--out", help="also copy the files here")
    s.add_argument("--cache", default="runs/models")
    tracking_flag(s)
    s.set_defaults(fn=cmd_pull)


def cmd_pull(a: argparse.Namespace) -> int:
    # deferred: importing torch only when used keeps start-up light
    from pretrain.tracking.registry import pull

    uri = a.model if a.model.startswith("models:/") else f"models:/{a.model}"
    ref, path = pull(uri, _tracking(a), a.cache)
    if a.out:
        shutil.copytree(path, a.out, dirs_exist_ok=True)
        path = Path(a.out)
    say(f"{uri} is {ref.uri}: weights, config, vocabularies and model card in {path}")
    result(model_uri=ref.uri, path=path)
    return 0


def add_register(sub) -> None:
    s = sub.add_parser("register", help="register an exported model as a new version (what a run could not do "
                                        "while the server was away)")
    s.add_argument("export", help="the exported model's directory (model.safetensors + config.json)")
    s.add_argument("--run", help="the run's directory (synced first) or its MLflow run id; without it (a shipped "
                                 "model such as models/poyo-real-1), a small `register` run of its own holds the version")
    s.add_argument("--name", help="registered model (default: what the run kept, else popscale-poyo)")
    s.add_argument("--alias", help="point this alias at the new version (default: what the run kept, else none)")
    s.add_argument("--tracking-uri", help="MLflow store (default: the one the run used, else $MLFLOW_TRACKING_URI, "
                                          "else runs/mlflow.db)")
    s.set_defaults(fn=cmd_register)


def cmd_register(a: argparse.Namespace) -> int:
    if a.run is None:
        fin = register_alone(a.export, name=a.name or TrackingConfig().registered_model, alias=a.alias,
                             uri=a.tracking_uri)
        moved = f"; @{a.alias} now points at it" if a.alias else ""
        say(f"registered {a.export} as {fin.model_uri} (run {fin.run_id}){moved}")
        result(model_uri=fin.model_uri, model_version=fin.version, mlflow_run_id=fin.run_id)
        return 0
    version, uri, run_id, rep = register_export(a.export, a.run, name=a.name, alias=a.alias, uri=a.tracking_uri)
    if rep is not None and (rep.created or rep.metrics or rep.ended):
        say(f"{a.run}: " + ", ".join([*([f"created its MLflow run {run_id}"] if rep.created else []),
                                      f"{rep.metrics} kept metric records sent", *([f"set {rep.ended}"] if rep.ended else [])]))
    say(f"registered {a.export} as {uri} (run {run_id})" + (f"; @{a.alias} now points at it" if a.alias else ""))
    result(model_uri=uri, model_version=version, mlflow_run_id=run_id)
    return 0


def _load_model(a: argparse.Namespace):
    # deferred: importing torch only when used keeps start-up light
    from pretrain.tracking.registry import load

    return load(a.model, _tracking(a), a.cache)  # NAME@ALIAS and models:/ URIs are pulled from the registry


def add_evaluate(sub) -> None:
    s = sub.add_parser("evaluate", help="R2 of a model per session and behaviour (stitched windows), table + JSON + plots")
    model_flag(s)
    s.add_argument("--corpus", required=True)
    s.add_argument("--session", action="append", help="default: every session of the corpus the model knows")
    s.add_argument("--split", default="test", choices=["train", "valid", "test"])
    s.add_argument("--causal", action="store_true",
                   help="score each sample's prediction from the window ending at it (no later spike), as `serve` decodes")
    s.add_argument("--out", default="runs/evaluate")
    s.add_argument("--cache", default="runs/models")
    tracking_flag(s)
    s.set_defaults(fn=cmd_evaluate)


def cmd_evaluate(a: argparse.Namespace) -> int:
    # deferred: importing torch, zarr only when used keeps start-up light
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
    # deferred: importing torch only when used keeps start-up light
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
        r = predict_session(model, tok, corpus.session(sid), a.split, causal=a.causal)
        if r is None:
            say(f"  {sid}: nothing to score in its {a.split} split (no behaviour the model decodes there)")
            continue
        results[sid] = r
        rows += [(sid, b, v, r.per_behaviour_ci.get(b, (float("nan"),) * 2)) for b, v in r.per_behaviour.items()]
        plot_session(r, str(out / f"{sid}_{a.split}.png"), split=a.split)
    how = "causal: each sample from the window ending at it" if a.causal else "stitched windows"
    t = Table(title=f"{a.model}: R2 on the {a.split} split, {how} (95 % bootstrap interval over trials or 10 s blocks)")
    for col in ("session", "behaviour", "R2", "95 % interval"):
        t.add_column(col)
    for sid, b, v, (lo, hi) in rows:
        t.add_row(sid, b, f"{v:.4f}", f"[{lo:.3f}, {hi:.3f}]")
    mean = float(sum(r.r2 for r in results.values()) / len(results)) if results else float("nan")
    t.add_row("mean", "", f"{mean:.4f}", "")
    Console(width=120).print(t)
    report = {"model": a.model, "path": str(path), "corpus": a.corpus, "split": a.split, "causal": a.causal, "r2": mean,
              "sessions": {s: {"r2": r.r2, "ci95": list(r.ci), "per_behaviour": r.per_behaviour,
                               "per_behaviour_ci95": {b: list(c) for b, c in r.per_behaviour_ci.items()},
                               "samples": len(r.times)}
                           for s, r in results.items()}}
    (out / "evaluate.json").write_text(json.dumps(report, indent=1))
    say(f"table in {out / 'evaluate.json'}, plots of decoded vs true in {out}")
    result(r2=f"{mean:.4f}", split=a.split, causal=a.causal, sessions=len(results), json=out / "evaluate.json")
    return 0


def _input_session(a: argparse.Namespace, tmp: str):
    """(corpus, session id) to decode: the named one, or the one ingested from --input."""
    # deferred: importing zarr only when used keeps start-up light
    from data_service.reader import open_corpus

    if a.input:
        # deferred: importing h5py only when used keeps start-up light
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


def add_decode(sub) -> None:
    s = sub.add_parser("decode", help="decode a whole recording into timestamped predictions (CSV or NWB) + a plot")
    model_flag(s)
    s.add_argument("--input", help="a recording file (NWB, MAT, temporaldata) of a session the model knows")
    s.add_argument("--corpus")
    s.add_argument("--session")
    s.add_argument("--out", required=True, help="PRED.csv or PRED.nwb (a PNG is written beside it)")
    s.add_argument("--hz", type=float, default=100.0, help="query rate where the recording has no behaviour samples")
    s.add_argument("--split", choices=["train", "valid", "test"],
                   help="decode only this split's intervals, with the windows `evaluate` uses (default: everything)")
    s.add_argument("--causal", action="store_true",
                   help="each prediction from the window that ends at its time (no later spike): what `serve` outputs live")
    s.add_argument("--cache", default="runs/models")
    tracking_flag(s)
    s.set_defaults(fn=cmd_decode)


def cmd_decode(a: argparse.Namespace) -> int:
    # deferred: importing torch only when used keeps start-up light
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
        if a.causal:
            # deferred with the rest of the decoder
            from pretrain.decoding.causal import causal_decode

            decoded = causal_decode(model, tok, reader, rows, hz=a.hz, model_uri=a.model)
        else:
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


def add_baseline(sub) -> None:
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


def cmd_baseline(a: argparse.Namespace) -> int:
    # deferred: importing torch, zarr only when used keeps start-up light
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


def add_commands(sub) -> None:
    add_models(sub)
    add_promote(sub)
    add_pull(sub)
    add_register(sub)
    add_evaluate(sub)
    add_decode(sub)
    add_baseline(sub)
