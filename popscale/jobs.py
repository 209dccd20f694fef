"""Sending popscale commands to a Ray cluster as jobs (the Ray Jobs API), and managing them.

`popscale submit -- popscale pretrain ...` ships the working directory (code and configs, never
runs/, .venv/ or .git/) as the job's runtime environment; the cluster's image provides the
dependencies, so no job reinstalls torch. Ray's token authentication is on by default for
clusters this Ray version starts; the token is read the way Ray reads it (RAY_AUTH_TOKEN, the
file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) and sent as a header, never printed. The
default address is loopback; an address or entrypoint that carries a password (http://user:pw@host)
is printed with the password masked (data_service.remote.redact).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from data_service.remote import redact

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# what never travels with a job: local state, environments, VCS, caches
EXCLUDES = ["runs/", ".venv/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60.0  # how long a submit waits for a freshly started head's job agent


def job_address(address: str | None = None) -> str:
    """The Jobs API URL: --address, else $RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS, else loopback."""
    a = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not a:
        env = os.environ.get("RAY_ADDRESS", "")
        a = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if "://" not in a:
        a = f"http://{a}"
    return a


def _enable_token_auth() -> None:
    """Send Ray's token when one is available: the Jobs client only adds it in token mode, and the
    mode is only implied (not set) for a cluster that started with the default."""
    # deferred: importing ray only when used keeps start-up light
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    with _quiet_ray():  # its "token auth is enabled" notice is not for job users
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextmanager
def _quiet_ray():
    log = logging.getLogger("ray")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def client(address: str | None = None):
    """A JobSubmissionClient for the cluster, with its auth token when there is one."""
    # deferred: importing ray only when used keeps start-up light
    from ray.job_submission import JobSubmissionClient

    _enable_token_auth()
    url = job_address(address)
    try:
        return JobSubmissionClient(url)
    except ConnectionError as e:  # the message names the URL: its password, if any, masked
        raise ConnectionError(redact(f"no Ray Jobs API at {url} ({e}); start a cluster (runbooks/cluster.md) or "
                                     "pass --address")) from None


@dataclass
class SubmitOptions:
    entrypoint: list[str]
    address: str | None = None
    working_dir: str = "."
    env: dict[str, str] = field(default_factory=dict)
    wait: bool = True
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None


def runtime_env(o: SubmitOptions) -> dict:
    wd = Path(o.working_dir).resolve()
    if not wd.is_dir():
        raise FileNotFoundError(f"--working-dir {o.working_dir}: not a directory")
    env = {"working_dir": str(wd), "excludes": list(EXCLUDES)}
    if o.env:
        env["env_vars"] = dict(o.env)
    return env


def submit(o: SubmitOptions, out=sys.stdout) -> tuple[str, str]:
    """Submit `o.entrypoint`; with `o.wait`, stream its logs to `out` until it ends. (job id, status)."""
    if not o.entrypoint:
        raise ValueError("nothing to submit: give the command after --, e.g. popscale submit -- popscale pretrain")
    c = client(o.address)
    env = runtime_env(o)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            with _quiet_ray():  # the upload's INFO lines (which files it skipped) are noise here
                job_id = c.submit_job(entrypoint=shlex.join(o.entrypoint), runtime_env=env,
                                      submission_id=o.submission_id, entrypoint_num_cpus=o.entrypoint_num_cpus,
                                      entrypoint_num_gpus=o.entrypoint_num_gpus,
                                      metadata={"submitted_by": "popscale", "command": " ".join(o.entrypoint[:2])})
            break
        except RuntimeError as e:  # a head that just started answers before its job agent is up
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    if not o.wait:
        return job_id, str(c.get_job_status(job_id))
    return job_id, follow(c, job_id, out)


def follow(c, job_id: str, out=sys.stdout) -> str:
    """Stream a job's log to `out` until the job ends; its final status."""
    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError:  # the log socket closed early: the status below still tells how it ended
        pass
    while True:  # the log stream ends when the job does; the status may lag it by a moment
        status = str(c.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(0.5)


def status_name(s) -> str:
    return str(getattr(s, "value", s))
