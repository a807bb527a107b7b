"""A real multi-node Ray cluster on this machine, joined as a user joins one.

One token-auth head (`ray start --head`, dashboard on 127.0.0.1) and worker nodes, each its own raylet started
with `ray start --address`, `--num-cpus 1`, its own `--temp-dir` and one custom resource (`mn_<name>: 1`) that
names it. Everything reaches the cluster as a user would: `python -m sweep.run --address HOST:PORT` with
RAY_AUTH_MODE=token and the token in the environment, the dashboard's HTTP API with an `Authorization: Bearer`
header. Local storage is declared shared (`--shared-storage`): every "node" is on this machine.

Which node ran a trial: Tune logs the reporting process's pid with every report (result.json). The dashboard's
state API (with the token) maps the sweep's job (found by its driver's command line) -> its actors (pid,
node id) -> the node's custom resource, and each node's own log directory holds the trial worker's core-worker
log (`python-core-worker-*_<pid>.log`); the two witnesses must agree (and a pid may name one actor only).

Cleanup: every `ray start --block` runs in a session of its own; stopping a node sends it SIGTERM, then SIGKILLs
whatever is left in that session (Ray's workers included), so no raylet outlives the module.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODE_START_TIMEOUT_S = 120
WORKERS = ("w1", "w2", "w3")  # + the head: 4 nodes of 1 CPU
# Tiny trials for the load grid: the smallest model the sweep takes, 2 steps (the sample has 64-token rows).
TINY = ["--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--ff-dim", "32", "--seq-len", "16"]
LOAD_TECHNIQUES = ("baseline", "fp32", "gradcp", "sac")
LOAD_BATCH_SIZES = tuple(range(1, 14))  # 4 x 13 = 52 trials
# The node-failure grid: long enough (200 steps) to be killed mid-run, checkpointing every 25 steps (more steps
# than result.json lags behind the trial, so the kill lands between two checkpoints).
FT_STEPS, FT_INTERVAL = 200, 25
FT_MODEL = ["--n-layers", "2", "--d-model", "128", "--n-heads", "4", "--ff-dim", "512", "--seq-len", "64"]
# The GCS notices a dead raylet in ~3 s instead of Ray's default ~30 s (what `ray start` users tune too).
FAST_HEALTH_CHECK = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                     "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}

CLIENT = """
import json, sys, time
started = time.monotonic()
from sweep.connect import ClusterError, connect
t0 = time.monotonic()
try:
    info = connect(sys.argv[1], log_to_driver=False)
except ClusterError as e:
    print(json.dumps({"error": str(e), "seconds": time.monotonic() - t0}))
    sys.exit(2)
import ray
answer = ray.get(ray.remote(lambda x: x + 1).options(num_cpus=0).remote(41))
print(json.dumps({"answer": answer, "num_nodes": info.num_nodes, "num_cpus": info.num_cpus,
                  "multi_node": info.multi_node, "auth_mode": info.auth_mode, "seconds": time.monotonic() - t0}))
"""

PREFLIGHT = """
import dataclasses, json, sys
from sweep.connect import ClusterError, connect
from sweep.preflight import check_cluster
connect(sys.argv[1], log_to_driver=False)
try:
    facts = check_cluster(sys.argv[2], timeout_s=90)
