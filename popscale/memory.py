"""What the processes of a Ray session hold, each page once.

Ray's object store is a shared-memory file (plasma: /dev/shm/plasmaXXXXXX, deleted once mapped) that
every process reading or writing objects maps. In a sum of the processes' PSS a store page counts only
while some process maps it, split between those that do: the sum grows when one process touches more
of the store (pages that were already resident) and drops when an actor that alone mapped some pages
exits. So a process's own memory is its PSS without the store's mappings, and the store is counted once,
from the file (the bytes the kernel holds for it, mapped or not). bench/soak.py measures with this.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

STORE_MARK = "/plasma"  # in the path of Ray's object-store file (its plasma_directory: /dev/shm, or /tmp)


def is_store(path: str) -> bool:
    """Whether a mapped or open file is the object store's."""
    return STORE_MARK in path


@dataclass(frozen=True)
class ProcessMemory:
    own_pss: int  # bytes: PSS without the object store's pages
    store_pss: int  # bytes: the store's pages as this process's PSS counts them
    rss: int


def process_memory(proc: psutil.Process) -> ProcessMemory:
    """One process's memory, its share of the object store apart (raises psutil's errors as they come)."""
    m = proc.memory_full_info()
    store = sum(x.pss for x in proc.memory_maps(grouped=True) if is_store(x.path))
    return ProcessMemory(getattr(m, "pss", m.rss) - store, store, m.rss)


def store_resident_bytes(pids: Iterable[int]) -> int:
    """The bytes the kernel holds for the object stores' files (their tmpfs blocks), found through the processes of
    `pids` that hold them open (each raylet holds its node's for the session's life); each file once."""
    seen: dict[tuple[int, int], int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if is_store(os.readlink(f"/proc/{pid}/fd/{fd}")):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
            except OSError:
                continue
    return sum(seen.values())
