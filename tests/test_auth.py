"""Token authentication for real: a local `ray start --head` with RAY_AUTH_MODE=token, joined by clients
with the token, with a wrong one and with none, each in its own process (one Ray cluster per process; the
session `ray_local` fixture keeps running in the test process)."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sweep.connect import ClusterError, ClusterInfo, StorageError, check_storage, connect

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60

CLIENT = """
import json, sys
import ray
from sweep.connect import ClusterError, connect
try:
    info = connect(sys.argv[1], log_to_driver=False)
except ClusterError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
answer = ray.get(ray.remote(lambda x: x + 1).options(num_cpus=1).remote(41))
print(json.dumps({"answer": answer, "num_nodes": info.num_nodes, "num_cpus": info.num_cpus,
                  "multi_node": info.multi_node, "auth_mode": info.auth_mode}))
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any Ray address or auth setting, HOME pointing at `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), **extra)
    home.mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture(scope="module")
def token_cluster():
    """A single-node Ray head on loopback that requires a token; stopped by process group, never `ray stop`
    (which would kill every Ray on the machine). Its tests are `slow` (tests/conftest.py: STARTS_RAY)."""
    root = Path(tempfile.mkdtemp(prefix="rauth", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    gcs, client, dash, agent = _free_ports(4)
    env = _clean_env(root / "head-home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=2", "--num-gpus=0", f"--temp-dir={root / 'ray'}", "--include-dashboard=false",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
        env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        _wait_started(head)
        yield {"address": f"127.0.0.1:{gcs}", "token": token, "root": root}
    finally:
        _stop_group(head)
        shutil.rmtree(root, ignore_errors=True)


def _wait_started(head: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    seen = []
    for line in head.stdout:  # `ray start --block` prints this once the node is up, then blocks
        seen.append(line)
        if "Ray runtime started" in line:
            return
        if time.monotonic() > deadline:
            break
    raise RuntimeError("ray start --head did not come up:\n" + "".join(seen[-30:]))


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (it stops the node's processes), then SIGKILL its process group (ours alone)
    to sweep up whatever outlives a short grace."""
    try:
        head.terminate()
        head.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=5)


def _run_client(cluster: dict, name: str, *, timeout: int = 60, **auth_env: str) -> subprocess.CompletedProcess:
    env = _clean_env(cluster["root"] / f"{name}-home", **auth_env)
    return subprocess.run(
        [sys.executable, "-c", CLIENT, cluster["address"]],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def test_client_with_token_joins_and_runs_a_task(token_cluster):
    done = _run_client(token_cluster, "good", RAY_AUTH_TOKEN=token_cluster["token"])
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info == {"answer": 42, "num_nodes": 1, "num_cpus": 2.0, "multi_node": False, "auth_mode": "token"}


def test_client_with_token_file_joins(token_cluster):
    token_file = token_cluster["root"] / "token-file"
    token_file.write_text(token_cluster["token"])
    token_file.chmod(0o600)
    done = _run_client(token_cluster, "file", RAY_AUTH_TOKEN_PATH=str(token_file))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["answer"] == 42


def test_client_without_token_is_refused_with_one_clear_line(token_cluster):
    started = time.monotonic()
    done = _run_client(token_cluster, "none")
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("the cluster at ")
    assert "requires an authentication token: set RAY_AUTH_TOKEN" in last
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 15  # refused at once, not after Ray's connection retries


def test_client_with_wrong_token_is_refused(token_cluster):
    done = _run_client(token_cluster, "wrong", RAY_AUTH_TOKEN=secrets.token_hex(32))
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "refused this client's authentication token" in last
    assert "Traceback" not in done.stderr


def _token_file(home: Path, token: str, mode: int) -> Path:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    path.chmod(mode)
    return path


def test_client_warns_once_when_its_token_file_is_readable_by_others(token_cluster):
    """Ray itself writes ~/.ray/auth_token 0644; connect() says so, in one line, and still joins."""
    home = token_cluster["root"] / "loose-home"
    path = _token_file(home, token_cluster["token"], 0o644)
    done = _run_client(token_cluster, "loose")  # no RAY_AUTH_TOKEN: Ray reads ~/.ray/auth_token
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["answer"] == 42
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: the Ray token file {path} is readable by group/others (mode 0644): "
                        f"chmod 600 {path}"], done.stderr


def test_client_with_an_owner_only_token_file_does_not_warn(token_cluster):
    home = token_cluster["root"] / "tight-home"
    _token_file(home, token_cluster["token"], 0o600)
    done = _run_client(token_cluster, "tight")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning:" not in done.stderr


@pytest.mark.slow  # three subprocesses
def test_generate_token_writes_an_owner_only_file_and_never_overwrites(tmp_path):
    """`python -m sweep.connect --generate-token` (docs/cluster.md, step 2): 0600 under any umask, in a 0700 dir."""
    env = _clean_env(tmp_path / "home")
    command = [sys.executable, "-c", "import os, sys; os.umask(0o022); from sweep.auth import main; "
               "sys.exit(main(sys.argv[1:]))", "--generate-token"]
    first = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    path = tmp_path / "home" / ".ray" / "auth_token"
    assert first.returncode == 0 and first.stdout.strip() == str(path), first.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {path} already exists (delete it first to rotate the token)"]
    assert path.read_text() == token
    custom = tmp_path / "elsewhere" / "token"
    third = subprocess.run([*command, "--token-path", str(custom)], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 0 and stat.S_IMODE(custom.stat().st_mode) == 0o600, third.stderr


@pytest.mark.slow
def test_a_local_instance_gets_an_owner_only_token(tmp_path):
    """Ray 2.60 turns token auth on for a local instance and would write its new token 0644; connect() writes
    it first, 0600, and Ray uses that one."""
    env = _clean_env(tmp_path / "home")
    script = ("from sweep.connect import connect; info = connect(None, num_cpus=1, include_dashboard=False, "
              "log_to_driver=False); print(info.auth_mode)")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180, start_new_session=True)
    assert done.returncode == 0, done.stderr[-2000:]
    path = tmp_path / "home" / ".ray" / "auth_token"
    assert done.stdout.strip().splitlines()[-1] == "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "warning: the Ray token file" not in done.stderr


@pytest.mark.slow
def test_sweep_cli_runs_on_the_token_cluster(token_cluster, request, tmp_path):
    """A tiny CPU sweep through `python -m sweep.run --address` on the authenticated cluster."""
    sample_dataset = request.getfixturevalue("sample_dataset")  # only once the CLI exists
    # The token and RAY_AUTH_MODE=token, as docs/cluster.md tells users to export them.
    env = _clean_env(token_cluster["root"] / "sweep-home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token_cluster["token"])
    storage = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "sweep.run", "--address", token_cluster["address"], "--storage-path", str(storage),
         "--name", "auth_smoke", "--data", str(sample_dataset), "--device", "cpu", "--preset", "cpu",
         "--techniques", "baseline", "--batch-sizes", "2", "--max-steps", "2", "--n-layers", "1",
         "--d-model", "32", "--n-heads", "2", "--ff-dim", "64", "--seq-len", "64", "--cpus-per-trial", "1"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert any((storage / "auth_smoke").rglob("result.json")), "no trial wrote results"


def test_connect_reuses_the_running_session(ray_local):
    info = connect(None)
    assert (info.num_nodes, info.num_cpus, info.multi_node) == (1, 2.0, False)
    assert info.address == ray_local.get_runtime_context().gcs_address


def test_resources_of_a_cluster_are_not_set_by_the_client():
    with pytest.raises(ClusterError, match="size a local Ray instance only"):
        connect("10.0.0.1:6379", num_gpus=1)


# check_storage: pure rules, no cluster needed.
SINGLE = ClusterInfo("127.0.0.1:6379", True, 1, 2.0, 0.0, can_autoscale=False, auth_mode="token")
MULTI = ClusterInfo("10.0.0.1:6379", False, 3, 24.0, 2.0, can_autoscale=False, auth_mode="token")
AUTOSCALING = ClusterInfo("10.0.0.1:6379", False, 1, 8.0, 0.0, can_autoscale=True, auth_mode="token")


@pytest.mark.parametrize("uri", ["s3://bucket/memeff", "gs://bucket/memeff"])
def test_remote_storage_is_fine_everywhere(uri):
    for info in (SINGLE, MULTI, AUTOSCALING):
        assert check_storage(uri, info) == uri


def test_local_storage_single_node_is_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_storage("results", SINGLE) == str(tmp_path / "results")
    assert check_storage(f"file://{tmp_path}/r", SINGLE) == str(tmp_path / "r")


@pytest.mark.parametrize("info", [MULTI, AUTOSCALING], ids=["3-nodes", "autoscaling"])
def test_local_storage_on_multi_node_needs_a_declaration(info, tmp_path, monkeypatch):
    monkeypatch.delenv("MEMEFF_SHARED_STORAGE", raising=False)
    with pytest.raises(StorageError, match=r"s3://.*--shared-storage"):
        check_storage(str(tmp_path), info)
    assert check_storage(str(tmp_path), info, shared=True) == str(tmp_path)
    monkeypatch.setenv("MEMEFF_SHARED_STORAGE", "1")
    assert check_storage(str(tmp_path), info) == str(tmp_path)
    assert issubclass(StorageError, ValueError)


def test_unknown_scheme_is_rejected():
    with pytest.raises(StorageError, match="unsupported scheme"):
        check_storage("ftp://host/x", SINGLE)
