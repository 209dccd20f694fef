"""Commands on a Ray cluster: submit a popscale command as a job; list, follow, check and stop jobs.
Each command's flags sit beside its handler."""


from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data_service.errors import ConfigError
from data_service.remote import redact

from .common import result, say


def _env_pairs(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for kv in pairs or []:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--env {kv!r}: expected KEY=VALUE")
        out[k.strip()] = v
    return out


def address_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--address", help="the cluster's Jobs API (default: $RAY_API_SERVER_ADDRESS, else "
                                      "http://127.0.0.1:8265)")


def add_submit(sub) -> None:
    s = sub.add_parser("submit", help="run a popscale command as a job on a Ray cluster (Ray Jobs API), streaming its logs",
                       usage="popscale submit [--address URL] [--no-wait] ... -- popscale COMMAND ...")
    address_flag(s)
    s.add_argument("--working-dir", default=".", help="shipped with the job (runs/, .venv/, .git/ excluded)")
    s.add_argument("--env", action="append", metavar="KEY=VALUE", help="an environment variable for the job (repeatable)")
    s.add_argument("--job-id", help="the job's id (default: Ray's raysubmit_...)")
    s.add_argument("--num-cpus", type=float, help="CPUs reserved for the job's driver")
    s.add_argument("--num-gpus", type=float, help="GPUs reserved for the job's driver")
    s.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    s.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- popscale pretrain")
    s.set_defaults(fn=cmd_submit)


def cmd_submit(a: argparse.Namespace) -> int:
    # deferred: importing the Ray job client only when used keeps start-up light
    from popscale.jobs import SubmitOptions, job_address, submit

    cmd = list(a.entrypoint)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    o = SubmitOptions(entrypoint=cmd, address=a.address, working_dir=a.working_dir, env=_env_pairs(a.env),
                      wait=not a.no_wait, submission_id=a.job_id, entrypoint_num_cpus=a.num_cpus,
                      entrypoint_num_gpus=a.num_gpus)
    say(f"submitting `{' '.join(cmd)}` to {job_address(a.address)} (working dir {Path(a.working_dir).resolve()})")
    job_id, status = submit(o)
    say(f"job {job_id}: {status}" + ("" if o.wait else f"; follow it with `popscale jobs logs {job_id} --follow`"))
    result(job_id=job_id, status=status, address=job_address(a.address))
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def add_jobs(sub) -> None:
    s = sub.add_parser("jobs", help="list, follow, check or stop Ray cluster jobs")
    s.add_argument("action", choices=["list", "logs", "status", "stop"])
    s.add_argument("job_id", nargs="?")
    s.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    address_flag(s)
    s.set_defaults(fn=cmd_jobs)


def cmd_jobs(a: argparse.Namespace) -> int:
    # deferred: importing the Ray job client only when used keeps start-up light
    from popscale.jobs import client, follow, job_address, status_name

    if a.action != "list" and not a.job_id:
        raise ConfigError(f"popscale jobs {a.action} needs a job id (popscale jobs list shows them)")
    c = client(a.address)
    if a.action == "list":
        jobs = sorted(c.list_jobs(), key=lambda j: j.start_time or 0)
        t = Table(title=f"jobs on {redact(job_address(a.address))}")
        for col in ("job id", "status", "entrypoint", "started"):
            t.add_column(col)
        for j in jobs:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else ""
            t.add_row(j.submission_id or j.job_id or "", status_name(j.status), redact(j.entrypoint), started)
        Console(width=160).print(t)
        result(jobs=len(jobs), running=sum(status_name(j.status) == "RUNNING" for j in jobs))
        return 0
    if a.action == "logs":
        if a.follow:
            status = follow(c, a.job_id)
        else:
            sys.stdout.write(c.get_job_logs(a.job_id))
            status = status_name(c.get_job_status(a.job_id))
        result(job_id=a.job_id, status=status)
        return 0
    if a.action == "status":
        status = status_name(c.get_job_status(a.job_id))
        result(job_id=a.job_id, status=status)
        return 0
    stopped = c.stop_job(a.job_id)
    say(f"job {a.job_id}: " + ("stop requested" if stopped else "was not running"))
    result(job_id=a.job_id, stopped=str(stopped).lower(), status=status_name(c.get_job_status(a.job_id)))
    return 0


def add_commands(sub) -> None:
    add_submit(sub)
    add_jobs(sub)