except ClusterError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print(json.dumps({node.node_id: dataclasses.asdict(f) for node, f in facts.items()}))
"""


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


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="rmn-", dir="/tmp"))  # short: Unix socket paths have a length limit
    started = time.monotonic()
    mn = Cluster(root)
    try:
        mn.start()
        print(f"\nmulti-node cluster: head + {len(WORKERS)} workers up in {time.monotonic() - started:.1f} s")
        yield mn
    finally:
        mn.stop()
        shutil.rmtree(root, ignore_errors=True)


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


# -- authentication ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_the_cluster_has_four_nodes_and_refuses_clients_without_the_token(cluster):
    """The Python client (`connect`): with the token it joins all 4 nodes; without it, or with another, it is
    refused at once with one line."""
    runs = {"token": {}, "none": {"token": None}, "wrong": {"token": secrets.token_hex(32)}}
    with ThreadPoolExecutor(3) as pool:
        done = dict(zip(runs, pool.map(
            lambda kv: run([sys.executable, "-c", CLIENT, cluster.address], cluster.client_env(kv[0], **kv[1])),
            runs.items())))
    good = json.loads(lines(done["token"][0].stdout)[-1])
    assert good["answer"] == 42 and good["num_nodes"] == 4 and good["num_cpus"] == 4.0, done["token"][0].stderr
    assert good["multi_node"] is True and good["auth_mode"] == "token"
    for case, needle in (("none", "requires an authentication token"), ("wrong", "refused this client's")):
        proc, _ = done[case]
        answer = json.loads(lines(proc.stdout)[-1])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert answer["error"].startswith(f"the cluster at {cluster.address} ") and needle in answer["error"]
        assert answer["seconds"] < 10, answer  # refused at once, not after Ray's retries
    names = sorted(cluster.node_names().values())
    assert names == ["head", *WORKERS], names


@pytest.mark.timeout(60)
def test_dashboard_http_api_needs_the_token(cluster):
    """Ray 2.60's dashboard: no token -> 401, another token -> 403, `Authorization: Bearer <token>` -> 200."""
    for path in ("/api/version", "/nodes?view=summary", "/api/v0/nodes?limit=10", "/api/jobs/"):
        assert cluster.http(path, token=None)[0] == 401, path
        assert cluster.http(path, token=secrets.token_hex(32))[0] == 403, path
        status, body = cluster.http(path)
        assert status == 200, (path, body[:300])
        json.loads(body)
    assert json.loads(cluster.http("/api/version")[1])["ray_version"] == "2.60.0"


@pytest.mark.timeout(60)
def test_metrics_ports_answer_without_the_token(cluster):
    """What docs/cluster.md's security notes say: each node's Prometheus /metrics port, and the head's dashboard and
    autoscaler ones (44227 and 44217 by default; free ports here), are not behind the token, and (node IP not
    loopback) listen on the node's IP; only the network keeps them in."""
    ip = next(n["node_ip"] for n in cluster.state("nodes") if n["state"] == "ALIVE")
    ports = [(name, port) for name, port in cluster.head_metrics.items()]
    for node in cluster.nodes.values():
        match = re.search(r"--metrics-export-port=(\d+)", " ".join(node.proc.args))
        ports.append((node.name, int(match.group(1))))
    answered = {}
    for name, port in ports:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as response:
                    answered[name] = (response.status, response.read(200).decode(errors="replace"))
                    break
            except OSError:
                time.sleep(0.5)  # the agent opens it a little after the node registers
    assert set(answered) == {name for name, _ in ports}, answered
    assert all(status == 200 for status, _ in answered.values())
    print(f"\n/metrics answered without a token on {ip} (node IP) for: {', '.join(sorted(answered))}")


# -- one-line refusals through the CLI ------------------------------------------------------------------------
def _refusal_cases(mn: Cluster, data: Path, storage: Path) -> dict[str, tuple[list[str], dict, str]]:
    closed = free_ports(1)[0]
    common = ["--storage-path", str(storage), "--device", "cpu", "--data", str(data), "--techniques", "baseline",
              "--batch-sizes", "2", "--max-steps", "2", *TINY, "--verbose", "0"]
    return {
        "closed-port": ([sys.executable, "-m", "sweep.run", "--address", f"127.0.0.1:{closed}", "--name", "c1",
                         *common], mn.client_env("cli-closed"),
                        rf"error: no Ray cluster \(GCS\) at --address 127\.0\.0\.1:{closed}: connection refused .*"),
        "ray-client-no-token": (
            [sys.executable, "-m", "sweep.run", "--address", f"ray://127.0.0.1:{mn.client_port}", "--name", "c2",
             *common], mn.client_env("cli-client", token=None),
            rf"error: the cluster at ray://127\.0\.0\.1:{mn.client_port} requires an authentication token: .*"),
        "gpu-grid-on-cpu-cluster": (
            [sys.executable, "-m", "sweep.run", "--address", mn.address, "--name", "c3", "--shared-storage",
             *common[:common.index("--device")], "--device", "cuda", "--data", str(data), "--techniques", "bf16",
             "--batch-sizes", "2", "--max-steps", "2", *TINY, "--verbose", "0"],
            mn.client_env("cli-gpu"), r"error: .*needs GPUs.* has none.*"),
        "local-storage-not-shared": (
            [sys.executable, "-m", "sweep.run", "--address", mn.address, "--name", "c4", *common],
            mn.client_env("cli-storage", MEMEFF_SHARED_STORAGE="0"),
            r"error: --storage-path .* is a path on this machine, but the cluster has 4 nodes .*--shared-storage.*"),
    }


