"""Every trial in a fresh process, without starting one: a warm server forks it.

What a trial measures near the memory edge may depend on what ran before it in its process (cached allocator
segments, compiled kernels), so every trial and every max-batch probe trains in a fresh process. Starting one is
what cost seconds: a Ray worker, `import torch`, dynamo (7-10 s a trial on an H200 host). Here a trial is a fork
of a server that imported torch and the training code once and never touched CUDA, so the fork gets a fresh CUDA
context and a fresh caching allocator in a fraction of a second. The server lives in a Tune worker (reused from
trial to trial: `reuse_actors`); the worker itself never initialises CUDA and never imports torch.

    server = fork_server()                       # this process's server, started on first use
    for message in server.run(target, payload):  # the child runs target(payload, send) and exits
        ...                                      # {"process": "fork"}, what the child sent, {"exit": 0}

A request is one JSON line on the server's stdin; `cancel` kills the running child; EOF (the worker exited or
died) kills it and ends the server. Messages are JSON lines on a pipe. The child's own messages are whatever its
target sends, plus `{"error": line, "traceback": text}` when the target raises.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

Send = Callable[[dict[str, Any]], None]
# What every child needs, imported once in the server before any fork (torch.optim's optimizers import dynamo on
# first use: 2-3 s a process). Inductor (a compiling trial's, ~4 s on an H200 host) is imported after the first
# fork, while that child trains, so it is on no trial's critical path unless the very first one compiles; such a
# request names it (`preload`) and the server imports it before that fork.
PRELOAD = ("torch", "torch._dynamo", "data_prep", "trainable.trial")
COMPILE_PRELOAD = ("torch._inductor.compile_fx",)
_FD_ENV = "MEMEFF_FORK_FD"
_CUDA_ERROR_NOT_INITIALIZED = 3
_SERVERS: list["ForkServer"] = []  # this process's server


def origin(payload: dict[str, Any]) -> dict[str, Any]:
    """How a child came to be, from its payload (`measure.Timeline`'s `origin`): `trial_process` (fork or spawn),
    the `worker_start_time` of the worker that asked for it and its server's `server_start_time`, where known."""
    keys = ("trial_process", "worker_start_time", "server_start_time")
    return {k: payload[k] for k in keys if k in payload and payload[k] == payload[k]}  # NaN: not known


def preload_for(config: dict[str, Any]) -> tuple[str, ...]:
    """What a child training `config` (TrialConfig keys) needs beyond PRELOAD: inductor when it compiles
    (torch.compile, or FlexAttention, which compiles its kernel on CUDA)."""
    from .config import TrialConfig
    from .errors import ConfigError
    from .kernels import select_kernel_name

    try:
        cfg = TrialConfig.from_dict(config)
        flex = cfg.device != "cpu" and select_kernel_name(cfg.attention, cfg.precision, "cuda", cfg.kernel) == "flex"
    except ConfigError:  # the child says what is wrong with it
        return ()
    return COMPILE_PRELOAD if cfg.compile or flex else ()


def fork_server() -> "ForkServer":
    """This process's server, (re)started when it is not running."""
    if not _SERVERS or not _SERVERS[0].alive():
        _SERVERS[:] = [ForkServer()]
    return _SERVERS[0]


def process_start_time() -> float:
    """Unix time this process started: /proc/self/stat on Linux, else psutil; NaN when neither says."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks since boot
        return time.time() - (uptime - started)  # (not /proc/stat's btime: whole seconds)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - unknown is NaN, never a guess
        return float("nan")


class ForkServer:
    """The parent's handle: `python -c serve()` with requests on its stdin and messages on a pipe."""

    def __init__(self) -> None:
        import subprocess

        read, write = os.pipe()
        env = {**os.environ, _FD_ENV: str(write), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-c", "from trainable.fork_server import serve; serve()"],
                                     stdin=subprocess.PIPE, pass_fds=(write,), env=env, text=True)
        os.close(write)
        self.messages = os.fdopen(read, "r", encoding="utf-8")
        self._lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, target: str, payload: dict[str, Any], preload: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
        """The messages of one child running `target` ("module:function") on `payload`, up to its `exit`;
        `preload`: modules the server imports (once) before it forks the child.

        Leaving the loop early (an exception in the caller, Tune stopping the trial) kills the child."""
        request = {"target": target, "payload": payload, "env": dict(os.environ), "server_start_time": self.started,
                   "preload": list(preload)}
        with self._lock:
            self._send(json.dumps(request))
            done = False
            try:
                for message in self._read():
                    done = "exit" in message
                    yield message
                    if done:
                        return
            finally:
                if not done:
                    self._cancel()

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read(self) -> Iterator[dict[str, Any]]:
        for line in self.messages:
            yield json.loads(line)
        yield {"exit": self.proc.wait()}  # the server itself died

    def _cancel(self) -> None:
        """Kill the running child and read up to its exit, so the next request starts clean; a server that
        cannot do that is stopped (the next `fork_server()` starts another)."""
        try:
            self._send("cancel")
            for message in self._read():
                if "exit" in message:
                    return
        except (OSError, ValueError):
            pass
        self.proc.kill()


# -- the server ---------------------------------------------------------------------------------------------
class _Lines:
    """Lines from fd 0 without Python's buffering, so `select` on the fd tells whether a line is waiting."""

    def __init__(self) -> None:
        self.buffer = b""

    def ready(self, timeout: float | None) -> bool:
        return b"\n" in self.buffer or bool(select.select([0], [], [], timeout)[0])

    def read(self) -> str | None:
        """The next line; None at EOF."""
        while b"\n" not in self.buffer:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


def serve() -> None:
    """The server: import what children need, then fork one child per request. It ends with its stdin.

    A fork may use CUDA only if this process never initialised the CUDA driver: `is_available()` checks here go
    through NVML; should anything have initialised the driver anyway, each child is a new interpreter instead
    (slower, as fresh), and says so (`{"process": "spawn"}`): never a silent fallback."""
    import importlib

    out_fd = int(os.environ.pop(_FD_ENV))
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # a device-count check here must not initialise CUDA
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: its worker decides a trial's end
    for name in PRELOAD:
        importlib.import_module(name)
    lines = _Lines()
    while (line := lines.read()) is not None:
        if line == "cancel":  # a cancel that crossed its child's exit: nothing left to cancel
            continue
        for name in json.loads(line).get("preload", ()):
            importlib.import_module(name)
        sys.stdout.flush()
        sys.stderr.flush()
        if _cuda_driver_initialised():
            os.write(out_fd, b'{"process": "spawn"}\n')
            pid = _spawn(line, out_fd)
        else:
            os.write(out_fd, b'{"process": "fork"}\n')
            pid = os.fork()
            if pid == 0:
                _child(json.loads(line), out_fd, "fork")
        for name in COMPILE_PRELOAD:  # while the child trains (no-ops once imported)
            importlib.import_module(name)
        os.write(out_fd, (json.dumps({"exit": _wait(pid, lines)}) + "\n").encode())


def _cuda_driver_initialised() -> bool:
    """Whether this process initialised the CUDA driver (a fork of it could not use CUDA then).

    Torch's CUDA libraries map libcuda.so at import, so a mapped driver says nothing; an initialised one answers
    `cuDeviceGetCount`, an uninitialised one returns CUDA_ERROR_NOT_INITIALIZED and stays uninitialised."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return True
    try:
        with open("/proc/self/maps") as f:
            if "libcuda.so" not in f.read():
                return False
    except OSError:
        return False
    try:
        import ctypes

        count = ctypes.c_int()
        return ctypes.CDLL("libcuda.so.1").cuDeviceGetCount(ctypes.byref(count)) != _CUDA_ERROR_NOT_INITIALIZED
    except (OSError, AttributeError):  # a driver we cannot ask: assume the worst (a new interpreter per child)
        return True


def _spawn(line: str, out_fd: int) -> int:
    """The child in a new interpreter (when a fork could not use CUDA); its pid."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    proc = subprocess.Popen([sys.executable, "-c", "from trainable.fork_server import _child; import json, sys; "
                             f"_child(json.loads(sys.stdin.readline()), {out_fd}, 'spawn')"],
                            stdin=subprocess.PIPE, pass_fds=(out_fd,), env=env, text=True)
    proc.stdin.write(line + "\n")
    proc.stdin.close()
    return proc.pid


