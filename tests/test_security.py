"""Security defaults (runbooks/security.md): every socket of a run on the embedded Ray binds a
loopback address and Ray's token authentication is on; exported and registered models load from
safetensors + JSON without unpickling or running anything stored with them (a planted pickle or
pyfunc module never runs, weights in any other format are refused); URL passwords never reach what
popscale prints or logs."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from data_service.remote import redact
from pretrain.model.config import ModelConfig
from pretrain.model.poyo import POYO
from pretrain.tokens.tokenizer import TokenizerConfig
from pretrain.tracking.export import export_model, load_exported
from pretrain.tracking.registry import load

TINY = ModelConfig(dim=32, depth=1, dim_head=16, cross_heads=1, self_heads=2, latents_per_step=4)

# Sockets that may bind beyond loopback, with the reason (runbooks/security.md names each one).
# Empty: on the embedded Ray every socket binds 127.0.0.1.
ALLOWED_EXPOSED: dict[str, str] = {}


# ---- listeners -----------------------------------------------------------------------------------------
def _ss_lines(pids: set[int]) -> list[str]:
    """`ss -ltnup` rows of these processes (what an operator would look at)."""
    out = subprocess.run(["ss", "-ltnupH"], capture_output=True, text=True, timeout=30).stdout
    return [ln for ln in out.splitlines() if any(f"pid={p}," in ln for p in pids)]


def _ss_address(line: str) -> str:
    local = line.split()[4]  # netid state recv-q send-q LOCAL PEER process
    return local.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    """init_ray as `popscale pretrain` calls it, tasks and an actor running (so workers, agents and
    the driver's own server exist): every listening socket of the session binds loopback."""
    import ray

    from popscale.listeners import Listener, is_loopback, listening_sockets, session_pids
    from pretrain.run.config import load_config
    from pretrain.run.launch import init_ray

    if ray.is_initialized():
        ray.shutdown()
    mode = os.environ.get("RAY_AUTH_MODE")
    init_ray(load_config(None, ["cluster.local_cpus=2", f"cluster.storage_path={tmp_path / 'ray'}"]))
    try:
        @ray.remote(num_cpus=0)
        class Echo:
            def ping(self, x):
                return x

        @ray.remote(num_cpus=0.5)
        def add(x):
            return x + 1

        echo = Echo.remote()
        assert ray.get([add.remote(i) for i in range(4)]) == [1, 2, 3, 4]
        assert ray.get(echo.ping.remote("x")) == "x"
        assert ray._private.worker.global_worker.node.node_ip_address == "127.0.0.1"
        # the agents open their ports a few seconds after start: look until the set stops growing
        seen: set[Listener] = set()
        deadline, stable = time.monotonic() + 20, 0
        while time.monotonic() < deadline and stable < 3:
            now = set(listening_sockets())
            stable = stable + 1 if now <= seen and any("DashboardAgent" in s.process for s in now) else 0
            seen |= now
            time.sleep(1.0)
        pids = session_pids()
        ss = _ss_lines(pids) if shutil.which("ss") else []
    finally:
        ray.shutdown()
    print("listening sockets of the embedded Ray session:")
    print("\n".join(f"  {s}" for s in sorted(seen, key=str)))
    print("ss -ltnup:\n" + "\n".join(f"  {ln}" for ln in ss))
    kinds = {s.process.split(" ")[0] for s in seen}
    for must in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        assert must in kinds, f"no {must} socket found: {sorted(kinds)}"
    assert any(s.pid == os.getpid() for s in seen), "the driver's own core-worker server was not found"
    assert any(k.startswith("ray::") and "Agent" not in k for k in kinds), "no worker socket found"
    exposed = [s for s in seen if not s.loopback and s.process.split(" ")[0] not in ALLOWED_EXPOSED]
    assert not exposed, "sockets beyond loopback:\n" + "\n".join(map(str, exposed))
    bad_ss = [ln for ln in ss if not is_loopback(_ss_address(ln))]
    assert not bad_ss, "ss shows sockets beyond loopback:\n" + "\n".join(bad_ss)
    if mode is None or mode.lower() == "token":  # Ray's default for a new local cluster, unless opted out
        assert os.environ.get("RAY_AUTH_MODE") == "token"
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_uid == os.getuid():
        assert token.stat().st_mode & 0o077 == 0, "Ray's token file is readable by other users"


def test_loopback_addresses():
    from popscale.listeners import is_loopback

    for ip in ("127.0.0.1", "127.3.0.1", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(ip), ip
    for ip in ("0.0.0.0", "::", "*", "192.0.2.2", "::ffff:10.0.0.1", "fe80::1%eth0", ""):
        assert not is_loopback(ip), ip


def test_listeners_of_a_plain_socket():
    """The enumeration sees a socket of this process, TCP and UDP, with its address."""
    from popscale.listeners import listening_sockets

    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        found = {(s.proto, s.ip, s.port) for s in listening_sockets({os.getpid()})}
        assert ("tcp", "127.0.0.1", tcp.getsockname()[1]) in found
        assert ("udp", "127.0.0.1", udp.getsockname()[1]) in found


# ---- models load without running stored code ---------------------------------------------------------------
class Payload:
    """Unpickling this writes its marker file: what a malicious model.pt / python_model.pkl does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _export(path: Path) -> tuple[Path, POYO]:
    torch.manual_seed(0)
    model = POYO(TINY, [f"u{i}" for i in range(6)], ["s1"])
    cfg = TokenizerConfig.build(TINY, window_s=1.0, behaviours={"velocity": ["hand_vel"]},
                                target_scale={"hand_vel": 1.0})
    return export_model(model, cfg, path), model.eval()


def _plant(d: Path, marker: Path) -> None:
    """Everything a loader that trusts the directory would run: pickles under the names torch,
    MLflow's pyfunc and cloudpickle use, and a pyfunc `loader_module` that runs on import."""
    blob = pickle.dumps(Payload(marker))
    for name in ("model.pt", "pytorch_model.bin", "python_model.pkl", "data/model.pth", "artifacts/model.pkl"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(blob)
    (d / "code").mkdir(exist_ok=True)
    (d / "code" / "evil_loader.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                               "def _load_pyfunc(path):\n    return None\n")
    (d / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: evil_loader\n    code: code\n"
                               "    python_model: python_model.pkl\n    env: {}\n")


def test_exported_model_loads_without_running_planted_code(tmp_path):
    out, model = _export(tmp_path / "export")
    marker = tmp_path / "pwned"
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(Payload(armed)))  # the payload is live: unpickling it runs it
    assert armed.read_text() == "pwned"
    _plant(out, marker)
    m, _ = load_exported(out)
    m2, _, path = load(out)  # the directory form of `popscale pull/decode/finetune --model DIR`
    assert path == out.resolve()
    for loaded in (m, m2):
        for k, v in model.state_dict().items():
            if not k.endswith("_extra_state"):
                assert torch.equal(loaded.state_dict()[k], v), k
    assert not marker.exists(), "loading an exported model ran a planted payload"


def test_weights_in_another_format_are_refused(tmp_path):
    out, _ = _export(tmp_path / "export")
    marker = tmp_path / "pwned"
    weights = out / "model.safetensors"
    good = weights.read_bytes()
    # a pickle (torch.save's format too) under the safetensors name: not parsed as anything but safetensors
    weights.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(Exception, match="(?i)header|deserializ"):
        load_exported(out)
    buf = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(2), "p": Payload(marker)}, buf)
    weights.write_bytes(buf.read_bytes())
    with pytest.raises(Exception, match="(?i)header|deserializ"):
        load_exported(out)
    assert not marker.exists()
    # weights missing, or renamed to a pickle's name: refused, naming the file that is needed
    weights.write_bytes(good)
    weights.rename(out / "model.pt")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_exported(out)
    assert not marker.exists()


def test_registered_model_pulls_and_loads_without_running_its_pyfunc(tmp_path):
    """A registered version whose MLflow artifacts carry a pickled python model and a pyfunc loader
    module: `pull` copies files, `load_model` reads weights + JSON; neither runs."""
    pytest.importorskip("mlflow")
    import mlflow

    from pretrain.tracking.registry import load_model, register

    out, model = _export(tmp_path / "export")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = mlflow.MlflowClient(tracking)
    run_id = c.create_run(c.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    _, uri = register(tracking, run_id, out, "tiny")
    marker = tmp_path / "pwned"
    logged = [p.parent for p in (tmp_path / "art").rglob("MLmodel")]
    assert logged, "no logged MLflow model found to plant into"
    for d in logged:  # the pyfunc wrapper's own files, and beside the weights
        _plant(d, marker)
        for sub in d.rglob("model.safetensors"):
            _plant(sub.parent, marker)
    loaded, _ = load_model(uri, tracking, cache=tmp_path / "cache")
    assert torch.equal(loaded.state_dict()["unit_emb.weight"], model.state_dict()["unit_emb.weight"])
    assert not marker.exists(), "pulling or loading a registered model ran a planted payload"


def test_no_unsafe_torch_load_in_popscale():
    """popscale's own code never unpickles with torch.load(weights_only=False) nor pickle-loads a file
    (DeepSpeed's own checkpoints are trusted local state: runbooks/security.md)."""
    root = Path(__file__).resolve().parents[1]
    hits = []
    for d in ("pretrain", "popscale", "data_service", "bench"):
        for f in (root / d).rglob("*.py"):
            text = f.read_text()
            for i, line in enumerate(text.splitlines(), 1):
                if "weights_only=False" in line.replace(" ", "") or "pickle.load(" in line:
                    hits.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
                if "torch.load(" in line and "weights_only=True" not in line.replace(" ", ""):
                    hits.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ---- credentials are not printed ---------------------------------------------------------------------------
def test_redact_masks_url_passwords_and_secret_query_values():
    cases = {
        "http://alice:hunter2@mlflow.lab:5000/": "http://alice:***@mlflow.lab:5000/",
        "no model 'x' in https://bob:p%40ss@host (registered models: none)":
            "no model 'x' in https://bob:***@host (registered models: none)",
        "https://s3.example/b/k?X-Amz-Credential=AKIA1&X-Amz-Signature=abc&part=2":
            "https://s3.example/b/k?X-Amz-Credential=***&X-Amz-Signature=***&part=2",
        "http://h/x?token=t0k3n#frag": "http://h/x?token=***#frag",
    }
    for raw, shown in cases.items():
        assert redact(raw) == shown
    for same in ("sqlite:////tmp/runs/mlflow.db", "s3://bucket/corpora/a", "http://127.0.0.1:8265",
                 "ssh://git@host/repo", "models:/popscale-poyo@pretrained", "loss 0.31 at step 40"):
        assert redact(same) == same


def test_cli_output_and_jobs_errors_mask_passwords(capsys):
    from popscale import cli, jobs

    cli.say("registered models:/m/1 in http://u:hunter2@mlflow:5000")
    cli.result(tracking="http://u:hunter2@mlflow:5000", ok=1)
    cli.fail("no registered model 'm' in http://u:hunter2@mlflow:5000", "ModelNotFound")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError) as e:  # Ray's own message repeats the address it was given
        jobs.client(f"http://u:hunter2@127.0.0.1:{port}")
    got = capsys.readouterr()
    text = got.out + got.err + str(e.value)
    assert "hunter2" not in text and text.count("u:***@") >= 4


def test_mlflow_params_hold_no_url_password(tmp_path):
    pytest.importorskip("mlflow")
    import mlflow

    from pretrain.run.config import load_config
    from pretrain.tracking.mlflow_runs import start_run

    cfg = load_config(None, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                             "data.corpus=https://reader:hunter2@data.lab/corpus"])
    run_id = start_run(cfg.tracking, cfg.name, cfg.to_dict(), {})
    params = mlflow.MlflowClient(cfg.tracking.uri).get_run(run_id).data.params
    assert params["data.corpus"] == "https://reader:***@data.lab/corpus"
    assert "hunter2" not in json.dumps(params)
