"""popscale.memory: the object store's pages counted once, apart from each process's own memory."""

import mmap
import os
import tempfile
from pathlib import Path

import psutil
import pytest

from popscale.memory import process_memory, store_resident_bytes

SHM = Path("/dev/shm")
MB = 2**20


@pytest.mark.skipif(not SHM.is_dir() or not os.access(SHM, os.W_OK), reason="no writable /dev/shm")
def test_the_store_file_counts_once_mapped_or_not_and_leaves_the_process_own_memory():
    me = psutil.Process()
    before = process_memory(me)
    with tempfile.NamedTemporaryFile(dir=SHM, prefix="plasma-test-") as f:
        f.truncate(8 * MB)  # a sparse file, as Ray's store is until objects are written
        assert store_resident_bytes([os.getpid()]) < MB
        with mmap.mmap(f.fileno(), 8 * MB) as m:
            m[: 2 * MB] = b"x" * (2 * MB)  # this process alone maps and touches 2 MB of it
            os.pwrite(f.fileno(), b"y" * MB, 6 * MB)  # 1 MB more resident, never mapped here
            now = process_memory(me)
            assert 1.9 * MB <= now.store_pss <= 2.1 * MB
            assert 2.9 * MB <= store_resident_bytes([os.getpid()]) <= 3.1 * MB
            # the mapped pages are the store's, not the process's own memory (which moved by far less)
            assert abs(now.own_pss - before.own_pss) < 1.5 * MB
    assert store_resident_bytes([os.getpid()]) == 0  # closed: no process holds a store open


def test_no_store_open_is_zero_and_a_gone_process_is_skipped():
    gone = psutil.Popen(["true"])
    gone.wait()
    assert store_resident_bytes([gone.pid, os.getpid()]) == 0
