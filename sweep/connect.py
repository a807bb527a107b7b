"""Join (or start) the Ray cluster a sweep runs on, and check that its storage is reachable from every node.

Token authentication (Ray >= 2.52, `RAY_AUTH_MODE=token`; where the token comes from: sweep/auth.py): Ray
only sends the token when `RAY_AUTH_MODE=token` is set in the client, or when it finds the cluster by itself (`address="auto"`); for an explicit address `connect` turns token mode
on the same way when a token is available, so holding the token is enough. A cluster that refuses the
client is reported at once with one line (`ClusterAuthError`) instead of Ray's 20 s of retries and a bare
`ConnectionError`.

Joining asks the address once, over gRPC, with a `PROBE_TIMEOUT_S` deadline before `ray.init`: a closed port, a
port that is not Ray's, a dropped one and a missing token each fail within seconds with one line that names the
address the user typed (Ray itself waits 30-45 s and then names the node IP it resolved the address to).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .auth import (TOKEN_HELP, auth_mode_name, enable_token_mode_if_token_available,
                   private_token_for_local_start, token_available, warn_if_token_file_exposed)
from .config import local_storage

logger = logging.getLogger(__name__)

SHARED_STORAGE_ENV = "MEMEFF_SHARED_STORAGE"
"""Set to 1/true/yes to declare that a local --storage-path is mounted on every node (NFS, EFS, ...)."""

REMOTE_STORAGE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
"""URI schemes every node reaches on its own (pyarrow filesystems Ray Tune writes through)."""

PROBE_TIMEOUT_S = 5.0
"""How long joining waits for the address to answer: a closed port answers at once, a dropped one never does."""


class ClusterError(RuntimeError):
    """The Ray cluster can't be started or joined (one clear line)."""


class ClusterAuthError(ClusterError):
    """The cluster uses token authentication and refused this client."""


class StorageError(ValueError):
    """The storage path can't be written by every node of the cluster (one clear line)."""


@dataclass(frozen=True)
class ClusterInfo:
    """What the sweep needs to know about the cluster it is connected to."""

    address: str  # GCS address (host:port) of the cluster, also for a local instance
    started_local: bool  # True when connect() started a fresh single-node instance
    num_nodes: int  # alive nodes now
    num_cpus: float  # total CPUs now
    num_gpus: float  # total GPUs now
    can_autoscale: bool  # the autoscaler may add nodes (so trials may land on nodes that don't exist yet)
    auth_mode: str  # "token" or "disabled"

    @property
    def multi_node(self) -> bool:
        """Trials may run on another machine than the driver (now or after scaling up)."""
        return self.num_nodes > 1 or self.can_autoscale


def connect(
    address: str | None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool | None = None,
    log_to_driver: bool = True,
    quiet: bool | None = None,
) -> ClusterInfo:
    """Start a local Ray instance (address None or "local", RAY_ADDRESS unset) or join a running cluster.

    `address` is "auto" (the cluster this machine belongs to, e.g. inside `ray job submit`), "host:port"
    (the GCS port, 6379 by default) or "ray://host:10001" (Ray Client). When Ray is already initialised
    in this process (tests, notebooks) that session is described and reused. `num_cpus`/`num_gpus` size
    a local instance only (with an address they raise ClusterError); `include_dashboard` applies to a local
    instance only (a cluster's dashboard is its head's business). `quiet` (default: when `log_to_driver` is
    off, as at the sweep's --verbose < 2) drops Ray's start-up banner lines (the token-authentication WARNING,
    the "Started a local Ray instance" INFO); errors still show.
    """
    import ray

    banner = {"logging_level": logging.ERROR} if (not log_to_driver if quiet is None else quiet) else {}

    flag = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    joining = address not in (None, "local")
    if joining and (num_cpus is not None or num_gpus is not None):
        raise ClusterError(
            f"--num-cpus/--num-gpus size a local Ray instance only; the cluster at {address} "
            "already declares its resources (see `ray status` on its head node)"
        )
    if ray.is_initialized():
        return describe_cluster(started_local=False)
    if not joining:
        private_token_for_local_start()
        warn_if_token_file_exposed()
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=include_dashboard,
                log_to_driver=log_to_driver,
                **banner,
            )
        except (ConnectionError, RuntimeError, OSError) as e:
            raise ClusterError(f"could not start a local Ray instance: {_first_line(e)} "
                               "(see /tmp/ray/session_latest/logs)") from e
        return describe_cluster(started_local=True)
    enable_token_mode_if_token_available()
    warn_if_token_file_exposed()
    typed = address
    if address.startswith("ray://"):
        _probe(typed, address[len("ray://"):], flag=flag, ray_client=True)
    else:
        address = _resolve_address(address)
        _probe(typed if typed != "auto" else f"auto ({address})", address, flag=flag, ray_client=False)
    try:
        ray.init(address=address, log_to_driver=log_to_driver, **banner)
    except ray.exceptions.AuthenticationError as e:  # Ray Client (ray://) reports refusals this way
        raise _auth_error(typed) from e
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"could not join the Ray cluster at {typed}: {_first_line(e)}") from e
    return describe_cluster(started_local=False)


