"""Where a run's workers meet to form their process group.

Ray Train's `TorchConfig` rendezvous (`env://` or `tcp://`) starts torch.distributed's TCPStore on
rank 0, and that store binds every interface whatever MASTER_ADDR says (torch 2.13): the one
socket of a single-host run that was not on loopback (runbooks/security.md). When every worker of
the group runs on one host, as on the embedded Ray or a multi-node cluster on one machine, a
FileStore in a fresh owner-only directory does the same job with no socket, and gloo's pairs are
kept on the loopback interface. Workers on several hosts must reach each other, so there the
TCPStore stays (protect it with the host firewall).

`HostLocalTorchConfig` is Ray Train's TorchConfig with that one difference; it builds on Ray
Train's private torch backend (ray 2.60 is pinned), and tests/test_pretrain.py watches the sockets
of a two-worker run, so a Ray upgrade that changes it fails there first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import ray
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

STORE_PREFIX = "popscale-pg-"


def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _fresh_store() -> str:
    """A FileStore path in a new directory only this user can enter (rank 0 makes it)."""
    d = tempfile.mkdtemp(prefix=STORE_PREFIX)
    os.chmod(d, 0o700)
    return os.path.join(d, "store")


def _loopback_gloo() -> None:
    """Keep gloo's pairs on the loopback interface unless the user chose one."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _remove_store(path: str) -> None:
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


class _HostLocalBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "HostLocalTorchConfig") -> None:
        ips = set(worker_group.execute(_node_ip))
        if len(ips) != 1 or (backend_config.backend or "gloo") != "gloo":
            self._store = None
            return super().on_start(worker_group, backend_config)  # several hosts, or NCCL: Ray Train's own
        self._store = worker_group.execute_single(0, _fresh_store)
        worker_group.execute(_loopback_gloo)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend="gloo", world_rank=i,
                                                   world_size=len(worker_group), init_method=f"file://{self._store}",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config) -> None:
        super().on_shutdown(worker_group, backend_config)
        if getattr(self, "_store", None):
            try:
                worker_group.execute_single(0, _remove_store, self._store)
            except Exception:  # noqa: BLE001 - a worker already gone leaves a small file in the temp directory
                pass


@dataclass
class HostLocalTorchConfig(TorchConfig):
    """TorchConfig whose gloo process group meets in a FileStore when all workers share a host."""

    @property
    def backend_cls(self):
        return _HostLocalBackend
