"""Shared storage against a real S3-compatible server (moto's, started on loopback by the test;
the clients are the real s3fs, pyarrow and boto3): a corpus pushed there reads back window for
window equal with ranged reads of only the chunks a window needs, and a pretraining run with its
corpus, checkpoints and MLflow artifacts there stops, resumes from its checkpoint and finishes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import result_line, run_cli

from popscale.cli import main

pytest.importorskip("moto")
pytest.importorskip("s3fs")

BIN = Path(sys.executable).parent
BUCKET = "popscale-test"


def cli(capsys, *args: str) -> dict[str, str]:
    """A popscale command in this process (the environment points it at the S3 server): its RESULT."""
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return result_line(out.out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, a bucket, and the environment that points clients at it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()}")
        from data_service.remote import filesystem

        filesystem("s3://x").mkdir(BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    from data_service.synth import SynthConfig, synth_corpus

    root = tmp_path_factory.mktemp("storage") / "corpus"
    synth_corpus(SynthConfig(sessions=3, subjects=2, minutes=1.5, min_units=20, max_units=40), root, workers=1)
    return root


def test_pushed_corpus_reads_back_window_for_window(s3, local_corpus, capsys):
    from data_service.reader import open_corpus

    url = f"s3://{BUCKET}/corpora/synth"
    assert cli(capsys, "push", str(local_corpus), url)["uploaded"] == "3"
    again = cli(capsys, "push", str(local_corpus), url)
    assert again["uploaded"] == "0" and again["unchanged"] == "3"  # a re-push sends nothing

    shown = cli(capsys, "inspect", url)
    assert shown["sessions"] == "3"
    local, remote = open_corpus(local_corpus), open_corpus(url)
    assert remote.session_ids == local.session_ids and remote.fingerprint == local.fingerprint
    for sid in local.session_ids:
        a, b = local.session(sid), remote.session(sid)
        assert np.array_equal(a.unit_ids, b.unit_ids) and np.array_equal(a.unit_areas, b.unit_areas)
        for t0 in np.arange(0.0, 85.0, 2.3):
            wa, wb = a.read_window(t0, t0 + 1.0), b.read_window(t0, t0 + 1.0)
            assert np.array_equal(wa.spike_times, wb.spike_times) and np.array_equal(wa.spike_units, wb.spike_units)
            assert wa.behaviour.keys() == wb.behaviour.keys() and wa.intervals.keys() == wb.intervals.keys()
            for k in wa.behaviour:
                assert np.array_equal(wa.behaviour[k].timestamps, wb.behaviour[k].timestamps)
                assert np.array_equal(wa.behaviour[k].values, wb.behaviour[k].values)
            for k in wa.intervals:
                assert np.array_equal(wa.intervals[k], wb.intervals[k])
        ta, ua = a.spikes()
        tb, ub = b.spikes()
        assert np.array_equal(ta, tb) and np.array_equal(ua, ub)


def test_a_window_fetches_only_its_chunks(s3, local_corpus, capsys):
    """Ranged reads: after the shard index, one window costs a few chunk-sized GETs, far less than
    the shard objects; and the bounded chunk cache serves the second read of it."""
    from data_service import shards
    from data_service.reader import Corpus
    from data_service.remote import filesystem

    url = f"s3://{BUCKET}/corpora/synth"
    cli(capsys, "push", str(local_corpus), url)
    fs = filesystem(url)
    sid = Corpus(url).session_ids[0]
    spikes_obj = fs.size(f"{url}/sessions/{sid}/spikes/timestamps/0")
    reader = Corpus(url).session(sid)
    fetched: list[int] = []
    real = fs.cat_file

    def counting(path, start=None, end=None, **kw):
        data = real(path, start=start, end=end, **kw)
        fetched.append(len(data))
        return data

    shards.CACHE.clear()
    fs.cat_file = counting
    try:
        w = reader.read_window(40.0, 41.0, behaviours=[], intervals=False)
        n_first = len(fetched)
        reader.read_window(40.0, 41.0, behaviours=[], intervals=False)
    finally:
        del fs.cat_file
    assert len(w.spike_times) > 0 and n_first > 0
    assert len(fetched) == n_first  # the second read came from the cache
    chunk_bytes = shards.open_sharded(reader.path / "spikes/timestamps").chunk_len * 8
    assert max(fetched) <= chunk_bytes + 64 < spikes_obj  # no GET larger than a chunk, each object bigger


def test_pretraining_checkpoints_on_object_storage_and_resumes(s3, local_corpus, tmp_path, capsys, monkeypatch):
    from data_service.remote import filesystem

    url = f"s3://{BUCKET}/corpora/synth"
    cli(capsys, "push", str(local_corpus), url)
    rec = tmp_path / "records"
    rec.mkdir()
    # a registry URI left in the environment (mlflow.set_registry_uri sets one) must not divert registration
    env = {**s3, "POPSCALE_RECORD_WINDOWS": str(rec), "MLFLOW_REGISTRY_URI": f"sqlite:///{tmp_path / 'other.db'}"}
    common = ["--set", f"data.corpus={url}", "--set", "data.global_batch=8",
              "--set", "train.steps=6", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=3",
              "--set", "train.warmup_steps=2", "--set", f"cluster.storage_path=s3://{BUCKET}/runs",
              "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
              "--set", f"tracking.artifact_location=s3://{BUCKET}/mlflow", "--set", "tracking.experiment=storage",
              "--set", "model_overrides={dim: 32, depth: 1, dim_head: 16, cross_heads: 1, self_heads: 2, "
                       "latents_per_step: 4}", "--no-progress"]
    first = run_cli("pretrain", *common, "--set", "name=s3run", "--set", "train.stop_at=4", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    name = result_line(first.stdout)["run"]
    fs = filesystem(url)
    assert fs.glob(f"{BUCKET}/runs/{name}/step*/popscale_state.json"), "no checkpoint on the object store"
    from pretrain.run.checkpoint import completed_checkpoints

    # every checkpoint the run reported is marked complete there: a restart could resume from it
    assert [s for s, _ in completed_checkpoints(f"s3://{BUCKET}/runs/{name}", 1)] == [2, 4]
    assert fs.exists(f"{BUCKET}/runs/{name}/popscale_run.json") and fs.exists(f"{BUCKET}/runs/{name}/plan.json")

    second = run_cli("pretrain", *common, "--resume", name, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    out = result_line(second.stdout)
    assert out["steps"] == "6" and out["model_uri"].startswith("models:/")
    assert "resuming" in second.stderr
    steps = sorted(json.loads(line)["step"] for f in rec.glob("rank*.jsonl") for line in f.read_text().splitlines())
    assert steps == list(range(6)), steps  # steps 0-3 before the stop, 4-5 after: resumed, not restarted
    # the registered model's files went to the experiment's artifact location on the object store
    assert fs.glob(f"{BUCKET}/mlflow/**/model.safetensors")
    # promote that version and pull it back from there (runbooks/models.md)
    db = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    version = out["model_version"]
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", env["MLFLOW_REGISTRY_URI"])  # (in this process from here on)
    promoted = cli(capsys, "promote", "popscale-poyo", version, "candidate", *db)
    assert promoted["model_uri"] == "models:/popscale-poyo@candidate"
    assert "candidate:" + version in cli(capsys, "models", "popscale-poyo", *db)["aliases"]
    cli(capsys, "pull", "popscale-poyo@candidate", "--out", str(tmp_path / "pulled"), "--cache", str(tmp_path / "cache"),
        *db)
    assert (tmp_path / "pulled" / "model.safetensors").exists()