@pytest.fixture(scope="module")
def refusals(cluster, sample_dataset, tmp_path_factory):
    storage = tmp_path_factory.mktemp("refusals")
    cases = _refusal_cases(cluster, sample_dataset, storage)
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run, args, env) for name, (args, env, _) in cases.items()}
        outcomes = {name: (*f.result(), cases[name][2]) for name, f in futures.items()}
    return outcomes, storage


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", ["closed-port", "ray-client-no-token", "gpu-grid-on-cpu-cluster",
                                  "local-storage-not-shared"])
def test_cli_refuses_with_one_line_and_exit_2(refusals, case):
    outcomes, storage = refusals
    done, seconds, pattern = outcomes[case]
    shown = lines(done.stderr)
    detail = f"{case}: exit {done.returncode} in {seconds:.1f} s\n{done.stderr[-3000:]}"
    print(f"\n{case}: exit {done.returncode} in {seconds:.1f} s (process start and imports included): {shown[-1:]}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, detail
    assert len([s for s in shown if s.startswith("error:")]) == 1 and re.fullmatch(pattern, shown[-1]), detail
    assert not [s for s in shown if "rpc_client" in s or "gcs_client" in s], detail  # Ray's C++ retry lines
    assert seconds < 30, detail  # was 44 s (closed port) and 33 s (ray:// without a token) before the probe
    assert not any(storage.rglob("result.json"))


@pytest.mark.timeout(120)
def test_unreachable_addresses_are_reported_within_the_bound(cluster):
    """connect() itself (no CLI start-up in the figure): a closed port and ray:// without a token each end in
    well under 10 s; Ray's own waits are 30-45 s."""
    closed = free_ports(1)[0]
    cases = {f"127.0.0.1:{closed}": cluster.client_env("bound-closed"),
             f"ray://127.0.0.1:{cluster.client_port}": cluster.client_env("bound-client", token=None)}
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(cases, pool.map(lambda kv: run([sys.executable, "-c", CLIENT, kv[0]], kv[1]),
                                        cases.items())))
    for address, (proc, _) in done.items():
        answer = json.loads(lines(proc.stdout)[-1])
        print(f"\nconnect({address!r}) refused in {answer['seconds']:.2f} s: {answer['error']}")
        assert proc.returncode == 2 and address in answer["error"] and answer["seconds"] < 10, answer


# -- preflight: other code or missing data on one node ----------------------------------------------------------
def _skewed_copy(dest: Path) -> Path:
    """This project's packages with one line more in one file: what another revision installed on a node is."""
    for package in ("sweep", "trainable", "data_prep", "analysis", "contract"):
        if (REPO / package).is_dir():
            shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(dest / "trainable" / "model.py", "a") as f:
        f.write("\n# a node with another revision of the project\n")
    return dest


