"""`verify` finds damage and names the session and the field."""

from __future__ import annotations

import json
import shutil

import pytest
import zarr
from conftest import result_line, run_cli, simple_session

from data_service.format import checksum
from data_service.store import CorpusStore
from data_service.verify import verify


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "c"
    with CorpusStore(root) as st:
        st.add(simple_session("a"))
        st.add(simple_session("b", seed=2))
    return root


def problems(root):
    return [(p.session, p.field, p.message) for p in verify(root).problems]


def test_clean_corpus_verifies(corpus):
    r = verify(corpus)
    assert r.ok and r.sessions_checked == 2 and r.arrays_checked == 2 * 9  # spikes 3, units 2, behaviour 3, intervals


def test_flipped_byte_is_found_and_located(corpus):
    shard = corpus / "sessions" / "b" / "spikes" / "unit_index" / "0"
    raw = bytearray(shard.read_bytes())
    raw[50] ^= 0x01
    shard.write_bytes(bytes(raw))
    (p,) = problems(corpus)
    assert p[0] == "b" and p[1] == "spikes/unit_index" and "corrupt" in p[2]


def test_rewritten_content_with_valid_crc_is_caught_by_checksum(corpus):
    arr = zarr.open_array(str(corpus / "sessions" / "a" / "behaviour" / "hand_vel" / "values"), mode="r+")
    vals = arr[...]
    vals[10, 0] += 1.0
    arr[...] = vals
    (p,) = problems(corpus)
    assert p[:2] == ("a", "behaviour/hand_vel/values") and "checksum mismatch" in p[2]


def test_broken_invariant_on_disk_is_named(corpus):
    d = corpus / "sessions" / "a"
    arr = zarr.open_array(str(d / "spikes" / "timestamps"), mode="r+")
    t = arr[...]
    t[100], t[101] = t[101], t[100]
    arr[...] = t
    meta = json.loads((d / "zarr.json").read_text())  # make the checksum agree: only the invariant is broken
    meta["attributes"]["popscale"]["checksums"]["spikes/timestamps"] = checksum(t)
    (d / "zarr.json").write_text(json.dumps(meta))
    found = problems(corpus)
    assert ("a", "spikes/timestamps") in [p[:2] for p in found]
    assert any("not sorted" in p[2] for p in found)


def test_missing_session_and_manifest_drift(corpus):
    shutil.rmtree(corpus / "sessions" / "b")
    found = problems(corpus)
    assert found == [("b", "manifest.json", "listed in the manifest but missing on disk")]


def test_cli_verify_exit_status(corpus):
    ok = run_cli("verify", str(corpus))
    assert ok.returncode == 0 and result_line(ok.stdout)["problems"] == "0"
    (corpus / "sessions" / "a" / "spikes" / "timestamps" / "0").write_bytes(b"truncated")
    bad = run_cli("verify", str(corpus))
    assert bad.returncode == 1 and result_line(bad.stdout)["problems"] == "1"
    assert "session a" in bad.stderr and "spikes/timestamps" in bad.stderr


def test_verify_checks_synthetic_ground_truth_arrays(tmp_path):
    from data_service.synth import SynthConfig, synth_corpus

    synth_corpus(SynthConfig(sessions=1, minutes=0.5), tmp_path / "s")
    r = verify(tmp_path / "s")
    assert r.ok and r.arrays_checked == 9 + 3 + 3  # + hand_pos and three ground-truth arrays
