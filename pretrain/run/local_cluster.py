"""A real multi-node Ray cluster on one machine, for tests, benchmarks and trying a cluster setup
before renting one: each node its own raylet, object store and workers (Ray's
`cluster_utils.Cluster`), every socket on loopback (runbooks/security.md), nodes that can be
killed whole (`kill`: the raylet, its object store and every worker and data actor on it).
Custom resources (`{"trainer": 1}`) place training workers and data actors on chosen nodes
(cluster.worker_resources, data.actor_resources). Adding a node back after a kill is left out:
on Ray 2.60 a node added to a `Cluster` after another was removed died seconds after it joined;
spare capacity stands in for it.

    with LocalCluster([{"num_cpus": 2}, {"num_cpus": 2, "resources": {"trainer": 1}}]) as c:
        pretrain(config(cluster.address=c.address, ...))
"""

from __future__ import annotations

import os
import time

import ray
from ray.cluster_utils import Cluster

from .launch import single_host_mode

LOOPBACK = "127.0.0.1"


class LocalCluster:
    """A head node (the first spec) and worker nodes on loopback; this process connects as the driver."""

    def __init__(self, nodes: list[dict], connect: bool = True) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        head, *rest = nodes
        with single_host_mode():
            self.cluster = Cluster(initialize_head=True, head_node_args=self._args(head, head=True))
            self.nodes = [self.cluster.head_node] + [self.cluster.add_node(**self._args(n)) for n in rest]
            self.cluster.wait_for_nodes()
            if connect:
                ray.init(address=self.address, _node_ip_address=LOOPBACK, log_to_driver=False,
                         runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}})

    @staticmethod
    def _args(spec: dict, head: bool = False) -> dict:
        args = {"node_ip_address": LOOPBACK, "num_cpus": 1, "object_store_memory": 200 << 20, **spec}
        if head:
            # a lost node is declared dead in ~5 s, not Ray's ~30 s (what a drill waits for); not faster:
            # on a loaded machine (2 cores, several nodes training) a live raylet misses 2 s of checks
            args.update(include_dashboard=False, dashboard_host=LOOPBACK,
                        _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 10,
                                        **spec.get("_system_config", {})})
        return args

    @property
    def address(self) -> str:
        return self.cluster.address

    def node(self, node_id: str):
        """The node with this id (e.g. from `ray.get_runtime_context().get_node_id()` on a worker)."""
        return next(n for n in self.nodes if n.node_id == node_id)

    def kill(self, node_id: str) -> None:
        """Kill a worker node whole, at once (SIGKILL: no graceful shutdown), as a lost machine."""
        node = self.node(node_id)
        if node is self.cluster.head_node:
            raise ValueError("the head node holds the cluster: kill a worker node")
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)
        # until the cluster has declared it dead (a drill then knows the restart sees it gone)
        deadline = time.monotonic() + 60
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()) and time.monotonic() < deadline:
            time.sleep(0.2)

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        self.cluster.shutdown()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