def _can_hide_directories() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.timeout(300)
def test_preflight_names_the_node_with_other_code_and_the_node_without_the_data(cluster, sample_dataset, tmp_path):
    if not _can_hide_directories():
        pytest.skip("hiding --data from one node needs a mount namespace (root and unshare)")
    env = cluster.client_env("preflight")
    healthy, _ = run([sys.executable, "-c", PREFLIGHT, cluster.address, str(sample_dataset)], env, cwd=tmp_path)
    assert healthy.returncode == 0, healthy.stderr[-3000:]
    facts = json.loads(lines(healthy.stdout)[-1])
    assert len(facts) == 4 and len({(f["version"], f["data"]) for f in facts.values()}) == 1, facts

    # A node whose workers import another copy of the project (PYTHONPATH), and a node in a mount namespace where
    # --data's parent directory is an empty tmpfs. The driver runs outside the repository, so that Ray does not
    # put its working directory (this repository) first on every worker's sys.path.
    skew = _skewed_copy(tmp_path / "other-revision")
    try:
        with ThreadPoolExecutor(2) as pool:
            skewed, blind = pool.map(lambda kw: cluster.add_node(**kw), [
                {"name": "skew", "pythonpath": skew}, {"name": "nodata", "hide": sample_dataset.parent}])
        bad, seconds = run([sys.executable, "-c", PREFLIGHT, cluster.address, str(sample_dataset)], env, cwd=tmp_path)
        message = lines(bad.stderr)[-1] if bad.stderr.strip() else ""
        print(f"\npreflight on 6 nodes, 2 of them wrong, in {seconds:.1f} s (start-up included): {message}")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
        assert message.startswith("error: the preflight check found 2 problems: "), message
        assert re.search(rf"node \S+ \(node {skewed.node_id[:12]}\) runs memeff-sweep \S+\+code\.\w+ but the driver "
                         r"runs \S+\+code\.\w+: install the same revision on every node", message), message
        assert (f"--data {sample_dataset} does not exist on node " in message
                and f"(node {blind.node_id[:12]})" in message), message
        healthy_ids = [n.node_id[:12] for n in cluster.nodes.values() if n.name not in ("skew", "nodata")]
        assert not any(node_id in message for node_id in healthy_ids), message
        cli, _ = run(sweep_args(cluster, tmp_path / "results", "pf", sample_dataset, "--techniques", "baseline",
                                "--batch-sizes", "2", "--max-steps", "2", *TINY), env, cwd=tmp_path)
        assert cli.returncode == 2 and lines(cli.stderr)[-1] == message, cli.stderr[-3000:]
        assert not any((tmp_path / "results").rglob("result.json"))  # refused before any trial
    finally:
        for name in ("skew", "nodata"):
            if name in cluster.nodes:
                cluster.stop_node(name)


# -- placement and load: 52 trials over 4 nodes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def load_sweep(cluster, sample_dataset, tmp_path_factory):
    """The 52-trial CPU grid through the CLI, the driver under /usr/bin/time (its peak RSS)."""
    storage = tmp_path_factory.mktemp("shared")
    name = "load"
    rss = storage / "driver-rss.txt"
    args = sweep_args(cluster, storage, name, sample_dataset, "--techniques", *LOAD_TECHNIQUES, "--batch-sizes",
                      *map(str, LOAD_BATCH_SIZES), "--max-steps", "2", *TINY)
    started = time.monotonic()
    done, seconds = run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *args], cluster.client_env("load"), timeout=900)
    return {"done": done, "seconds": seconds, "path": storage / name, "name": name, "started": started,
            "rss_mib": int(rss.read_text().split()[-1]) / 1024 if rss.is_file() else None}


