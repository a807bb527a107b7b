"""The multi-node Ray cluster tests/test_multinode.py and tests/test_multinode_faults.py run on, on this machine,
joined as a user joins one (imported by them; no tests here).

One token-auth head (`ray start --head`, dashboard on 127.0.0.1) and worker nodes, each its own raylet started
with `ray start --address`, `--num-cpus 1`, its own `--temp-dir` and one custom resource (`mn_<name>: 1`) that
names it. Everything reaches the cluster as a user would: `python -m sweep.run --address HOST:PORT` with
RAY_AUTH_MODE=token and the token in the environment, the dashboard's HTTP API with an `Authorization: Bearer`
header. Local storage is declared shared (`--shared-storage`): every "node" is on this machine.

Which node ran a trial: Tune logs the reporting process's pid with every report (result.json). The dashboard's
state API (with the token) maps the sweep's job (found by its driver's command line) -> its actors (pid,
node id) -> the node's custom resource, and each node's own log directory holds the trial worker's core-worker
log (`python-core-worker-*_<pid>.log`); the two witnesses must agree (and a pid may name one actor only).

One cluster serves both modules (`Shared`, held by tests/conftest.py's `multinode`): started by the first test
that asks for it, stopped once the run moves past the last one. The fault tests run last and leave it whole: the
worker-node kill comes before the test that kills every node and starts the cluster again.

Cleanup: every `ray start --block` runs in a session of its own; stopping a node sends it SIGTERM, then SIGKILLs
whatever is left in that session (Ray's workers included), so no raylet outlives the cluster.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODE_START_TIMEOUT_S = 120
WORKERS = ("w1", "w2", "w3")  # + the head: 4 nodes of 1 CPU
# The GCS notices a dead raylet in ~3 s instead of Ray's default ~30 s (what `ray start` users tune too).
FAST_HEALTH_CHECK = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                     "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


# -- the cluster ------------------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(width: int = 40) -> tuple[int, int]:
    """A run of `width` free ports for one node's workers (each raylet hands out its own range)."""
    for base in range(20000 + secrets.randbelow(30000), 65000, 97):
        socks = []
        try:
            for port in range(base, base + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("", port))
            return base, base + width - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (a `ray start` we started with start_new_session=True)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session ...
            pids.append(int(stat.parent.name))
    return pids


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


