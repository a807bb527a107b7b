"""cluster.yaml passes Ray's own launcher validation and keeps its security properties; k8s/ is well formed."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
K8S = REPO / "k8s"
RAY_PORTS = {6379, 8265, 10001}
WORLD = {"0.0.0.0/0", "::/0"}
GPU_FAMILIES = ("g4", "g5", "g6", "p3", "p4", "p5", "p6")


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` checks before touching AWS: Ray's JSON schema and cross-field rules, on the file as written
    and after Ray merges its AWS defaults."""
    validate_config(config)
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def _uncommented(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def ray_start_commands(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return prepared(load_cluster())


def test_cluster_yaml_passes_rays_validator(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["head_node_type"] in cluster["available_node_types"]


@pytest.mark.parametrize(
    "typo",
    [
        lambda c: c.__setitem__("max_worker", c.pop("max_workers")),  # misspelt top-level key
        lambda c: c["available_node_types"]["gpu_l40s"].__setitem__("resources", {"GPU": "one"}),
        lambda c: c["available_node_types"]["gpu_l40s"].pop("node_config"),
        lambda c: c.__setitem__("head_node_type", "head"),  # not a declared node type
        lambda c: c.__setitem__("setup_commands", "pip install x"),  # a string, not a list
        lambda c: c["available_node_types"]["gpu_l40s"].__setitem__("min_worker", 0),  # misspelt node-type key
    ],
    ids=["top-level-key", "resource-type", "missing-node-config", "unknown-head-type", "commands-not-list",
         "node-type-key"],
)
def test_a_typo_fails_validation(typo):
    config = load_cluster()
    typo(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        prepared(config)


def test_head_is_cpu_only_and_workers_have_one_recent_gpu(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers
    for t in workers.values():
        assert t["resources"]["GPU"] == 1  # one trial per node
        assert t["node_config"]["InstanceType"].startswith(("g6e", "g6", "p5", "p6"))
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"]


def security_problems(raw: dict) -> list[str]:
    """Why a cluster config would expose Ray: open ingress, a node without token auth, a public dashboard."""
    problems = []
    for rule in raw["provider"].get("security_group", {}).get("IpPermissions", []):
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        cidrs = {r["CidrIp"] for r in rule.get("IpRanges", [])} | {r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])}
        if ports != {22} or cidrs & WORLD:
            problems.append(f"ingress rule {rule}")
    for name, node_type in raw["available_node_types"].items():
        if not node_type["node_config"].get("SecurityGroupIds"):  # Ray's own group opens SSH to 0.0.0.0/0
            problems.append(f"{name}: no SecurityGroupIds")
    config = prepared(raw)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = ray_start_commands(config[key])
        if not starts:
            problems.append(f"{key}: no ray start")
        problems += [f"{key}: no token auth: {c}" for c in starts if not re.search(r"\bRAY_AUTH_MODE=token ray start\b", c)]
    if config["file_mounts"].get("~/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("the token file is not copied to the nodes")
    for command in ray_start_commands(config["head_start_ray_commands"]):
        args = shlex.split(command.replace(";", " "))
        hosts = [a.split("=", 1)[1] for a in args if a.startswith("--dashboard-host=")]
        if hosts not in (["127.0.0.1"], ["localhost"]):
            problems.append(f"dashboard host {hosts or 'default'}")
    return problems


def test_cluster_yaml_is_locked_down():
    assert security_problems(load_cluster()) == []
    assert not any(cidr in _uncommented(CLUSTER_YAML) for cidr in WORLD)
    setup = "\n".join(load_cluster()["setup_commands"])
    assert "export RAY_AUTH_MODE=token" in setup  # interactive shells (ray attach; ray status) too


def _ingress(port: int, cidr: str):
    rule = {"FromPort": port, "ToPort": port, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": cidr}]}
    return lambda c: c["provider"].__setitem__("security_group", {"IpPermissions": [rule]})


@pytest.mark.parametrize(
    "weaken",
    [
        _ingress(8265, "203.0.113.0/24"),
        _ingress(22, "0.0.0.0/0"),
        lambda c: c["available_node_types"]["gpu_l40s"]["node_config"].pop("SecurityGroupIds"),
        lambda c: c.__setitem__("worker_start_ray_commands",
                                [s.replace("RAY_AUTH_MODE=token ", "") for s in c["worker_start_ray_commands"]]),
        lambda c: c.__setitem__("head_start_ray_commands",
                                [s.replace("127.0.0.1", "0.0.0.0") for s in c["head_start_ray_commands"]]),
        lambda c: c.__setitem__("file_mounts", {}),
    ],
    ids=["dashboard-port-open", "ssh-from-anywhere", "default-security-group", "worker-without-auth",
         "public-dashboard", "token-not-copied"],
)
def test_security_check_catches_a_weakened_config(weaken):
    config = load_cluster()
    weaken(config)
    assert security_problems(config)


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)aws_(secret_)?access_key|RAY_AUTH_TOKEN\s*=|BEGIN [A-Z ]*PRIVATE KEY", text)
    assert "ssh_private_key:" not in _uncommented(CLUSTER_YAML)


def test_project_installed_at_a_pinned_revision(cluster):
    head = "\n".join(cluster["head_setup_commands"])  # prepare_config merged setup_commands into both
    worker = "\n".join(cluster["worker_setup_commands"])
    spec = "git+${REPO_URL}@${REVISION}"
    assert f'"memeff-sweep @ {spec}"' in head and f'"memeff-sweep @ {spec}"' in worker
    assert f'"memeff-sweep[flash] @ {spec}"' in worker and "[flash]" not in head
    assert f"export RAY_VERSION={ray.__version__}" in head  # the cluster runs the Ray that validated this file
    assert "python -m data_prep prepare --seed 0" in worker  # identical shards on every node


# k8s: no CRD schema offline, so structure only.
def k8s_documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_rayjob_manifest_is_well_formed():
    docs = {doc["kind"]: doc for doc in k8s_documents()}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert "python -m sweep.run" in spec["entrypoint"] and "--address auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].startswith(f"rayproject/ray:{ray.__version__}")
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {})
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    for doc in k8s_documents():
        for env in _all_env(doc):
            assert env["name"] != "RAY_AUTH_TOKEN" or "valueFrom" in env, "a token in plain text"


def test_network_policy_keeps_ray_ports_inside():
    docs = {doc["kind"]: doc for doc in k8s_documents()}
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        for source in rule["from"]:
            assert "ipBlock" not in source  # peers are pods/namespaces, never an address range


def _all_env(node) -> list[dict]:
    if isinstance(node, dict):
        found = list(node.get("env", [])) if isinstance(node.get("env"), list) else []
        return found + [e for v in node.values() for e in _all_env(v)]
    if isinstance(node, list):
        return [e for v in node for e in _all_env(v)]
    return []