def describe_cluster(*, started_local: bool) -> ClusterInfo:
    """Nodes and resources of the cluster this process is connected to."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    resources = ray.cluster_resources()
    return ClusterInfo(
        address=ray.get_runtime_context().gcs_address,
        started_local=started_local,
        num_nodes=len(alive),
        num_cpus=float(resources.get("CPU", 0.0)),
        num_gpus=float(resources.get("GPU", 0.0)),
        can_autoscale=False if started_local else _autoscaler_max_nodes() > 1,
        auth_mode=auth_mode_name(),
    )


def check_storage(storage_path: str, info: ClusterInfo, *, shared: bool = False) -> str:
    """Return the storage path Tune should use, or raise StorageError if other nodes could not write there.

    Remote URIs (s3://, gs://, ...) work everywhere. A local path works on a single-node cluster, and on a
    multi-node (or autoscaling) one only when declared shared (`shared=True`, --shared-storage, or
    MEMEFF_SHARED_STORAGE=1): an NFS/EFS mount can't be told from a local disk reliably.
    """
    if not storage_path:
        raise StorageError("--storage-path is empty")
    scheme, sep, _ = storage_path.partition("://")
    if sep:
        if scheme.lower() in REMOTE_STORAGE_SCHEMES:
            return storage_path
        if scheme.lower() != "file":
            known = ", ".join(f"{s}://" for s in REMOTE_STORAGE_SCHEMES)
            raise StorageError(f"--storage-path {storage_path}: unsupported scheme {scheme}:// (use {known} or a path)")
        storage_path = local_storage(storage_path) or ""
    local = str(Path(storage_path).expanduser().resolve())
    if info.multi_node and not (shared or shared_storage_declared()):
        why = f"has {info.num_nodes} nodes" if info.num_nodes > 1 else "can add nodes (autoscaling)"
        raise StorageError(
            f"--storage-path {local} is a path on this machine, but the cluster {why} and trials on other "
            "nodes could not write their results there: use s3://BUCKET/PREFIX or gs://BUCKET/PREFIX, or a "
            f"directory mounted on every node (NFS/EFS) declared with --shared-storage ({SHARED_STORAGE_ENV}=1)"
        )
    return local


def shared_storage_declared() -> bool:
    """Whether MEMEFF_SHARED_STORAGE declares local storage paths shared by every node."""
    return os.environ.get(SHARED_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_address(address: str) -> str:
    """'auto' or 'host:port' -> the GCS 'ip:port' Ray would connect to."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as e:
        raise ClusterError(f"no Ray cluster at --address {address}: {_first_line(e)}") from e


def _probe(typed: str, target: str, *, flag: str = "--address", ray_client: bool,
           timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Ask the GCS (or the Ray Client server) at `target` one question, with the token if we hold one.

    `typed` is the address as the user gave it (in `flag`): errors name it, not the node IP Ray resolved it to.

    Ray's own client retries a closed port for 30-45 s and a refused token for 30 s, then reports a timeout;
    one gRPC call with a deadline says which of the cases it is in at most `timeout_s`.
    """
    import grpc
    from ray._private.grpc_utils import init_grpc_channel

    channel = init_grpc_channel(target)
    try:
        if ray_client:
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(request, timeout=timeout_s)
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as e:
        raise _probe_error(typed, flag, e.code(), e.details() or "", ray_client=ray_client,
                           timeout_s=timeout_s) from None
    finally:
        channel.close()


def _probe_error(typed: str, flag: str, code, details: str, *, ray_client: bool, timeout_s: float) -> ClusterError:
    """The one line for a failed probe of the address the user typed."""
    import grpc

    where = f"{flag} {typed}"
    what = "Ray Client server" if ray_client else "Ray cluster (GCS)"
    lower = details.lower()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return _auth_error(typed)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClusterError(f"no {what} answered at {where} within {timeout_s:.0f} s: a firewall or security "
                            "group drops the port, or the host is wrong")
    if "refused" in lower:
        return ClusterError(f"no {what} at {where}: connection refused (nothing listens on that port: is the "
                            "head running, and is this its port?)")
    if "dns" in lower or "resolv" in lower or "lookup" in lower:
        return ClusterError(f"no {what} at {where}: the host name does not resolve")
    if code == grpc.StatusCode.UNIMPLEMENTED or "http" in lower:
        hint = ("join a GCS port (6379 by default) without ray://" if ray_client
                else "a Ray Client port (10001 by default) is joined as ray://HOST:PORT")
        return ClusterError(f"{where} answers, but not as a {what}: check the port ({hint})")
    return ClusterError(f"could not reach the {what} at {where}: {_first_line(Exception(details))}")


def _auth_error(address: str) -> ClusterAuthError:
    if auth_mode_name() == "token" and token_available():
        return ClusterAuthError(
            f"the cluster at {address} refused this client's authentication token (it is not the cluster's "
            f"token): {TOKEN_HELP}"
        )
    return ClusterAuthError(f"the cluster at {address} requires an authentication token: {TOKEN_HELP}")


def _autoscaler_max_nodes() -> int:
    """Most nodes the cluster may grow to: 1 when nothing says it autoscales, a large number if unbounded.

    Two sources: the autoscaler config KubeRay reports to the GCS, and `~/ray_bootstrap_config.yaml`, which
    `ray up` leaves on the head node where `ray job submit` runs the sweep's driver.
    """
    counts = _reported_node_group_max_counts()
    if counts:
        return (1 << 30) if any(count < 0 for count in counts) else sum(counts)
    bootstrap = Path.home() / "ray_bootstrap_config.yaml"
    if bootstrap.is_file():
        try:
            import yaml

            return 1 + int(yaml.safe_load(bootstrap.read_text()).get("max_workers", 0))
        except Exception as e:  # unreadable: judge by the nodes alone
            logger.debug("unreadable %s: %s", bootstrap, e)
    return 1


def _reported_node_group_max_counts() -> list[int]:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # a GCS without the autoscaler v2 config
        logger.debug("no autoscaler cluster config: %s", e)
        return []
    return [group.max_count for group in config.node_group_configs] if config is not None else []


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


if __name__ == "__main__":  # `python -m sweep.connect --generate-token`: sweep/auth.py
    from .auth import main

    sys.exit(main())
