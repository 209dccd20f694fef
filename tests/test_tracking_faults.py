"""The MLflow server away (issue 12): training never waits for it. A closed port on 127.0.0.1 is the
server that is down (a refused connection is immediate); a real `mlflow server` started on that
port is the server coming back. What could not be sent is kept (in memory and in the run
directory's journal) and sent once, when the server answers again or by `popscale tracking-sync`;
a run that could not be created at its start is created by that command; a registration that
could not be made is tried for a bounded time, then left with the one command that makes it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import result_line

from popscale.cli import build_parser, main
from pretrain.run.config import RunConfig
from pretrain.tracking.config import TrackingConfig
from pretrain.tracking.journal import Journal, journals
from pretrain.tracking.mlflow_runs import HTTP_DEFAULTS, MLflowSink, http_defaults, store_client
from pretrain.tracking.offline import finish, resume_tracking, start_run_or_offline


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextmanager
def mlflow_server(port: int, root: Path):
    """A real tracking server on 127.0.0.1:`port` (sqlite store, proxied artifacts), until the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                          "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                          "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # poll /health until it answers
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert p.poll() is None, (root / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()


def tiny_export(out: Path) -> Path:
    import torch

    from pretrain.model.config import ModelConfig
    from pretrain.model.poyo import POYO
    from pretrain.tokens.tokenizer import TokenizerConfig
    from pretrain.tracking.export import export_model

    cfg = ModelConfig(dim=32, depth=1, dim_head=16, cross_heads=1, self_heads=2, latents_per_step=4)
    torch.manual_seed(0)
    model = POYO(cfg, [f"subj/s1/u{i}" for i in range(4)], ["s1"])
    tok = TokenizerConfig.build(cfg, window_s=2.0, behaviours={"velocity": ["hand_vel"]},
                                target_scale={"hand_vel": 3.0})
    return export_model(model, tok, out, {"step": 4, "ray_run": "faults-1"})


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in store_client(uri).get_metric_history(run_id, key))


def test_popscale_calls_give_up_in_seconds_unless_the_user_says_otherwise(monkeypatch):
    for k in HTTP_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    http_defaults()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"  # the user's
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]


def test_the_journal_on_object_storage_is_one_object_per_write():
    run_dir = f"memory://faults/{time.time_ns()}/run"
    j = Journal(run_dir, writer="w.1")  # a writer id is made safe for the file names
    j.append([{"step": 1, "timestamp": 1, "metrics": {"a": 1.0}}])
    j.append([{"step": 2, "timestamp": 2, "metrics": {"a": 2.0}}, {"step": 3, "timestamp": 3, "metrics": {"a": 3.0}}])
    j.mark_sent(1)
    (records, sent), = journals(run_dir).values()
    assert [r["step"] for r in records] == [1, 2, 3] and sent == 1


def sink_while_away(tmp_path: Path, uri: str, server: Path) -> dict:
    """A run made while the server was up (in the store it will serve); its rank-0 sink logs 5 steps
    with the server away."""
    local = store_client(f"sqlite:///{server / 'mlflow.db'}")
    exp = local.create_experiment("faults", artifact_location="mlflow-artifacts:/faults")
    run_id = local.create_run(exp).info.run_id
    run_dir = tmp_path / "mid-run"
    run_dir.mkdir()
    (run_dir / "popscale_run.json").write_text(json.dumps({"name": "mid-run", "mlflow_run_id": run_id,
                                                          "tracking_uri": uri}))
    said: list[str] = []
    sink = MLflowSink(TrackingConfig(uri=uri), run_id, buffer=True, run_dir=str(run_dir), notify=said.append,
                      retry_s=0.0)
    t = time.monotonic()
    for step in range(1, 6):
        sink.log({"train_loss": 1.0 / step, "lr": 0.1}, step)  # no exception
    sink.artifact(__file__, "plots")  # a plot while away is skipped
    assert time.monotonic() - t < 5
    assert len(said) == 1, said
    assert said[0].startswith(f"warning: MLflow at {uri} is unreachable (connection refused") and \
        "training continues" in said[0] and f"popscale tracking-sync {run_dir}" in said[0]
    (records, sent), = journals(str(run_dir)).values()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and sent == 0
    return {"sink": sink, "said": said, "run_id": run_id, "run_dir": run_dir}


