"""A real multi-node Ray cluster on this machine (tests/multinode_cluster.py), joined as a user joins one:
clients and the dashboard without the token refused, the metrics ports, one-line refusals through the CLI, the
preflight naming a node with other code or without the data, and a 52-trial CPU grid spread over the 4 nodes
into shared storage. Node failures are tests/test_multinode_faults.py, on the same cluster.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from multinode_cluster import (  # noqa: F401  (cluster: the fixture)
    REPO, WORKERS, Cluster, cluster, free_ports, lines, reports, run, sweep_args, trial_states,
)

pytestmark = pytest.mark.slow

# Tiny trials for the load grid: the smallest model the sweep takes, 2 steps (the sample has 64-token rows).
TINY = ["--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--ff-dim", "32", "--seq-len", "16"]
LOAD_TECHNIQUES = ("baseline", "fp32", "gradcp", "sac")
LOAD_BATCH_SIZES = tuple(range(1, 14))  # 4 x 13 = 52 trials

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
