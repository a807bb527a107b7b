"""Checks against the connected cluster before any trial is scheduled: every alive node runs the driver's code
and sees the driver's `--data`.

A node with other code (another revision, a stale install) measures something else, and a node without the
prepared dataset fails each trial it is given; either is found only after GPU time was spent. One tiny Ray task
per alive node, pinned to it (NodeAffinitySchedulingStrategy, no CPU asked so a busy node still answers), reports
the node's project version and its view of `--data`; the driver compares them with its own:

    check_cluster(plan.data_dir)   # after connect(); raises PreflightError, one line naming the node(s)

The version is the distribution's version plus a hash of the source files of the project's packages as that
node imports them, so two installs of the same revision agree however they were installed (git, wheel, editable)
and any edited file disagrees. The data view is the sha256 of `manifest.json`, which records every shard's
sha256. Nodes the autoscaler adds later are not seen here (the check covers the nodes alive when it runs).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from .connect import ClusterError

DISTRIBUTION = "memeff-sweep"
PROJECT_PACKAGES = ("sweep", "trainable", "data_prep", "analysis", "contract")
"""Top-level packages whose source makes up the project's version (one not installed counts as "missing")."""

PREFLIGHT_TIMEOUT_S = 60.0
"""Longest wait for every node's answer: a worker process start plus importing the project, on a busy node."""

MAX_PROBLEMS_SHOWN = 3


class PreflightError(ClusterError):
    """A node differs from the driver (code or data), or did not answer; the message is one line."""


@dataclass(frozen=True)
class NodeFacts:
    """What one node reports about itself."""

    version: str  # "0.1.0+code.1a2b3c4d5e6f"
    data: str  # "sha256:<manifest hash>", "missing directory" or "no manifest.json"
    hostname: str
    pid: int


def code_fingerprint(packages: tuple[str, ...] = PROJECT_PACKAGES) -> str:
    """sha256 over the relative path and bytes of every .py file of each package, as this process finds them.

    Located with importlib.util.find_spec, so no package is imported (importing `trainable` imports torch).
    """
    digest = hashlib.sha256()
    for name in packages:
        spec = importlib.util.find_spec(name)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        digest.update(f"package {name} {'found' if roots else 'missing'}\n".encode())
        for root in roots:
            for path in sorted(Path(root).rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                digest.update(f"{name}/{path.relative_to(root).as_posix()}\n".encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def project_version() -> str:
    """The installed distribution's version + the code fingerprint: equal exactly when the code is."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        release = "unreleased"
    return f"{release}+code.{code_fingerprint()[:12]}"


def data_fingerprint(data_dir: str) -> str:
    """This node's view of the prepared dataset at `data_dir`."""
    root = Path(data_dir)
    if not root.is_dir():
        return "missing directory"
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json"
    return "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()


def node_facts(data_dir: str) -> dict:
    """The preflight task's body, run on every node (a plain dict: no class of ours crosses the wire)."""
    return asdict(NodeFacts(version=project_version(), data=data_fingerprint(data_dir),
                            hostname=socket.gethostname(), pid=os.getpid()))


@dataclass(frozen=True)
class NodeRef:
    """An alive node as the GCS names it: its id and IP (several nodes may share a machine, hence the id)."""

    node_id: str
    ip: str

    @property
    def label(self) -> str:
        return f"{self.ip} (node {self.node_id[:12]})"


def alive_nodes() -> list[NodeRef]:
    """The alive nodes of the cluster this process is connected to."""
    import ray

    return [NodeRef(n["NodeID"], n.get("NodeManagerAddress", "?")) for n in ray.nodes() if n.get("Alive")]


def gather(data_dir: str, nodes: list[NodeRef], timeout_s: float = PREFLIGHT_TIMEOUT_S) -> dict[NodeRef, NodeFacts]:
    """Run `node_facts` once on each node, all at once; PreflightError if a node fails or is late."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(node_facts)
    pending = {
        task.options(name="memeff-preflight",
                     scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(data_dir): node
        for node in nodes
    }
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    if late:
        names = ", ".join(pending[ref].label for ref in late)
        raise PreflightError(f"node {names} did not answer the preflight check within {timeout_s:.0f} s "
                             "(a worker process could not start there: see `ray status` and that node's logs)")
    facts: dict[NodeRef, NodeFacts] = {}
    for ref in ready:
        try:
            facts[pending[ref]] = NodeFacts(**ray.get(ref))
        except ray.exceptions.RayError as e:
            raise PreflightError(f"node {pending[ref].label} cannot run this project's code: {_cause(e)} "
                                 f"(install {DISTRIBUTION} at the driver's revision on every node)") from None
    return facts


def problems(data_dir: str, mine: NodeFacts, facts: dict[NodeRef, NodeFacts]) -> list[str]:
    """Every way a node differs from the driver, code first (a node with other code may read data otherwise)."""
    found = [f"node {node.label} runs {DISTRIBUTION} {f.version} but the driver runs {mine.version}: install "
             "the same revision on every node"
             for node, f in facts.items() if f.version != mine.version]
    for node, f in facts.items():
        if f.data == mine.data:
            continue
        if f.data == "missing directory":
            found.append(f"--data {data_dir} does not exist on node {node.label}: every node needs the prepared "
                         "dataset at the same path (prepare or sync it there, or use a volume every node mounts)")
        elif f.data == "no manifest.json":
            found.append(f"--data {data_dir} on node {node.label} is not a prepared dataset (no manifest.json)")
        else:
            found.append(f"--data {data_dir} on node {node.label} is not the driver's dataset (its manifest.json "
                         "differs): prepare it from the same input and seed, or copy the driver's")
    return found


def check_cluster(data_dir: str, *, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> dict[NodeRef, NodeFacts]:
    """Every alive node runs the driver's code and sees the driver's dataset, or PreflightError (one line).

    Call after `connect()` and before Tune schedules a trial; returns what each node reported.
    """
    mine = NodeFacts(**node_facts(data_dir))
    facts = gather(data_dir, alive_nodes(), timeout_s)
    found = problems(data_dir, mine, facts)
    if len(found) == 1:
        raise PreflightError(found[0])
    if found:
        shown = "; ".join(found[:MAX_PROBLEMS_SHOWN])
        more = f"; and {len(found) - MAX_PROBLEMS_SHOWN} more" if len(found) > MAX_PROBLEMS_SHOWN else ""
        raise PreflightError(f"the preflight check found {len(found)} problems: {shown}{more}")
    return facts


def _cause(error: BaseException) -> str:
    """The underlying exception of a Ray task error, as one line ("ModuleNotFoundError: No module named ...")."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        error = cause
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if text.startswith(type(error).__name__) else f"{type(error).__name__}: {text}"