def _wait(pid: int, lines: _Lines) -> int:
    """The child's exit code. A `cancel` meanwhile kills it; EOF (the worker is gone) kills it and this server.
    (No death signal for the child on the worker: it would fire when the worker's *thread* that started this
    server ends, i.e. after the first trial.)"""
    try:
        watch, timeout = os.pidfd_open(pid), None
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll
        watch, timeout = None, 0.05
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if not lines.ready(0):
                select.select([0] + ([watch] if watch is not None else []), [], [], timeout)
            if lines.ready(0):
                line = lines.read()
                _kill(pid)
                if line is None:
                    os._exit(0)
    finally:
        if watch is not None:
            os.close(watch)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _child(request: dict[str, Any], out_fd: int, how: str) -> None:
    """One request in this fresh process: `target(payload, send)`, messages on `out_fd`; never returns."""
    import importlib
    import traceback

    code, lock = 1, threading.Lock()
    out = os.fdopen(out_fd, "w", encoding="utf-8")

    def send(message: dict[str, Any]) -> None:  # also from the trial's reporter thread
        with lock:
            out.write(json.dumps(message, default=str) + "\n")
            out.flush()

    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])  # the worker's now: its GPU (CUDA_VISIBLE_DEVICES), its settings
        module, _, name = request["target"].partition(":")
        payload = {**request["payload"], "trial_process": how, "server_start_time": request["server_start_time"]}
        getattr(importlib.import_module(module), name)(payload, send)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - the child's result is its error
        from contract.io import error_line

        send({"error": error_line(exc), "traceback": "".join(traceback.format_exception(exc))})
    finally:
        os._exit(code)


def _die_with_parent() -> None:
    """SIGKILL this process when the thread that forked it (the server's only one) dies (Linux)."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
