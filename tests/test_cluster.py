"""The cluster launcher config, the KubeRay RayJob and the image parse, pin the versions the
project pins, bind the dashboard to loopback, and say they are untested against a live cloud."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def pins() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    return {name: version for name, version in re.findall(r'"(ray|torch)(?:\[[^\]]*\])?==([\d.]+)"', text)}


def test_launcher_config():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster-gpu.yaml").read_text())
    p = pins()
    assert f"ray{p['ray']}" in cfg["docker"]["image"] and f"torch{p['torch']}" in cfg["docker"]["image"]
    assert cfg["setup_commands"] == []  # dependencies come from the image
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "UNTESTED" in (CLUSTER / "ray-cluster-gpu.yaml").read_text()


def test_rayjob_manifest():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    p = pins()
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == p["ray"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert f"ray{p['ray']}-torch{p['torch']}" in workers["image"]
    assert "working_dir" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert job["spec"]["entrypoint"].startswith("popscale ")
    assert "UNTESTED" in (CLUSTER / "rayjob.yaml").read_text()


def test_image_pins():
    text = (CLUSTER / "Dockerfile").read_text()
    p = pins()
    assert f"rayproject/ray:{p['ray']}-" in text and f"torch=={p['torch']}" in text