def sink_back(a: dict, uri: str, capsys) -> None:
    sink, said, run_id, run_dir = a["sink"], a["said"], a["run_id"], a["run_dir"]
    sink.log({"train_loss": 1 / 6, "lr": 0.1}, 6)  # the server is back: everything kept goes with this
    assert len(said) == 2 and "is reachable again" in said[1]
    assert steps_of(uri, run_id, "train_loss") == [1, 2, 3, 4, 5, 6]
    assert steps_of(uri, run_id, "lr") == [1, 2, 3, 4, 5, 6]
    (records, sent), = journals(str(run_dir)).values()
    assert sent == len(records) == 6  # the journal holds what was kept, and knows it was sent
    assert main(["tracking-sync", str(run_dir)]) == 0  # nothing left to send
    assert result_line(capsys.readouterr().out)["metrics_sent"] == "0"
    assert steps_of(uri, run_id, "train_loss") == [1, 2, 3, 4, 5, 6]


def run_while_away(tmp_path: Path, uri: str) -> dict:
    """A run that starts with the server away, logs 4 steps, ends and wants its model registered."""
    cfg = RunConfig(name="faults")
    cfg.tracking = TrackingConfig(uri=uri, experiment="faults", registered_model="faults-model")
    run_dir = tmp_path / "runs" / "faults-1"
    said: list[str] = []
    t = time.monotonic()
    assert start_run_or_offline(cfg.tracking, cfg.name, cfg.to_dict(), {"ray_run": "faults-1"}, str(run_dir),
                                "popscale pretrain --resume faults-1",
                                said.append) is None
    assert time.monotonic() - t < 5
    assert len(said) == 1 and said[0].startswith(f"warning: MLflow at {uri} is unreachable (connection refused")
    assert "popscale pretrain --resume faults-1" in said[0]
    meta = {"name": "faults-1", "mlflow_run_id": None, "tracking_uri": uri}
    (run_dir / "popscale_run.json").write_text(json.dumps(meta))
    sink = MLflowSink(cfg.tracking, None, run_dir=str(run_dir), notify=said.append)  # a worker's, offline
    for step in range(1, 5):
        sink.log({"train_loss": 1.0 / step}, step)
    assert resume_tracking(str(run_dir), uri, meta, said.append) is None  # a resume while it is still away
    assert len(said) == 2 and said[1].startswith("warning: MLflow at")
    export = tiny_export(run_dir / "export")
    sleeps: list[float] = []
    t = time.monotonic()
    fin = finish(str(run_dir), uri, None, terminate=True, export=export, model_name="faults-model", alias="best",
                 tags={"kind": "pretrained"}, notify=said.append, sleep=sleeps.append)
    assert time.monotonic() - t < 10 and sleeps == [3.0, 6.0, 12.0, 24.0]  # bounded: 45 s of waiting in all
    assert fin.registration == "pending" and fin.tracking == "pending" and fin.model_uri == str(export)
    assert (export / "model.safetensors").exists()
    assert len(said) == 3 and said[2].startswith("warning: MLflow at") and said[2].endswith(fin.command)
    argv = shlex.split(fin.command)
    assert argv[:3] == ["popscale", "register", str(export)] and "--run" in argv
    build_parser().parse_args(argv[1:])
    return {"cfg": cfg, "run_dir": run_dir, "command": argv}


