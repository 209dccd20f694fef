"""Fault drills for pretraining and ingest, each against an uninterrupted run of the same command.

Every drill runs the real CLI (`popscale pretrain` / `popscale ingest`: embedded Ray, Ray Data,
Ray Train + DeepSpeed on CPU, MLflow on sqlite) on a small synthetic corpus and a tiny model:

- reference: one uninterrupted run; its window sequence and final weights are the baseline;
- worker / data-actor kills: SIGKILL the training worker (its pid is in the window record) or
  the Ray Data actor at random steps, several times in one run; Ray restarts them;
- driver kill: SIGKILL the `popscale pretrain` process itself at a random step, then run
  `popscale pretrain ... --resume NAME` (the name it printed when it started);
- a chunk corrupted under the running job (chunk cache off, so the next read sees it): the
  run stops naming session and array; the chunk is restored and `--resume` finishes the run;
- a node lost (`--drills node`): a 3-node Ray cluster on loopback (pretrain/run/local_cluster.py,
  one training slot a node), `popscale pretrain` with 2 workers on two of them; the node under a
  worker is killed whole (raylet, object store, worker, data actors) right after a checkpoint at a
  random step, and the run goes on on the spare node; compared against an uninterrupted 2-worker
  run on the same cluster, every rank's windows;
- ingest killed at random points (fault points and wall-clock kills): readers see only complete
  sessions, and re-running the same ingest finishes with the bytes of a clean one.

For each pretraining drill: did it finish, how many windows were lost or repeated against the
reference (the last record of each step is the one the final model saw), and the largest weight
difference. `--quick` makes fewer, shorter runs (about 5 minutes on 2 cores: every run starts
its own Ray); the full drill about 12. Results: bench/figures/faults/faults.json and a table.

    .venv/bin/python bench/faults.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
POPSCALE = [sys.executable, "-m", "popscale.cli"]
OUT = REPO / "bench" / "figures" / "faults"

DRILLS = "kills,driver,corrupt,node,ingest"
TINY = {"dim": 32, "depth": 1, "dim_head": 16, "cross_heads": 1, "self_heads": 2, "latents_per_step": 4}


def run_config(work: Path, corpus: Path, steps: int, batch: int, tag: str = "faults") -> Path:
    import yaml

    cfg = {"name": "faults", "data": {"corpus": str(corpus), "global_batch": batch, "loader": "ray"},
           "train": {"steps": steps, "checkpoint_every": 2, "eval_every": steps, "log_every": 1, "warmup_steps": 2,
                     "max_failures": 4},
           "cluster": {"storage_path": str(work / "ray"), "cpus_per_worker": 1},
           "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
           "model_overrides": TINY}
    p = work / f"{tag}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# ---- one CLI run, watched -------------------------------------------------------------------------------
class Run:
    """`popscale pretrain` in its own process group, recording every window it consumes."""

    def __init__(self, work: Path, config: Path, tag: str, *extra: str, env: dict | None = None) -> None:
        self.rec = work / f"rec-{tag}"
        self.rec.mkdir(exist_ok=True)
        self.log = work / f"{tag}.log"
        e = {**os.environ, "POPSCALE_RECORD_WINDOWS": str(self.rec), **(env or {})}
        with open(self.log, "ab") as f:
            self.p = subprocess.Popen([*POPSCALE, "pretrain", "--config", str(config), "--no-progress", *extra],
                                      stdout=f, stderr=subprocess.STDOUT, env=e, cwd=REPO, start_new_session=True)

    def last(self) -> tuple[int, int]:
        """(step, worker pid) of the newest window record, (-1, 0) before the first."""
        f = self.rec / "rank0.jsonl"
        try:
            lines = f.read_text().splitlines()
        except FileNotFoundError:
            return -1, 0
        if not lines:
            return -1, 0
        try:
            r = json.loads(lines[-1])
        except ValueError:  # a line being written
            r = json.loads(lines[-2]) if len(lines) > 1 else {"step": -1, "pid": 0}
        return int(r["step"]), int(r["pid"])

    def wait_step(self, step: int, timeout: float = 300) -> int:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            s, pid = self.last()
            if s >= step:
                return pid
            if self.p.poll() is not None:
                raise RuntimeError(f"run ended (rc {self.p.returncode}) before step {step}; see {self.log}")
            time.sleep(0.05)
        raise TimeoutError(f"no step {step} within {timeout:.0f} s; see {self.log}")

    def finish(self, timeout: float = 900) -> int:
        return self.p.wait(timeout=timeout)

    def name(self) -> str:
        for line in self.log.read_text().splitlines():
            if line.startswith("run ") and ":" in line:
                return line[4:].split(":", 1)[0].strip()
        raise RuntimeError(f"no run name in {self.log}")

    def result(self) -> dict[str, str]:
        lines = [ln for ln in self.log.read_text().splitlines() if ln.startswith("RESULT ")]
        return dict(kv.split("=", 1) for kv in lines[-1].split()[1:]) if lines else {}


def sequence(rec: Path, rank: int = 0) -> list[int]:
    """Stream positions the final model saw: the last record of each step."""
    last: dict[int, list[int]] = {}
    for line in (rec / f"rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        last[r["step"]] = r["positions"]
    return [p for s in sorted(last) for p in last[s]]


def attempts(rec: Path) -> int:
    return len({json.loads(ln)["pid"] for ln in (rec / "rank0.jsonl").read_text().splitlines()})


def weights(work: Path, name: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(work / "ray" / name / "export" / "model.safetensors"))


def compare(ref_seq: list[int], seq: list[int], ref_w: dict, w: dict) -> dict:
    from collections import Counter

    a, b = Counter(ref_seq), Counter(seq)
    lost, repeated = sum((a - b).values()), sum((b - a).values())
    diff = max(float(np.max(np.abs(ref_w[k] - w[k]))) for k in ref_w) if ref_w.keys() == w.keys() else float("inf")
    return {"windows_lost": lost, "windows_repeated": repeated, "same_order": seq == ref_seq, "max_weight_diff": diff}


def ray_leftovers(pgid: int) -> int:
    """Processes of a killed driver's group still alive (Ray's own processes share its fate)."""
    import psutil

    n = 0
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                n += 1
        except (ProcessLookupError, psutil.Error):
            pass
    return n


def kill_data_actor(pgid: int) -> int:
    """SIGKILL a Ray Data actor of this run (its driver's process group), never another job's."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = (p.info["cmdline"] or [""])[:1]
        try:
            ours = os.getpgid(p.pid) == pgid
        except ProcessLookupError:
            continue
        if ours and cmd and "_Builder" in cmd[0]:
            os.kill(p.pid, signal.SIGKILL)
            return p.pid
    return 0


# ---- the drills -----------------------------------------------------------------------------------------
def drill_kills(work, config, rng, steps, kinds: list[str]) -> dict:
    """SIGKILL a training worker or the data actor at random steps, in order, one run."""
    targets = sorted(rng.sample(range(2, steps - 1), len(kinds)))
    run = Run(work, config, "kills")
    done = []
    for kind, step in zip(kinds, targets):
        pid = run.wait_step(step)
        if kind == "worker":
            os.kill(pid, signal.SIGKILL)
            # the next target waits for the restarted worker (a new pid) to pass it
            while run.last()[1] == pid and run.p.poll() is None:
                time.sleep(0.05)
        else:
            pid = kill_data_actor(run.p.pid)
        done.append({"kind": kind, "step": step, "pid": pid})
    rc = run.finish()
    return {"run": run, "rc": rc, "faults": done}


def drill_driver(work, config, rng, steps) -> dict:
    step = rng.randrange(3, steps - 2)
    first = Run(work, config, "driver")
    first.wait_step(step)
    name = first.name()
    os.kill(first.p.pid, signal.SIGKILL)
    first.p.wait()
    deadline = time.monotonic() + 30
    while ray_leftovers(first.p.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = ray_leftovers(first.p.pid)
    if left:
        os.killpg(first.p.pid, signal.SIGKILL)
    second = Run(work, config, "driver", "--resume", name)
    rc = second.finish()
    return {"run": second, "rc": rc, "faults": [{"kind": "driver", "step": step, "ray_processes_left": left}],
            "name": name}


def drill_corrupt(work, config, corpus_copy: Path, rng, steps) -> dict:
    """Flip a byte in every inner chunk of one session's spike times while the run reads with no
    chunk cache; expect a stop naming them; restore the file; --resume."""
    from data_service.shards import open_sharded

    sessions = sorted(p.name for p in (corpus_copy / "sessions").iterdir() if p.is_dir())
    session = rng.choice(sessions)
    arr_dir = corpus_copy / "sessions" / session / "spikes" / "timestamps"
    step = rng.randrange(3, steps - 2)
    run = Run(work, config, "corrupt", env={"POPSCALE_CHUNK_CACHE_MB": "0"})
    run.wait_step(step)
    name = run.name()
    arr = open_sharded(arr_dir)
    saved = {}
    for f in sorted(p for p in arr_dir.iterdir() if p.name != "zarr.json"):
        saved[f] = f.read_bytes()
        b = bytearray(saved[f])
        for off, n in arr._shard_index(int(f.name.split(".")[0]))[1]:
            if n:
                b[off + n // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    rc_fail = run.finish()
    stop_line = next((ln for ln in run.log.read_text().splitlines() if ln.startswith("error:")), "")
    named = session in stop_line and "spikes/timestamps" in stop_line
    for f, data in saved.items():
        f.write_bytes(data)
    again = Run(work, config, "corrupt", "--resume", name)
    rc = again.finish()
    return {"run": again, "rc": rc, "stopped_rc": rc_fail, "stop_line": stop_line, "named": named,
            "faults": [{"kind": "corrupt chunk", "step": step, "session": session}], "name": name}


def drill_node(work, corpus: Path, rng, steps) -> tuple[dict, dict]:
    """Lose the node under a training worker: 3 nodes with one training slot each, 2 workers, the
    worker of rank 1 held right after a random checkpoint, then its node killed whole (when it sits
    on the head, which holds the cluster, rank 0's node instead). Returns (reference, drill)."""
    import yaml

    from pretrain.run.local_cluster import LocalCluster

    node = {"num_cpus": 2, "resources": {"trainer": 1}}
    with LocalCluster([node, node, node]) as c:
        def config(tag: str) -> Path:
            p = run_config(work, corpus, steps, 8, tag)
            cfg = yaml.safe_load(p.read_text())
            cfg["cluster"].update(address=c.address, num_workers=2, worker_resources={"trainer": 1})
            p.write_text(yaml.safe_dump(cfg))
            return p

        ref = Run(work, config("node-ref"), "node-ref")
        ref_rc = ref.finish()
        step = 2 * rng.randrange(1, steps // 2 - 1)  # right after a checkpoint (every 2 steps)
        marker = work / "node-held"
        run = Run(work, config("node"), "node", env={"POPSCALE_TRAIN_HOLD": f"1:{step}:{marker}"})
        deadline = time.monotonic() + 600
        while not marker.exists() and run.p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        lost = None
        if marker.exists():
            held = marker.read_text()
            lost = held
            if held == c.nodes[0].node_id:
                lost = next(json.loads(ln)["node"] for ln in (run.rec / "steps-rank0.jsonl").read_text().splitlines())
            c.kill(lost)
        rc = run.finish()
    fault = {"kind": "node", "step": step, "node": (lost or "")[:8]}
    return {"run": ref, "rc": ref_rc, "faults": []}, {"run": run, "rc": rc, "faults": [fault]}


def drill_ingest(work, rng, n: int) -> list[dict]:
    """Kill `popscale ingest` of the real recordings at random points; re-run; compare with a clean ingest."""
    from data_service.manifest import read_manifest
    from data_service.reader import Corpus
    from data_service.verify import verify

    real = REPO.parent / "shared" / "data" / "real"
    meta = REPO / "configs" / "real_recordings.yaml"
    if not real.is_dir():
        return []

    def ingest(root, env=None, kill_after=None):
        p = subprocess.Popen([*POPSCALE, "ingest", str(real), "--corpus", str(root), "--meta", str(meta)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, cwd=REPO)
        if kill_after is not None:
            try:
                p.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                p.kill()
        p.wait()
        return p.returncode

    clean_root = work / "ingest-clean"
    t0 = time.monotonic()
    ingest(clean_root)
    clean_s = time.monotonic() - t0
    clean = {sid: r["content_hash"] for sid, r in read_manifest(clean_root).items()}
    out = []
    for i in range(n):
        root = work / f"ingest-{i}"
        if i % 2 == 0:
            point = rng.choice(["array-written", "staged", "committed"])
            k = rng.randint(1, {"array-written": 40, "staged": len(clean), "committed": len(clean)}[point])
            how, rc = f"{point}:{k}", ingest(root, env={"POPSCALE_FAULT": f"{point}:{k}"})
        else:
            t = rng.uniform(0.5, clean_s)
            how, rc = f"SIGKILL at {t:.1f} s", ingest(root, kill_after=t)
        killed = rc != 0
        visible_ok = True
        if (root / "manifest.json").exists():
            c = Corpus(root)
            try:
                for sid in c.session_ids:
                    t_, u_ = c.session(sid).spikes()
                    visible_ok &= len(t_) == c.rows[sid]["n_spikes"] == len(u_)
            except Exception:  # noqa: BLE001 - a reader failing here is what the drill looks for
                visible_ok = False
            problems = [str(p) for p in verify(root).problems if "not in the manifest" not in str(p)]
            visible_ok &= not problems
        rc2 = ingest(root)
        final = {sid: r["content_hash"] for sid, r in read_manifest(root).items()}
        out.append({"kind": "ingest kill", "how": how, "killed": killed, "complete_sessions_only": visible_ok,
                    "rerun_rc": rc2, "same_as_clean": final == clean})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="--quick: fewer faults, shorter runs "
                                 "(about 5 min: every run starts its own Ray, which no quick mode can shorten)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drills", default=DRILLS, help="which drills (comma-separated)")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    steps = 12 if a.quick else 24
    kinds = ["worker", "actor", "worker"] if a.quick else ["worker", "actor", "worker", "actor", "worker"]
    work = Path(a.work or tempfile.mkdtemp(prefix="popscale-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    from data_service.synth import SynthConfig, synth_corpus

    corpus = work / "corpus"
    if not (corpus / "manifest.json").exists():
        synth_corpus(SynthConfig(sessions=3, subjects=2, minutes=1.5, min_units=20, max_units=40), corpus, workers=1)
    config = run_config(work, corpus, steps, 8)
    t0 = time.monotonic()
    ref = Run(work, config, "reference")
    assert ref.finish() == 0, ref.log.read_text()[-3000:]
    ref_name = ref.name()
    ref_seq, ref_w = sequence(ref.rec), weights(work, ref_name)
    rows = []

    def row(drill: str, d: dict) -> None:
        run = d["run"]
        ok = d["rc"] == 0
        cmp = compare(ref_seq, sequence(run.rec), ref_w, weights(work, run.name())) if ok else {}
        rows.append({"drill": drill, "faults": d["faults"], "completed": ok, "attempts": attempts(run.rec), **cmp,
                     **{k: d[k] for k in ("stop_line", "named", "stopped_rc") if k in d}})
        print(f"{drill}: {'completed' if ok else 'FAILED'} {cmp}", flush=True)

    drills = set(a.drills.split(","))
    if "kills" in drills:
        row("worker and data-actor kills", drill_kills(work, config, rng, steps, kinds))
    if "driver" in drills:
        row("driver kill + --resume", drill_driver(work, config, rng, steps))
    if "corrupt" in drills:
        copy = work / "corpus-copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(corpus, copy)
        row("corrupt chunk + --resume", drill_corrupt(work, run_config(work, copy, steps, 8, "corrupt"), copy, rng,
                                                      steps))
    if "node" in drills:  # its own uninterrupted run: 2 workers on the cluster, every rank's windows compared
        node_ref, node = drill_node(work, corpus, rng, steps)
        if node_ref["rc"] != 0:
            raise RuntimeError(f"the 2-worker reference on the cluster failed; see {node_ref['run'].log}")
        ok = node["rc"] == 0
        cmp: dict = {}
        if ok:
            ref2 = node_ref["run"]
            seq_ref = sequence(ref2.rec, 0) + sequence(ref2.rec, 1)
            seq = sequence(node["run"].rec, 0) + sequence(node["run"].rec, 1)
            cmp = compare(seq_ref, seq, weights(work, ref2.name()), weights(work, node["run"].name()))
        rows.append({"drill": "node lost (3-node cluster, 2 workers)", "faults": node["faults"], "completed": ok,
                     "attempts": attempts(node["run"].rec), **cmp})
        print(f"node: {'completed' if ok else 'FAILED'} {cmp}", flush=True)
    ingest_rows = drill_ingest(work, rng, 3 if a.quick else 8) if "ingest" in drills else []
    seconds = time.monotonic() - t0

    OUT.mkdir(parents=True, exist_ok=True)
    some = "" if drills == set(DRILLS.split(",")) else "-" + "-".join(sorted(drills))  # a subset: its own file
    (OUT / f"faults{'-quick' if a.quick else ''}{some}.json").write_text(json.dumps(
        {"steps": steps, "seed": a.seed, "seconds": seconds, "pretrain": rows, "ingest": ingest_rows}, indent=2))
    print("\n| drill | faults injected | completed | attempts | windows lost | repeated | same order | max |w - w_ref| |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = ", ".join(f"{x['kind']}@{x['step']}" for x in r["faults"])
        print(f"| {r['drill']} | {f} | {r['completed']} | {r['attempts']} | {r.get('windows_lost', '-')} | "
              f"{r.get('windows_repeated', '-')} | {r.get('same_order', '-')} | {r.get('max_weight_diff', float('nan')):.2e} |")
    for r in rows:
        if "stop_line" in r:
            print(f"\ncorrupt chunk: the run stopped (exit {r['stopped_rc']}) with: {r['stop_line']}")
    if ingest_rows:
        print("\n| ingest kill | killed | readers saw complete sessions only | re-run exit | same as clean |")
        print("|---|---|---|---|---|")
        for r in ingest_rows:
            print(f"| {r['how']} | {r['killed']} | {r['complete_sessions_only']} | {r['rerun_rc']} | {r['same_as_clean']} |")
    injected = sum(len(r["faults"]) for r in rows) + len(ingest_rows)
    survived = sum(len(r["faults"]) for r in rows if r["completed"] and r.get("windows_lost") == 0
                   and r.get("windows_repeated") == 0 and r.get("named", True)) + \
        sum(1 for r in ingest_rows if r["complete_sessions_only"] and r["rerun_rc"] == 0 and r["same_as_clean"])
    lost = sum(r.get("windows_lost", 0) + r.get("windows_repeated", 0) for r in rows)
    print(f"\n{injected} faults injected, {survived} survived, {lost} windows lost or repeated, {seconds / 60:.1f} min")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT name=faults_survived baseline=uninterrupted_run ratio={survived / max(injected, 1):.2f}")


if __name__ == "__main__":
    main()
