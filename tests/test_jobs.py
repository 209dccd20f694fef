"""`popscale submit` / `popscale jobs` against a real Ray head this test starts on loopback, with
Ray's token authentication on: a job's output and status come back, a failing job says so, and a
client without the cluster's token is refused."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _popscale(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "popscale"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 (GCS, dashboard and Jobs API), its own token, stopped afterwards."""
    token = uuid.uuid4().hex
    temp = tempfile.mkdtemp(prefix="rayjobs", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash = _free_port(), _free_port()
    # every fixed default port on a free one, so the head starts beside any other Ray on the machine
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "ray-client-server-port",
        "runtime-env-agent-port")]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "1",
         "--temp-dir", temp, "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    client_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}  # as a user's shell: only the token
    try:
        deadline = time.monotonic() + 120
        while True:  # ready when the Jobs API answers (list needs the token)
            r = _popscale("jobs", "list", "--address", url, env=client_env, timeout=60)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up:\n{proc.stdout.read() if proc.poll() is not None else ''}"
                                   f"\n{r.stdout}\n{r.stderr}")
        yield url, client_env
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _result(stdout: str) -> dict[str, str]:
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def test_submit_runs_a_command_and_returns_output_and_status(head, tmp_path):
    url, env = head
    corpus = tmp_path / "corpus"
    r = _popscale("submit", "--address", url, "--job-id", "popscale-test-synth", "--",
                  "popscale", "synth", "--corpus", str(corpus), "--sessions", "1", "--subjects", "1",
                  "--minutes", "0.3", "--workers", "1", "--min-units", "5", "--max-units", "8", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^RESULT corpus=\S+ sessions=1 added=1", r.stdout, re.M), r.stdout  # the job's own output
    res = _result(r.stdout)
    assert res["job_id"] == "popscale-test-synth" and res["status"] == "SUCCEEDED"
    assert (corpus / "manifest.json").exists()
    assert env["RAY_AUTH_TOKEN"] not in r.stdout + r.stderr  # the token is never printed

    logs = _popscale("jobs", "logs", "popscale-test-synth", "--address", url, env=env)
    assert logs.returncode == 0 and "added=1" in logs.stdout and _result(logs.stdout)["status"] == "SUCCEEDED"
    listed = _popscale("jobs", "list", "--address", url, env=env)
    assert "popscale-test-synth" in listed.stdout and "SUCCEEDED" in listed.stdout


def test_a_failing_job_reports_failed(head, tmp_path):
    url, env = head
    r = _popscale("submit", "--address", url, "--", "popscale", "inspect", str(tmp_path / "no-such-corpus"), env=env)
    assert r.returncode == 1
    assert "not a popscale corpus" in r.stdout + r.stderr  # the job's error line, streamed back
    assert _result(r.stdout)["status"] == "FAILED"


def test_no_wait_then_stop(head):
    url, env = head
    r = _popscale("submit", "--address", url, "--no-wait", "--", "python", "-c", "import time; time.sleep(600)",
                  env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    job = _result(r.stdout)["job_id"]
    s = _popscale("jobs", "stop", job, "--address", url, env=env)
    assert s.returncode == 0 and _result(s.stdout)["stopped"] == "true"
    deadline = time.monotonic() + 60
    while _result(_popscale("jobs", "status", job, "--address", url, env=env).stdout)["status"] != "STOPPED":
        assert time.monotonic() < deadline, "the stopped job did not reach STOPPED"


def test_wrong_token_is_refused(head):
    url, env = head
    r = _popscale("jobs", "list", "--address", url, env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert r.returncode == 1
    assert "RESULT error=" in r.stdout and "not-the-token" not in r.stdout + r.stderr