@dataclasses.dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    temp_dir: Path
    node_id: str = ""

    @property
    def resource(self) -> str:
        return f"mn_{self.name}"

    def raylet_pid(self) -> int:
        for pid in session_pids(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        raise AssertionError(f"node {self.name} has no raylet")


class Cluster:
    """A head and worker nodes on this machine, all requiring the same token."""

    def __init__(self, root: Path):
        self.root = root
        self.token = secrets.token_hex(32)
        self.nodes: dict[str, Node] = {}
        self.gcs_port = self.dashboard_port = self.client_port = 0
        self.head_metrics: dict[str, int] = {}  # the head's fixed-by-default Prometheus ports, made free ones here
        self.generation = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def base_env(self, home: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        home.mkdir(parents=True, exist_ok=True)
        env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), **extra)
        return env

    def client_env(self, name: str, *, token: str | None = "cluster", **extra: str) -> dict[str, str]:
        """A user's shell: RAY_AUTH_MODE=token and the token exported (docs/cluster.md), or no token at all."""
        auth = {} if token is None else {"RAY_AUTH_MODE": "token",
                                         "RAY_AUTH_TOKEN": self.token if token == "cluster" else token}
        return self.base_env(self.root / f"home-{name}", **auth, **extra)

    def start(self, workers: tuple[str, ...] = WORKERS) -> None:
        self.generation += 1
        self.gcs_port, self.dashboard_port, self.client_port, dashboard_metrics, autoscaler_metrics = free_ports(5)
        self.head_metrics = {"DASHBOARD_METRIC_PORT": dashboard_metrics, "AUTOSCALER_METRIC_PORT": autoscaler_metrics}
        self.add_node("head", head=True)
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda name: self.add_node(name), workers))

    def add_node(self, name: str, *, head: bool = False, pythonpath: Path | None = None,
                 hide: Path | None = None, attempts: int = 2) -> Node:
        """Start one node and wait until the GCS lists it. `hide`: mount an empty tmpfs over that directory in
        a mount namespace of the node's own, so its processes (and only they) do not see what is there.

        A port found free can be taken by another process before the node binds it (other Ray instances run on
        this machine too): a node that fails to start is started once more on new ports."""
        for attempt in range(attempts):
            try:
                return self._start_node(name, head=head, pythonpath=pythonpath, hide=hide, attempt=attempt)
            except RuntimeError:
                if name in self.nodes:
                    self.stop_node(name)
                if attempt == attempts - 1:
                    raise
                if head:
                    self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        raise AssertionError("unreachable")

    def _start_node(self, name: str, *, head: bool, pythonpath: Path | None, hide: Path | None,
                    attempt: int) -> Node:
        temp_dir = self.root / f"g{self.generation}-{name}" if not attempt else self.root / f"g{self.generation}r-{name}"
        ports = dict(zip(("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                          "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"),
                         free_ports(6)))
        low, high = free_port_range()
        args = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                f"--resources={json.dumps({f'mn_{name}': 1})}", f"--temp-dir={temp_dir}",
                "--object-store-memory=100000000", f"--min-worker-port={low}", f"--max-worker-port={high}",
                "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())]
        if head:
            args += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}"]
        else:
            args += [f"--address={self.address}"]
        if hide is not None:  # unshare -> sh -> exec ray: the node's processes live in the new mount namespace
            mount = f"mount -t tmpfs -o size=1m memeff-hidden {hide} && exec \"$@\""
            args = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", *args]
        head_env = {**FAST_HEALTH_CHECK, **{k: str(v) for k, v in self.head_metrics.items()}} if head else {}
        env = self.base_env(self.root / f"home-node-{name}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                            **head_env)
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        log = temp_dir.with_suffix(".log")
        with open(log, "w") as out:
            proc = subprocess.Popen(args, env=env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = Node(name, proc, log, temp_dir)
        self.nodes[name] = node
        self._wait_started(node)
        node.node_id = self._wait_registered(node)
        return node

    def _wait_started(self, node: Node) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = node.log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return
            if node.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"node {node.name} did not start:\n{node.log.read_text(errors='replace')[-3000:]}")

    def _wait_registered(self, node: Node) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                for n in self.state("nodes"):
                    if n["state"] == "ALIVE" and node.resource in n["resources_total"]:
                        return n["node_id"]
            except (OSError, KeyError, ValueError):
                pass  # the dashboard is still starting
            time.sleep(0.3)
        raise RuntimeError(f"node {node.name} never showed up in the dashboard's node list")

    def stop_node(self, name: str) -> None:
        """SIGTERM `ray start --block` (it stops its node), then SIGKILL what is left of its session."""
        node = self.nodes.pop(name)
        if node.proc.poll() is None:
            node.proc.terminate()
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        kill_session(node.proc.pid)
        node.proc.wait(timeout=10)

    def kill_all(self) -> None:
        """SIGKILL every process of every node at once: the machine the head ran on is gone."""
        for node in self.nodes.values():
            kill_session(node.proc.pid)
        for node in self.nodes.values():
            node.proc.wait(timeout=10)
        self.nodes.clear()

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            self.stop_node(name)

    # -- the dashboard's HTTP API, as a user's tools call it -------------------------------------------------
    def http(self, path: str, token: str | None = "cluster") -> tuple[int, str]:
        request = urllib.request.Request(self.dashboard + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {self.token if token == 'cluster' else token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def state(self, kind: str, **filters: str) -> list[dict]:
        """The state API's list of nodes / actors (dead ones included), with the token."""
        query = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        status, body = self.http(f"/api/v0/{kind}?limit=10000&detail=1{query}")
        if status != 200:
            raise ValueError(f"/api/v0/{kind}: HTTP {status}: {body[:200]}")
        return json.loads(body)["data"]["result"]["result"]

    def node_names(self) -> dict[str, str]:
        """node id -> node name (the custom resource each node was started with), dead nodes included."""
        names = {}
        for n in self.state("nodes"):
            for resource in n["resources_total"]:
                if resource.startswith("mn_"):
                    names[n["node_id"]] = resource[3:]
        return names

    def trial_nodes(self, experiment: str, pids: set[int]) -> dict[int, str]:
        """pid -> name of the node the trial process ran on, from two witnesses that must agree."""
        jobs = [j for j in json.loads(self.http("/api/jobs/")[1])
                if f"--name {experiment} " in f"{j.get('entrypoint', '')} "]
        assert len(jobs) >= 1, f"no job of experiment {experiment}"
        names = self.node_names()
        by_pid: dict[int, list[str]] = {}
        for job in jobs:
            for actor in self.state("actors", job_id=job["job_id"]):
                if actor["class_name"] == "ImplicitFunc" and actor.get("pid"):
                    by_pid.setdefault(int(actor["pid"]), []).append(names.get(actor["node_id"], "?"))
        placed = {}
        for pid in pids:
            assert len(by_pid.get(pid, [])) == 1, f"pid {pid}: actors {by_pid.get(pid)} (a pid reused?)"
            placed[pid] = by_pid[pid][0]
            in_logs = sorted({p.parts[len(self.root.parts)].split("-", 1)[1]
                              for p in self.root.glob(f"g*-*/session_*/logs/python-core-worker-*_{pid}.log")})
            assert in_logs == [placed[pid]], f"pid {pid}: state API says {placed[pid]}, worker logs {in_logs}"
        return placed


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Shared:
    """The one cluster of the session's multi-node tests: started on first use (again, if it was stopped)."""

    def __init__(self):
        self.cluster: Cluster | None = None

    def ensure(self) -> Cluster:
        if self.cluster is None:
            root = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))  # short: Unix socket paths have a length limit
            started = time.monotonic()
            mn = Cluster(root)
            try:
                mn.start()
            except BaseException:
                mn.stop()
                shutil.rmtree(root, ignore_errors=True)
                raise
            print(f"\nmulti-node cluster: head + {len(WORKERS)} workers up in {time.monotonic() - started:.1f} s")
            self.cluster = mn
        return self.cluster

    def stop(self) -> None:
        if self.cluster is not None:
            mn, self.cluster = self.cluster, None
            try:
                mn.stop()
            finally:
                shutil.rmtree(mn.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(multinode) -> Cluster:
    """The session's multi-node cluster (tests/conftest.py's `multinode` holds it; it is started on first use)."""
    return multinode.ensure()


# -- running the CLI as a user ---------------------------------------------------------------------------------
def sweep_args(mn: Cluster, storage: Path, name: str, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sweep.run", "--address", mn.address, "--storage-path", str(storage),
            "--shared-storage", "--name", name, "--device", "cpu", "--data", str(data), "--verbose", "0", *extra]


def run(args: list[str], env: dict, *, timeout: float = 120, cwd: Path = REPO) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def reports(result_json: Path) -> list[dict]:
    """A trial's reports as Tune logged them (a line caught mid-write is left out)."""
    out = []
    if result_json.is_file():
        for line in result_json.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def trial_states(exp: Path) -> dict[str, dict]:
    """Trial name -> {status, start_time, last_result_time, num_failures} from Tune's newest experiment state."""
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return {}
    out = {}
    for trial_json, meta in data.get("trial_data", []):
        trial, meta = json.loads(trial_json), json.loads(meta) if isinstance(meta, str) else meta
        out[trial["relative_logdir"]] = {"status": trial["status"], **{k: meta.get(k) for k in (
            "start_time", "last_result_time", "num_failures")}}
    return out