def run_back(b: dict, uri: str, capsys) -> None:
    run_dir, argv = b["run_dir"], b["command"]
    assert main(["tracking-sync", str(run_dir)]) == 0
    out = result_line(capsys.readouterr().out)
    assert out["created"] == "true" and out["metrics_sent"] == "4" and out["ended"] == "FINISHED"
    assert out["registration"] == "pending"
    c = store_client(uri)
    run = c.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "faults"
    assert run.data.params["train.steps"] == str(b["cfg"].train.steps) and run.data.tags["ray_run"] == "faults-1"
    assert json.loads((run_dir / "popscale_run.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert main(argv[1:]) == 0  # the printed command
    reg = result_line(capsys.readouterr().out)
    assert reg["model_uri"] == "models:/faults-model/1" and reg["mlflow_run_id"] == run.info.run_id
    v = c.get_model_version_by_alias("faults-model", "best")
    assert v.version == "1" and v.run_id == run.info.run_id and v.tags["kind"] == "pretrained"
    assert main(["tracking-sync", str(run_dir)]) == 0  # again: nothing new
    out = result_line(capsys.readouterr().out)
    assert out["created"] == "false" and out["metrics_sent"] == "0" and out["registration"] == "none"
    assert steps_of(uri, run.info.run_id, "train_loss") == [1, 2, 3, 4]


def finetune_while_away(tmp_path: Path, uri: str) -> dict:
    """`popscale finetune` with the server away from the start: it completes, its params and
    metrics kept in its run directory."""
    from data_service.reader import open_corpus
    from data_service.synth import SynthConfig, synth_corpus
    from pretrain.finetune.config import FinetuneConfig
    from pretrain.finetune.finetune import finetune
    from pretrain.run.config import load_config
    from pretrain.run.export import export_checkpoint
    from pretrain.run.plan import build_plan
    from pretrain.run.train import train_in_process

    root = tmp_path / "ft"
    synth_corpus(SynthConfig(sessions=2, subjects=1, minutes=1.0, min_units=10, max_units=15, seed=5), root / "corpus")
    ids = open_corpus(root / "corpus").session_ids
    cfg = load_config(None, [f"data.corpus={root / 'corpus'}", "data.global_batch=4", "data.loader=local",
                             "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.warmup_steps=1",
                             "cluster.cpus_per_worker=1", f"data.sessions={json.dumps(ids[:1])}"])
    cfg.model_overrides = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 1, "self_heads": 2,
                           "latents_per_step": 4}
    export = export_checkpoint(train_in_process(build_plan(cfg), root / "pre").checkpoint, root / "export", {})
    said: list[str] = []
    r = finetune(FinetuneConfig(model=str(export), corpus=str(root / "corpus"), sessions=[ids[1]], steps=2, batch=4,
                                eval_every=2, tracking_uri=uri, out=str(root / "runs"), name="ft-away"),
                 notify=said.append, show_progress=False)
    run_dir = root / "runs" / "ft-away"
    assert r.model_uri == str(run_dir / "export") and (run_dir / "export" / "model.safetensors").exists()
    assert any(m.startswith(f"warning: MLflow at {uri} is unreachable") for m in said)
    assert journals(str(run_dir)) and (run_dir / "mlflow_offline" / "run.json").exists()
    assert list((run_dir / "plots").glob("test_decoded_vs_true_*.png"))  # kept beside the run
    return {"run_dir": run_dir, "test_r2": r.test_r2}


def finetune_back(f: dict, uri: str, capsys) -> None:
    assert main(["tracking-sync", str(f["run_dir"])]) == 0
    out = result_line(capsys.readouterr().out)
    assert out["created"] == "true" and int(out["metrics_sent"]) > 0 and out["ended"] == "FINISHED"
    run = store_client(uri).get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ft-away"
    assert run.data.params["mode"] == "unit-id" and run.data.tags["popscale_command"] == "finetune"
    assert run.data.metrics["test_r2"] == pytest.approx(f["test_r2"])


def test_the_server_away_mid_run_and_from_the_start_then_back(tmp_path, capsys):
    """Both cases against one server (it takes seconds to start): a sink keeps what it could not send
    and sends each metric once when the server is back; a run started while it was away is created
    by `popscale tracking-sync`, and its model registered by the command its end printed; a finetune
    with the server away completes and is sent by the same command."""
    port = closed_port()
    uri = f"http://127.0.0.1:{port}"
    server = tmp_path / "server"
    server.mkdir()
    mid = sink_while_away(tmp_path, uri, server)
    start = run_while_away(tmp_path, uri)
    tuned = finetune_while_away(tmp_path, uri)
    with mlflow_server(port, server):
        sink_back(mid, uri, capsys)
        run_back(start, uri, capsys)
        finetune_back(tuned, uri, capsys)


@pytest.mark.parametrize("argv", [["tracking-sync", "{run}"], ["register", "{export}", "--run", "{run}"],
                                  ["register", "{export}", "--tracking-uri", "{uri}"]])
def test_the_commands_say_at_once_when_the_server_is_still_away(tmp_path, capsys, argv):
    uri = f"http://127.0.0.1:{closed_port()}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "popscale_run.json").write_text(json.dumps({"name": "run", "mlflow_run_id": "0" * 32,
                                                          "tracking_uri": uri}))
    export = tiny_export(tmp_path / "export")
    t = time.monotonic()
    code = main([a.format(run=run_dir, export=export, uri=uri) for a in argv])
    assert time.monotonic() - t < 5 and code == 1
    err = capsys.readouterr()
    assert f"error: MLflow at {uri} is unreachable (connection refused)" in err.err
    assert result_line(err.out) == {"error": "TrackingUnavailable"}
