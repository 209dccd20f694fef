"""Pretraining end to end with the real stack: Ray (embedded), Ray Data, Ray Train, DeepSpeed on
CPU (gloo), MLflow on sqlite. A tiny model keeps each run to seconds; Ray's start-up dominates.

One uninterrupted run is the reference; the others must reproduce its window sequence (and,
on one worker, its weights): a stop + resume, and a two-worker run whose second worker is
SIGKILLed after a checkpoint and restarted by Ray.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("ray.train")
pytest.importorskip("deepspeed")
pytest.importorskip("mlflow")

from data_service.synth import SynthConfig, synth_corpus  # noqa: E402
from pretrain.run.config import load_config  # noqa: E402
from pretrain.run.hooks import FaultAndRecord  # noqa: E402
from pretrain.run.launch import init_ray, pretrain  # noqa: E402

STEPS, BATCH = 6, 8
TINY = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 1, "self_heads": 2, "latents_per_step": 4}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("pretrain")
    synth_corpus(SynthConfig(sessions=3, subjects=2, minutes=1.5, min_units=20, max_units=40), root / "corpus",
                 workers=1)
    cfg = config(root)
    init_ray(cfg)
    yield root
    ray.shutdown()


def config(root: Path, *overrides: str):
    base = [f"data.corpus={root / 'corpus'}", f"data.global_batch={BATCH}", "data.loader=ray",
            f"train.steps={STEPS}", "train.checkpoint_every=2", "train.eval_every=3", "train.log_every=1",
            "train.warmup_steps=2", f"cluster.storage_path={root / 'ray'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            "cluster.cpus_per_worker=1", "train.max_failures=1"]
    cfg = load_config(None, [*base, *overrides])
    cfg.model_overrides = dict(TINY)
    return cfg


@contextmanager
def sockets_while_running():
    """Every listening socket of the Ray session seen while the block runs (looked at every 0.5 s)."""
    from popscale.listeners import listening_sockets

    seen, stop = set(), threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(listening_sockets())
            stop.wait(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join()


def records(d: Path) -> dict[tuple[int, int], list[dict]]:
    """(rank, step) -> every record of it, in the order they were written."""
    out: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for f in sorted(d.glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[rank, r["step"]].append(r)
    return out


def sequence(d: Path, world: int) -> list[int]:
    """The stream positions that made the final model: the last record of each (rank, step)."""
    recs = records(d)
    return [p for step in range(STEPS) for rank in range(world) for p in recs[rank, step][-1]["positions"]]


def weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.checkpoint).parents[0] / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(env):
    rec = env / "rec_ref"
    rec.mkdir()
    r = pretrain(config(env, "name=ref"), show_progress=False, hooks=FaultAndRecord(record_windows=str(rec)),
                 alias="pretrained")
    return r, rec


def test_uninterrupted_run_consumes_the_stream_in_order(reference):
    r, rec = reference
    assert r.steps == STEPS and np.isfinite(r.valid_r2)
    assert sequence(rec, 1) == list(range(STEPS * BATCH))
    assert all(len(v) == 1 for v in records(rec).values())


def test_stop_and_resume_equals_uninterrupted(env, reference):
    ref, ref_rec = reference
    rec = env / "rec_resume"
    rec.mkdir()
    first = pretrain(config(env, "name=resume", "train.stop_at=3"), show_progress=False,
                     hooks=FaultAndRecord(record_windows=str(rec)))
    assert first.steps == 3 and first.model_uri == ""  # stopped: nothing registered yet
    # a resume whose data would not continue the same window order is refused up front
    with pytest.raises(ValueError, match="cannot resume .*changed since it started"):
        pretrain(config(env, "name=resume", "data.seed=7"), resume=first.name, show_progress=False)
    second = pretrain(config(env, "name=resume"), resume=first.name, show_progress=False,
                      hooks=FaultAndRecord(record_windows=str(rec)))
    assert second.steps == STEPS and second.mlflow_run_id == first.mlflow_run_id
    assert sequence(rec, 1) == sequence(ref_rec, 1)
    assert all(len(v) == 1 for v in records(rec).values())  # nothing consumed twice
    a, b = weights(ref), weights(second)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert second.valid_r2 == pytest.approx(ref.valid_r2, abs=1e-5)


def test_two_workers_killed_twice_right_after_checkpoints_lose_no_window(env, reference):
    """Same global order at 1 and 2 workers. Rank 1 is SIGKILLed right after the step-2 checkpoint
    is reported and rank 0 right after the step-4 one, each before Ray's controller has had time
    to register it (it polls every ~2 s): each restart still resumes from that checkpoint, so no
    step before it is redone, and nothing is skipped or repeated."""
    ref, ref_rec = reference
    rec = env / "rec_fault"
    rec.mkdir()
    markers = [env / "killed1", env / "killed2"]
    with sockets_while_running() as seen:
        r = pretrain(config(env, "name=fault", "cluster.num_workers=2", "train.max_failures=2"), show_progress=False,
                     hooks=FaultAndRecord(record_windows=str(rec), fault=f"1:2:{markers[0]},0:4:{markers[1]}"))
    assert all(m.exists() for m in markers), "a fault hook never fired"
    # the process group meets in a FileStore (pretrain/run/rendezvous.py): no TCPStore on every interface,
    # and gloo's pairs on loopback; the training workers' own sockets were seen, so the look was in time
    assert any("TrainWorker" in s.process for s in seen), sorted(map(str, seen))
    assert not [s for s in seen if not s.loopback], "beyond loopback:\n" + "\n".join(str(s) for s in seen if not s.loopback)
    assert r.steps == STEPS and r.model_uri
    recs = records(rec)
    assert sequence(rec, 2) == sequence(ref_rec, 1)  # nothing skipped, nothing repeated, same order
    pids = {rank: {x["pid"] for s in range(STEPS) for x in recs[rank, s]} for rank in (0, 1)}
    assert all(len(p) == 3 for p in pids.values()), "the worker group was not restarted twice"
    # rank 1 died before step 2 and rank 0 before step 4, both just after a checkpoint: every step
    # before the checkpoint a restart resumed from ran once on the rank that carried on past it
    assert [len(recs[1, s]) for s in range(4)] == [1, 1, 1, 1], "a restart did not resume from the last checkpoint"
    assert [len(recs[0, s]) for s in (0, 1, 3)] == [1, 1, 1]
    # each rank's share of each global batch is the half of the reference batch it should be
    ref_seq = sequence(ref_rec, 1)
    for s in range(STEPS):
        assert recs[1, s][-1]["positions"] == ref_seq[s * BATCH + BATCH // 2:(s + 1) * BATCH]


def assert_same_batches(want, got) -> None:
    """The same batches, one for one: numbers, window positions and every packed array."""
    for a, b in zip(want, got, strict=True):
        assert a.number == b.number and np.array_equal(a.positions, b.positions)
        da, db = a.data.to_dict(), b.data.to_dict()
        assert da.keys() == db.keys()
        for k in da:
            np.testing.assert_array_equal(np.asarray(da[k]), np.asarray(db[k]), err_msg=k)


@pytest.mark.parametrize("loader", ["ray", "ray-data"])
def test_killed_data_actor_is_restarted_and_the_stream_goes_on(env, loader):
    """SIGKILL the data actor mid-stream (a Ray Data actor, or the long-lived pool's): Ray restarts
    it and retries its calls, and the worker still receives every batch once, in order, equal to
    the in-process service's."""
    import os
    import signal

    import psutil

    from data_service.actors import ActorBatches
    from data_service.service import LocalBatches, RayBatches
    from pretrain.run.plan import build_plan

    spec = build_plan(config(env)).service_spec()
    local = list(LocalBatches(spec, 0, 1).iterate(0, 10))
    got, killed = [], []
    make = RayBatches if loader == "ray-data" else ActorBatches
    for b in make(spec, 0, 1, prefetch=1, block_batches=1).iterate(0, 10):
        got.append(b)
        if len(got) == 3:
            # this test's own Ray (started by this process): never another run's actors on the machine
            for p in psutil.Process().children(recursive=True):
                if any("_Builder" in c for c in p.cmdline()[:1]):
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
    assert killed, "no Ray Data actor process found"
    assert [b.number for b in got] == list(range(10))
    assert_same_batches(local, got)


def test_registered_model_reloads_with_the_same_predictions(env, reference):
    import mlflow

    from data_service.reader import open_corpus
    from pretrain.decoding.evaluate import evaluate
    from pretrain.tracking.registry import load_model

    ref, _ = reference
    assert ref.model_uri == f"models:/popscale-poyo/{ref.model_version}"
    # later runs left the alias alone
    model, tok = load_model("models:/popscale-poyo@pretrained", ref.tracking_uri, cache=env / "models")
    corpus = open_corpus(env / "corpus")
    sessions = [s for s in corpus.session_ids if len(corpus.session(s).intervals.get("valid", []))]
    res = evaluate(model, tok, corpus, sessions)
    # the workers' last validation (DeepSpeed engine) and the reloaded registered model agree
    assert float(np.mean([v.r2 for v in res.values()])) == pytest.approx(ref.valid_r2, abs=1e-5)

    client = mlflow.MlflowClient(ref.tracking_uri)
    run = client.get_run(ref.mlflow_run_id)
    assert run.data.params["data.global_batch"] == str(BATCH)
    assert run.data.params["model"] == "poyo-1.3M"
    history = client.get_metric_history(ref.mlflow_run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert {"samples_per_s", "spike_tokens_per_s", "valid_r2", "lr"} <= set(run.data.metrics)
    plots = [a.path for a in client.list_artifacts(ref.mlflow_run_id, "plots")]
    assert plots and all(p.endswith(".png") for p in plots)
    versions = client.search_model_versions(f"run_id='{ref.mlflow_run_id}'")
    assert len(versions) == 1
    assert str(client.get_model_version_by_alias("popscale-poyo", "pretrained").version) == ref.model_version
    tags = client.get_model_version("popscale-poyo", ref.model_version).tags
    assert tags["kind"] == "pretrained" and tags["corpus_fingerprint"] and tags["git_commit"]


def test_ray_and_local_batches_are_identical(env):
    from data_service.service import LocalBatches, RayBatches
    from pretrain.run.plan import build_plan

    spec = build_plan(config(env)).service_spec()  # no model is needed to serve batches
    for rank in (0, 1):
        local = list(LocalBatches(spec, rank, 2).iterate(3, 8))
        # a dataset boundary (chunk) and a block boundary (block_batches) inside, neither aligned
        # lead_s: each next dataset started at once, while the one before is served (data_service/ahead.py)
        remote = list(RayBatches(spec, rank, 2, chunk=3, prefetch=2, block_batches=2,
                                 lead_s=float("inf") if rank else 0.0).iterate(3, 8))
        assert [d.number for d in remote] == list(range(3, 8))
        assert_same_batches(local, remote)


def test_actor_pool_and_local_batches_are_identical(env):
    """The long-lived pool (data_service/actors.py) serves what the in-process service does: two
    actors taking blocks in turn, a block boundary not aligned with the start, a last block cut
    short, a byte cap that allows one block in flight."""
    from data_service.actors import ActorBatches
    from data_service.service import LocalBatches
    from pretrain.run.plan import build_plan

    spec = build_plan(config(env)).service_spec()
    for rank, buffer_mb in ((0, 256), (1, 1e-6)):
        local = list(LocalBatches(spec, rank, 2).iterate(3, 12))
        pool = ActorBatches(spec, rank, 2, actors=2, prefetch=2, block_batches=2, buffer_mb=buffer_mb)
        assert pool.depth() == 3 and pool.depth(10**6) == (3 if buffer_mb > 1 else 1)
        remote = list(pool.iterate(3, 12))
        assert [d.number for d in remote] == list(range(3, 12))
        assert_same_batches(local, remote)


def test_unreadable_data_ends_the_run_at_once_naming_session_and_array(env):
    """A damaged chunk stops a two-worker run with one line naming the session and array, without
    spending its two restarts on it (a restart reads the same bytes): each rank ran in one process."""
    bad = env / "corpus-damaged"
    shutil.copytree(env / "corpus", bad)
    session = sorted(p.name for p in (bad / "sessions").iterdir())[0]
    chunk = sorted(p for p in (bad / "sessions" / session / "spikes" / "timestamps").iterdir() if p.name != "zarr.json")[0]
    b = bytearray(chunk.read_bytes())
    b[len(b) // 3] ^= 0xFF
    chunk.write_bytes(bytes(b))
    rec = env / "rec_damaged"
    rec.mkdir()
    with pytest.raises(RuntimeError, match="stopped by its data") as e:
        pretrain(config(env, "name=damaged", f"data.corpus={bad}", "cluster.num_workers=2", "train.max_failures=2"),
                 show_progress=False, hooks=FaultAndRecord(record_windows=str(rec)))
    assert f"session {session}" in str(e.value) and "spikes/timestamps" in str(e.value), str(e.value)
    starts = [json.loads(line) for f in rec.glob("steps-rank*.jsonl") for line in f.read_text().splitlines()]
    assert starts and len({r["pid"] for r in starts}) == 2, starts  # two workers, never restarted
