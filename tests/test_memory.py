"""popscale.memory: the object store's pages counted once, apart from each process's own memory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from popscale.memory import store_resident_bytes

SHM = Path("/dev/shm")
ROOT = Path(__file__).resolve().parents[1]

# in a fresh interpreter: a process of the suite may hold an embedded Ray's real store open and mapped
SCENARIO = textwrap.dedent("""
    import json, mmap, os, tempfile
    import psutil
    from popscale.memory import process_memory, store_resident_bytes
    MB, me, out = 2**20, psutil.Process(), {}
    out["before"] = process_memory(me).__dict__
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="plasma-test-") as f:
        f.truncate(8 * MB)  # a sparse file, as Ray's store is until objects are written
        out["sparse"] = store_resident_bytes([os.getpid()])
        with mmap.mmap(f.fileno(), 8 * MB) as m:
            m[: 2 * MB] = b"x" * (2 * MB)  # this process alone maps and touches 2 MB of it
            os.pwrite(f.fileno(), b"y" * MB, 6 * MB)  # 1 MB more resident, never mapped here
            out["mapped"] = process_memory(me).__dict__
            out["resident"] = store_resident_bytes([os.getpid()])
    out["closed"] = store_resident_bytes([os.getpid()])
    print(json.dumps(out))
""")


@pytest.mark.skipif(not SHM.is_dir() or not os.access(SHM, os.W_OK), reason="no writable /dev/shm")
def test_the_store_file_counts_once_mapped_or_not_and_leaves_the_process_own_memory():
    r = subprocess.run([sys.executable, "-c", SCENARIO], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out, mb = json.loads(r.stdout), 2**20
    assert out["sparse"] < mb
    assert 1.9 * mb <= out["mapped"]["store_pss"] <= 2.1 * mb
    assert out["before"]["store_pss"] == 0
    assert 2.9 * mb <= out["resident"] <= 3.1 * mb  # mapped or not, each page once
    # the mapped pages are the store's, not the process's own memory (which moved by far less)
    assert abs(out["mapped"]["own_pss"] - out["before"]["own_pss"]) < 1.5 * mb
    assert out["closed"] == 0  # no process holds a store open


def test_a_gone_process_is_skipped():
    gone = psutil.Popen(["true"])
    gone.wait()
    assert store_resident_bytes([gone.pid]) == 0
