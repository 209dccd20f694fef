"""Storage faults under a running data service: a corrupted or truncated chunk, a missing shard,
a session deleted mid-run. The service stops with an error naming the corpus, session and array
(it never serves what it cannot check), unless skipping is asked for, which logs every window
it drops. `popscale verify` names the same session and array."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data_service.service import LocalBatches, UnreadableWindow
from data_service.shards import CACHE
from data_service.synth import SynthConfig, synth_corpus
from data_service.verify import verify
from pretrain.run.config import load_config
from pretrain.run.plan import build_plan

BATCHES = 12  # batches of 8 windows: enough to read every session's spikes


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "corpus"
    # 60-80 units: a session's train windows span several 4,096-spike chunks, so damage to one
    # chunk leaves some of the session's windows readable (a window reads only its rows' chunks)
    synth_corpus(SynthConfig(sessions=2, subjects=1, minutes=0.5, min_units=60, max_units=80), root, workers=1)
    return root


@pytest.fixture
def corpus(pristine, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(pristine, root)
    CACHE.clear()  # decoded chunks of another copy must not hide the damage
    yield root
    CACHE.clear()


def spec(root: Path, *overrides: str):
    cfg = load_config(None, [f"data.corpus={root}", "data.global_batch=8", "data.loader=local", *overrides])
    cfg.model_overrides = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 1, "self_heads": 2}
    return build_plan(cfg, progress=False).service_spec()


def shard(root: Path, array: str) -> tuple[str, Path]:
    """The first session's shard file of an array."""
    session = sorted(p.name for p in (root / "sessions").iterdir())[0]
    files = sorted(p for p in (root / "sessions" / session / array).iterdir() if p.name != "zarr.json")
    return session, files[0]


def damage(kind: str, f: Path) -> None:
    if kind == "flipped byte":
        b = bytearray(f.read_bytes())
        b[len(b) // 3] ^= 0xFF
        f.write_bytes(bytes(b))
    elif kind == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "missing shard":
        f.unlink()


@pytest.mark.parametrize("kind", ["flipped byte", "truncated", "missing shard"])
def test_damaged_chunk_stops_the_service_naming_session_and_array(corpus, kind):
    sp = spec(corpus)  # planned on the intact corpus, as a running job was
    session, f = shard(corpus, "spikes/timestamps")
    damage(kind, f)
    with pytest.raises(UnreadableWindow) as e:
        list(LocalBatches(sp).iterate(0, BATCHES))
    err = e.value
    assert (err.session, err.field, err.file) == (session, "spikes/timestamps", str(corpus))
    assert "popscale verify" in str(err) and "skip_bad_windows" in str(err)
    found = {(p.session, p.field) for p in verify(corpus).problems}
    assert any(s == session and fld and fld.startswith("spikes/timestamps") for s, fld in found), found


def restarted_reader() -> None:
    """What a restarted data actor starts with: no open files, no cached chunks or sessions."""
    from data_service import reader, shards

    shards._handles.close_all()
    CACHE.clear()
    reader._open.clear()


def test_session_deleted_under_a_running_job_is_named(corpus):
    """Files a reader already holds open stay readable after deletion (Linux keeps the data, so
    what they serve is still correct); the first read that must open one fails, naming the session."""
    sp = spec(corpus)
    stream = LocalBatches(sp).iterate(0, BATCHES)
    next(stream)
    session = sorted(p.name for p in (corpus / "sessions").iterdir())[1]
    shutil.rmtree(corpus / "sessions" / session)
    restarted_reader()
    with pytest.raises(UnreadableWindow) as e:
        list(stream)
    assert (e.value.session, e.value.file) == (session, str(corpus))


def test_skipping_is_opt_in_and_logs_every_window_it_drops(corpus, caplog):
    from data_service.shards import open_sharded

    clean = list(LocalBatches(spec(corpus)).iterate(0, BATCHES))
    session, f = shard(corpus, "spikes/timestamps")
    arr = open_sharded(f.parent)
    offset, nbytes = arr._shard_index(0)[1][1]  # the second inner chunk only: some windows stay readable
    b = bytearray(f.read_bytes())
    b[offset + nbytes // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    CACHE.clear()
    with caplog.at_level("WARNING", logger="popscale.data"):
        served = list(LocalBatches(spec(corpus, "data.skip_bad_windows=true")).iterate(0, BATCHES))
    skipped = [w for b in served for w in b.skipped]
    assert skipped and all(w["session"] == session and w["field"] == "spikes/timestamps" for w in skipped)
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == len(skipped)
    # exactly the dropped windows are missing; every other window is served, in order
    dropped = {w["position"] for w in skipped}
    assert [int(p) for b in served for p in b.positions] == [int(p) for b in clean for p in b.positions
                                                             if int(p) not in dropped]