@pytest.mark.timeout(900)
def test_a_cpu_grid_spreads_over_the_nodes_and_lands_in_shared_storage(cluster, load_sweep):
    done, exp = load_sweep["done"], load_sweep["path"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    names = [f"{t}_bs{b}" for t in LOAD_TECHNIQUES for b in LOAD_BATCH_SIZES]
    pids = {}
    for name in names:  # every trial's results are in the shared storage path
        trial = reports(exp / name / "result.json")
        assert trial and trial[-1]["final"] is True and trial[-1]["status"] == "ok", name
        assert len({r["pid"] for r in trial}) == 1, f"{name} restarted"
        pids[name] = trial[-1]["pid"]
    placed = cluster.trial_nodes(load_sweep["name"], set(pids.values()))
    per_node: dict[str, list[str]] = {}
    for name, pid in pids.items():
        per_node.setdefault(placed[pid], []).append(name)
    print("\ntrials per node (pid -> node id via the dashboard's state API, and the node's worker logs):")
    for node in sorted(per_node):
        print(f"  {node:5s} {len(per_node[node]):2d} trials: {' '.join(sorted(per_node[node])[:6])} ...")
    assert len(per_node) >= 3, per_node

    import analysis  # reads the experiment from the shared storage, as a user's laptop would after a sync

    results = analysis.load(exp)
    assert sorted(results.trials["name"]) == sorted(names)
    assert set(results.trials["status"]) == {"ok"}
    counts = results.steps.groupby("name")["step"].apply(list)
    assert all(steps == [1, 2] for steps in counts), counts[counts.apply(lambda s: s != [1, 2])]


@pytest.mark.timeout(900)
def test_fifty_two_tiny_trials_complete_on_four_nodes(cluster, load_sweep):
    """Under load: the figures docs/cluster.md quotes (driver peak memory, Tune's time between trials)."""
    done, exp = load_sweep["done"], load_sweep["path"]
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    states = trial_states(exp)
    assert len(states) == 52 and {s["status"] for s in states.values()} == {"TERMINATED"}
    assert sum(s["num_failures"] or 0 for s in states.values()) == 0
    pid_of = {name: reports(exp / name / "result.json")[-1]["pid"] for name in states}
    node_of = cluster.trial_nodes(load_sweep["name"], set(pid_of.values()))
    # Tune's own clock for each trial: started (actor up) and last result; per node, the idle time between the
    # end of one trial and the start of the next is what Tune (and Ray) spend between trials.
    gaps, overheads = [], []
    by_node: dict[str, list[tuple[float, float]]] = {}
    for name, s in states.items():
        by_node.setdefault(node_of[pid_of[name]], []).append((s["start_time"], s["last_result_time"]))
        overheads.append(s["last_result_time"] - s["start_time"]
                         - reports(exp / name / "result.json")[-1]["time_total_s"])
    for spans in by_node.values():
        spans.sort()
        gaps += [nxt[0] - prev[1] for prev, nxt in zip(spans, spans[1:])]
    first = min(s["start_time"] for s in states.values())
    last = max(s["last_result_time"] for s in states.values())
    busy = statistics.median(s["last_result_time"] - s["start_time"] for s in states.values())
    print(f"\n52 trials on 4 nodes: CLI {load_sweep['seconds']:.0f} s, first trial start -> last result "
          f"{last - first:.0f} s; a trial's median span {busy:.1f} s; driver peak RSS {load_sweep['rss_mib']:.0f} MiB")
    print(f"time between trials on a node (previous trial's last result -> next trial running): median "
          f"{statistics.median(gaps):.1f} s, p90 {sorted(gaps)[int(0.9 * len(gaps))]:.1f} s, max {max(gaps):.1f} s "
          f"over {len(gaps)} hand-overs; Tune's bookkeeping inside a trial's span (span - time_total_s): median "
          f"{statistics.median(overheads) * 1000:.0f} ms")
    assert load_sweep["rss_mib"] is not None and load_sweep["rss_mib"] < 4096
    assert max(gaps) < 120


# -- a worker node dies mid-trial ---------------------------------------------------------------------------------
def _uninterrupted_losses(trial_dir: Path) -> list[float]:
    """The losses of the trial's own config (Tune's params.json) run in this process, without a kill."""
    import torch

    from trainable import TrialConfig, run_trial

    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    params = json.loads((trial_dir / "params.json").read_text())
    cfg = TrialConfig.from_dict({k: v for k, v in params.items() if k in fields})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray worker
    try:
        out: list[dict] = []
        run_trial(cfg, out.append)
    finally:
        torch.set_num_threads(threads)
    return [r["loss"] for r in out]


def _victim(raylets: dict[int, Node], exp: Path, names: list[str]) -> tuple[str, Node, int, int] | None:
    """A trial on a worker node that has checkpointed and run a few steps past its last checkpoint (so some steps
    are replayed after the restart): (trial, node, pid, step). `raylets`: raylet pid -> worker node."""
    for name in names:
        trial = reports(exp / name / "result.json")
        if not trial or not any((exp / name).glob("checkpoint_*")) or trial[-1]["step"] < FT_INTERVAL + 3:
            continue
        if not 2 <= trial[-1]["step"] % FT_INTERVAL <= 15:
            continue
        node = raylets.get(parent_pid(trial[-1]["pid"]))  # a Ray worker's parent is its node's raylet
        if node is not None and trial[-1]["step"] < FT_STEPS - 2 * FT_INTERVAL:
            return name, node, trial[-1]["pid"], trial[-1]["step"]
    return None


@pytest.mark.timeout(300)
def test_a_killed_worker_node_costs_only_the_steps_since_the_checkpoint(cluster, sample_dataset, tmp_path):
    storage, name = tmp_path / "shared", "nodefail"
    exp = storage / name
    names = [f"baseline_bs{b}" for b in (4, 8, 16)]
    args = sweep_args(cluster, storage, name, sample_dataset, "--techniques", "baseline", "--batch-sizes", "4", "8",
                      "16", "--max-steps", str(FT_STEPS), "--eval-interval", "0", "--checkpoint-interval",
                      str(FT_INTERVAL), "--max-failures", "2", *FT_MODEL)
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(args, env=cluster.client_env("nodefail"), cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, victim = time.monotonic() + 150, None
        raylets = {node.raylet_pid(): node for node in cluster.nodes.values() if node.name != "head"}
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            victim = _victim(raylets, exp, names)
            time.sleep(0.05)
        assert victim is not None, f"no trial to interrupt (driver {driver.poll()}):\n{log.read_text()[-3000:]}"
        trial, node, killed_pid, killed_at = victim
        os.kill(node.raylet_pid(), signal.SIGKILL)  # the node's raylet; its workers follow it
        killed_node_id = node.node_id
        driver.wait(timeout=200)
    finally:
        if driver.poll() is None:
            kill_session(driver.pid)
            driver.wait()
        if node_name := (victim[1].name if victim else None):
            cluster.stop_node(node_name)  # what is left of it
    assert driver.returncode == 0, log.read_text()[-3000:]

    history = reports(exp / trial / "result.json")
    first = [r for r in history if r["pid"] == killed_pid]
    rest = [r for r in history if r["pid"] != killed_pid]
    assert first and rest and len({r["pid"] for r in rest}) == 1, "expected exactly one restart"
    assert history == first + rest
    resumed_from = rest[0]["step"] - 1
    assert resumed_from % FT_INTERVAL == 0 and FT_INTERVAL <= resumed_from <= first[-1]["step"], \
        (f"killed at step {first[-1]['step']} (seen {killed_at}), resumed from {resumed_from}; "
         f"checkpoints: {sorted(p.name for p in (exp / trial).glob('checkpoint_*'))}")
    final_run = [r for r in first if r["step"] <= resumed_from] + rest
    assert [r["step"] for r in final_run] == list(range(1, FT_STEPS + 1))
    assert final_run[-1]["final"] is True and final_run[-1]["status"] == "ok"
    # The restart ran on another node, which is alive; the killed node is dead.
    nodes_now = {n["node_id"]: n["state"] for n in cluster.state("nodes")}
    assert nodes_now[killed_node_id] == "DEAD"
    placed = cluster.trial_nodes(name, {killed_pid, rest[0]["pid"]})
    assert placed[killed_pid] == node.name and placed[rest[0]["pid"]] != node.name
    # The other trials never noticed: one process each, every step once, no failure.
    states = trial_states(exp)
    assert states[trial]["num_failures"] == 1 and states[trial]["status"] == "TERMINATED"
    for other in set(names) - {trial}:
        steps = reports(exp / other / "result.json")
        assert len({r["pid"] for r in steps}) == 1 and states[other]["num_failures"] == 0, other
        assert [r["step"] for r in steps] == list(range(1, FT_STEPS + 1)) and steps[-1]["status"] == "ok", other

    # Same numbers as a run nobody interrupted (model, optimizer, scheduler, data position, RNG restored).
    reference = _uninterrupted_losses(exp / trial)
    losses = [r["loss"] for r in final_run]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    print(f"\nnode {node.name} (raylet SIGKILL) died under {trial} at step {first[-1]['step']} (seen at {killed_at});"
          f" the trial resumed from step {resumed_from} on node {placed[rest[0]['pid']]}: "
          f"{first[-1]['step'] - resumed_from} steps were run twice; max relative loss difference to the "
          f"uninterrupted run {worst:.1e}")
    assert first[-1]["step"] > resumed_from  # steps were replayed: the de-duplication below has work to do
    assert losses == pytest.approx(reference, rel=1e-6, abs=1e-7)

    # What the user reads: each step once per trial (analysis keeps the resumed run's report of a replayed step).
    import analysis

    steps = analysis.load(exp).steps
    dupes = steps[steps.duplicated(subset=["name", "step"], keep=False)]
    assert dupes.empty, f"ANALYSIS KEEPS REPLAYED STEPS TWICE:\n{dupes[['name', 'step', 'loss']]}"
    mine = steps[steps["name"] == trial].sort_values("step")
    assert list(mine["step"]) == list(range(1, FT_STEPS + 1))
    assert list(mine["loss"]) == pytest.approx(losses, rel=1e-9)


# -- the driver and the head die; the sweep resumes on a new cluster ------------------------------------------------
@pytest.mark.timeout(400)
def test_driver_and_head_killed_then_resume_on_a_restarted_cluster(cluster, sample_dataset, tmp_path):
    storage, name = tmp_path / "shared", "headloss"
    exp = storage / name
    grid = ["--techniques", "baseline", "--batch-sizes", "2", "4", "8", "16", "--max-concurrent", "2",
            "--max-steps", "40", "--eval-interval", "0", "--checkpoint-interval", str(FT_INTERVAL),
            "--n-layers", "1", "--d-model", "32", "--n-heads", "2", "--ff-dim", "64", "--seq-len", "32"]
    env = {**cluster.client_env("headloss"), "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(sweep_args(cluster, storage, name, sample_dataset, *grid), env=env, cwd=REPO,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            if "TERMINATED" in {s["status"] for s in trial_states(exp).values()} and _finished(exp):
                break
            time.sleep(0.1)
        assert driver.poll() is None, f"the sweep ended before it could be interrupted:\n{log.read_text()[-3000:]}"
    finally:
        kill_session(driver.pid)  # the driver (SIGKILL) ...
        driver.wait()
        cluster.kill_all()  # ... and every node, head included (SIGKILL)
    kept = _finished(exp)
    assert kept and len(kept) < 4, kept

    cluster.start()  # a new cluster: new ports, new node ids; the storage path is all that survives
    resumed, seconds = run(sweep_args(cluster, storage, name, sample_dataset, *grid, "--resume"), env, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    names = [f"baseline_bs{b}" for b in (2, 4, 8, 16)]
    states = trial_states(exp)
    assert {n: s["status"] for n, s in states.items()} == {n: "TERMINATED" for n in names}
    for trial, before in kept.items():
        assert (exp / trial / "result.json").read_bytes() == before, f"{trial} ran again"
    assert set(_finished(exp)) == set(names)

    import analysis

    results = analysis.load(exp)
    assert sorted(results.trials["name"]) == sorted(names) and set(results.trials["status"]) == {"ok"}
    steps = results.steps
    assert not steps.duplicated(subset=["name", "step"]).any(), "ANALYSIS KEEPS REPLAYED STEPS TWICE"
    assert all(list(g["step"]) == list(range(1, 41)) for _, g in steps.sort_values("step").groupby("name"))
    print(f"\ndriver and head SIGKILLed with {len(kept)} of 4 trials finished; --resume on a new cluster took "
          f"{seconds:.0f} s and re-ran none of them")


def _finished(exp: Path) -> dict[str, bytes]:
    """Trials whose result.json holds their final report, with that file's bytes."""
    done = {}
    for result in exp.glob("*/result.json"):
        text = result.read_bytes()
        if b'"final": true' in text:
            done[result.parent.name] = text
    return done
