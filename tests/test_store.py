"""Nothing lost: a writer killed at any step leaves no visible partial session, and re-running finishes."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from conftest import REPO, result_line, run_cli, simple_session

from data_service.format import SESSIONS, STAGING
from data_service.manifest import read_manifest
from data_service.reader import Corpus
from data_service.store import CorpusStore
from data_service.verify import verify

META = str(REPO / "configs" / "real_recordings.yaml")


def content(root) -> dict[str, str]:
    return {sid: r["content_hash"] for sid, r in read_manifest(root).items()}


@pytest.fixture(scope="module")
def clean_ingest(tmp_path_factory, real_dir_module):
    root = tmp_path_factory.mktemp("clean") / "corpus"
    run_cli("ingest", str(real_dir_module), "--corpus", str(root), "--meta", META, check=True)
    return content(root)


@pytest.fixture(scope="module")
def real_dir_module():
    from conftest import REAL

    if not REAL.is_dir():
        pytest.skip("real recordings not available")
    return REAL


def assert_readable_and_complete(root):
    """Every session a reader can see is complete: it reads and its checksums hold."""
    c = Corpus(root)
    for sid in c.session_ids:
        s = c.session(sid)
        t, u = s.spikes()
        assert len(t) == c.rows[sid]["n_spikes"] == len(u)
    assert verify(root).ok


@pytest.mark.parametrize("fault,visible_before", [
    ("staged:2", 1),         # second session fully written to staging, killed before it is moved in
    ("array-written:20", 1),  # killed in the middle of writing the second session's arrays
    ("committed:3", 2),      # third session moved in, killed before the manifest lists it
])
def test_ingest_killed_midway_leaves_no_partial_session_and_rerun_finishes(tmp_path, real_dir_module, clean_ingest,
                                                                           fault, visible_before):
    root = tmp_path / "corpus"
    p = run_cli("ingest", str(real_dir_module), "--corpus", str(root), "--meta", META, env={"POPSCALE_FAULT": fault})
    assert p.returncode == -signal.SIGKILL, p.stderr
    listed = read_manifest(root)
    on_disk = sorted(d.name for d in (root / SESSIONS).iterdir() if d.is_dir())
    assert len(listed) == visible_before
    assert Corpus(root).session_ids == sorted(listed)  # readers see listed, complete sessions only
    if fault == "committed:3":  # moved in but not yet listed: complete on disk, reported by verify
        assert len(on_disk) == len(listed) + 1
        assert any("not in the manifest" in str(p) for p in verify(root).problems)
    else:
        assert sorted(listed) == on_disk
        assert_readable_and_complete(root)

    again = run_cli("ingest", str(real_dir_module), "--corpus", str(root), "--meta", META)
    assert again.returncode == 0, again.stderr
    assert "recovered" in again.stderr
    assert content(root) == clean_ingest  # same sessions, same bytes as an uninterrupted ingest
    assert not any((root / STAGING).iterdir())
    assert_readable_and_complete(root)


def test_synth_killed_midway_resumes_to_the_same_corpus(tmp_path):
    """No real data needed: a synth run killed while writing its second session, then re-run."""
    args = ["synth", "--sessions", "3", "--subjects", "2", "--minutes", "0.3", "--workers", "1"]
    clean = tmp_path / "clean"
    run_cli(*args, "--corpus", str(clean), check=True)
    root = tmp_path / "corpus"
    p = run_cli(*args, "--corpus", str(root), env={"POPSCALE_FAULT": "array-written:20"})
    assert p.returncode == -signal.SIGKILL
    assert len(read_manifest(root)) == 1 and any((root / STAGING).iterdir())
    assert_readable_and_complete(root)
    again = run_cli(*args, "--corpus", str(root), check=True)
    assert result_line(again.stdout) == {"corpus": str(root), "sessions": "3", "added": "2", "replaced": "0",
                                         "unchanged": "1"}
    assert content(root) == content(clean)


def test_killed_replace_restores_the_old_session(tmp_path, real_dir_module):
    root = tmp_path / "corpus"
    src = str(real_dir_module / "chewie_demo.mat")
    run_cli("ingest", src, "--corpus", str(root), "--bin-width", "0.2", check=True)
    before = content(root)
    p = run_cli("ingest", src, "--corpus", str(root), "--bin-width", "0.1", "--replace",
                env={"POPSCALE_FAULT": "trashed:1"})
    assert p.returncode == -signal.SIGKILL
    with CorpusStore(root) as st:
        assert any("restored session chewie_demo" in n for n in st.recovered)
    assert content(root) == before
    assert_readable_and_complete(root)
    run_cli("ingest", src, "--corpus", str(root), "--bin-width", "0.1", "--replace", check=True)
    after = content(root)
    assert after.keys() == before.keys() and after != before


def test_rerun_of_a_complete_ingest_is_a_no_op(tmp_path, real_dir_module):
    root = tmp_path / "corpus"
    src = str(real_dir_module / "mihi_demo.mat")
    first = result_line(run_cli("ingest", src, "--corpus", str(root), check=True).stdout)
    second = result_line(run_cli("ingest", src, "--corpus", str(root), check=True).stdout)
    assert first["added"] == "2" and second["unchanged"] == "2" and second["added"] == "0"


def test_one_writer_at_a_time(tmp_path):
    from data_service.errors import CorpusError

    with CorpusStore(tmp_path / "c"):
        with pytest.raises(CorpusError, match="another popscale process"):
            with CorpusStore(tmp_path / "c"):
                pass


def test_manifest_is_rebuilt_from_sessions(tmp_path):
    root = tmp_path / "c"
    with CorpusStore(root) as st:
        st.add(simple_session("a"))
        st.add(simple_session("b", seed=3))
    want = content(root)
    (root / "manifest.json").unlink()
    assert not verify(root).ok  # sessions on disk that the manifest does not list
    with CorpusStore(root) as st:
        assert len(st.recovered) == 2
    assert content(root) == want and verify(root).ok


def test_staged_sessions_are_invisible_to_readers(tmp_path):
    from data_service.store import stage_session

    root = tmp_path / "c"
    with CorpusStore(root) as st:
        st.add(simple_session("a"))
        staged = stage_session(root, simple_session("b"))
        assert Corpus(root).session_ids == ["a"]
        st.commit(staged)
    assert Corpus(root).session_ids == ["a", "b"]
    assert np.array_equal(Corpus(root).session("b").spikes()[0], simple_session("b").spike_times)
