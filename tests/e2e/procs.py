"""The processes an end-to-end test runs: the tapwire agent and the services it watches.

Every wait here is bounded; every process's stdout/stderr goes to a file under the test's tmp dir
so a failing test can show it (conftest.py attaches the tails to the failure report).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import requests

import cgroupfs

HERE = Path(__file__).resolve().parent
APPS_DIR = HERE / "apps"

READY_MARKER = "capture ready"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

# Variables that must never leak from the developer's or CI's environment into a test's processes.
_SCRUBBED_PREFIXES = ("OTEL_",)


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ without OTEL_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.update(extra or {})
    return env


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no output file)"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else "(empty)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry on a bind race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_dual_port(attempts: int = 20) -> int:
    """A TCP port free a moment ago on both 127.0.0.1 and [::1] (callers retry on a bind race)."""
    for _ in range(attempts):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
                sock.bind(("::1", port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on both 127.0.0.1 and [::1] in {attempts} attempts")


def exe_name(pid: int) -> str:
    """Base name of /proc/PID/exe's target: what semconv's process.executable.name means on Linux."""
    return os.path.basename(os.readlink(f"/proc/{pid}/exe"))


def with_capabilities(caps: set[str], no_new_privs: bool = True) -> list[str]:
    """setpriv arguments (to put before a command) that run it as root with exactly `caps`
    (names without CAP_, e.g. {"BPF", "PERFMON"}), as a container runtime does.

    As root, execve() grants the bounding set, so it is the effective set; no inheritable
    capabilities; no_new_privs is Kubernetes' allowPrivilegeEscalation: false.
    """
    setpriv = shutil.which("setpriv")
    assert setpriv, "`setpriv` is not on PATH: install util-linux (in xtask's APT_PACKAGES)"
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in sorted(caps)])
    argv = [setpriv, "--bounding-set", bounding, "--inh-caps", "-all"]
    if no_new_privs:
        argv.append("--no-new-privs")
    return argv + ["--"]


class TapwireProcess:
    """`tapwire run --cgroup ...` started and stopped the way a test needs it."""

    def __init__(self, binary: str, cgroups: list[str], env: dict[str, str], log_dir: Path,
                 label: str = "tapwire", extra_args: list[str] | None = None):
        self.binary = binary
        self.argv = [binary, "run"]
        for cgroup in cgroups:
            self.argv += ["--cgroup", str(cgroup)]
        self.argv += list(extra_args or [])
        self.env = env
        self.label = label
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{label}.stdout"
        self.stderr_path = log_dir / f"{label}.stderr"
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> "TapwireProcess":
        """Starts the agent and waits for `capture ready` on its stderr.

        Raises AssertionError (with the captured stderr) if it exits first or the wait times out.
        """
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        started = time.monotonic()
        deadline = started + ready_timeout
        while time.monotonic() < deadline:
            if READY_MARKER in self.stderr():
                return self
            code = self.proc.poll()
            if code is not None:
                self.returncode = code
                raise AssertionError(
                    f"{self.label} exited with code {code} before logging {READY_MARKER!r}\n"
                    f"argv: {' '.join(self.argv)}\n{self.diagnostics()}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(
            f"{self.label} did not log {READY_MARKER!r} within {ready_timeout:.0f}s "
            f"(killed it)\nargv: {' '.join(self.argv)}\n{self.diagnostics()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def diagnostics(self, lines: int = 60) -> str:
        state = ("running" if self.running()
                 else f"exited with {self.proc.returncode}" if self.proc else "not started")
        return (f"--- {self.label} ({state}) stderr, last {lines} lines ---\n"
                f"{tail(self.stderr_path, lines)}\n"
                f"--- {self.label} stdout, last {lines} lines ---\n{tail(self.stdout_path, lines)}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; returns the exit code. Kills it (and fails) if it hangs."""
        assert self.proc is not None, "tapwire was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.label} did not exit within {timeout:.0f}s of "
                                     f"SIGTERM (killed it)\n{self.diagnostics()}") from None
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class ServiceProcess:
    """An HTTP service (uvicorn + a FastAPI app) on 127.0.0.1, optionally inside a cgroup."""

    def __init__(self, proc: subprocess.Popen, port: int, label: str, log_path: Path,
                 cgroup: Path | None):
        self.proc = proc
        self.port = port
        self.label = label
        self.log_path = log_path
        self.cgroup = cgroup

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """http://HOST:PORT/path, with an IPv6 HOST in brackets."""
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}{path}"

    def diagnostics(self, lines: int = 40) -> str:
        return f"--- {self.label} output, last {lines} lines ---\n{tail(self.log_path, lines)}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_uvicorn(app: str, log_dir: Path, label: str, cgroup: Path | None = None,
                  env: dict[str, str] | None = None, ready_timeout: float = 30.0,
                  attempts: int = 3) -> ServiceProcess:
    """Starts `uvicorn APP` (module:attr under tests/e2e/apps) on a free 127.0.0.1 port.

    Returns once GET /hello answers 200. Those readiness requests are real HTTP requests: start
    services *before* the agent so they are not captured.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for attempt in range(attempts):
        port = free_port()
        log_path = log_dir / f"{label}.log"
        argv = [sys.executable, "-m", "uvicorn", app, "--app-dir", str(APPS_DIR),
                "--host", "127.0.0.1", "--port", str(port), "--http", "h11", "--loop", "asyncio",
                "--no-access-log", "--log-level", "warning"]
        full_env = base_env({"PYTHONUNBUFFERED": "1", **(env or {})})
        with open(log_path, "ab") as log:
            if cgroup is None:
                proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            else:
                proc = cgroupfs.popen_in_cgroup(cgroup, argv, env=full_env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
        service = ServiceProcess(proc, port, label, log_path, cgroup)
        if _wait_http_ready(service, ready_timeout):
            return service
        service.stop()
        last_error = (f"attempt {attempt + 1}: {label} on port {port} not ready "
                      f"(exit code {proc.returncode})\n{service.diagnostics()}")
    raise AssertionError(f"could not start {label} in {attempts} attempts\n{last_error}")


def start_http_service(argv_for_port, log_dir: Path, label: str, cgroup: Path | None = None,
                       env: dict[str, str] | None = None,
                       hosts: tuple[str, ...] = ("127.0.0.1", "::1"),
                       ready_timeout: float = 30.0, attempts: int = 3,
                       ready_path: str = "/hello", port: int | None = None) -> ServiceProcess:
    """Starts any HTTP service, `argv_for_port(port)`, on a port free on every one of `hosts`
    (or on `port`, chosen by the caller: then there is one attempt, as another port would not be
    the one the caller told others about).

    Returns once GET `ready_path` answers 200 on each host. Like start_uvicorn: the readiness
    requests are real HTTP requests, so start services *before* the agent.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    fixed_port = port
    for attempt in range(1 if fixed_port else attempts):
        port = fixed_port or (free_dual_port() if any(":" in h for h in hosts) else free_port())
        argv = [str(a) for a in argv_for_port(port)]
        log_path = log_dir / f"{label}.log"
        full_env = base_env({"PYTHONUNBUFFERED": "1", **(env or {})})
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            if cgroup is None:
                proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            else:
                proc = cgroupfs.popen_in_cgroup(cgroup, argv, env=full_env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
        service = ServiceProcess(proc, port, label, log_path, cgroup)
        if all(_wait_ready_on(service, ready_timeout, host, ready_path) for host in hosts):
            return service
        service.stop()
        last_error = (f"attempt {attempt + 1}: {label} on port {port} not ready on {hosts} "
                      f"(exit code {proc.returncode})\n{service.diagnostics()}")
    raise AssertionError(f"could not start {label} in {attempts} attempts\n{last_error}")


def _wait_http_ready(service: ServiceProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            return False
        try:
            if requests.get(f"{service.base_url}/hello", timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return False


def _wait_ready_on(service: ServiceProcess, timeout: float, host: str,
                   path: str = "/hello") -> bool:
    """Like _wait_http_ready, on `host` (IPv4 or IPv6) and `path`, with no proxy and no kept
    connection."""
    deadline = time.monotonic() + timeout
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever proxy the environment names
    try:
        while time.monotonic() < deadline:
            if service.proc.poll() is not None:
                return False
            try:
                if session.get(service.url(path, host), timeout=1,
                               headers={"Connection": "close"}).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.1)
        return False
    finally:
        session.close()


def loaded_programs() -> dict[int, str]:
    """id -> name of every eBPF program loaded on the machine (bpftool)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return {p["id"]: p.get("name", "") for p in json.loads(out or "[]")}


def fd_object_ids(pid: int, kind: str) -> set[int]:
    """Ids of the eBPF objects of `kind` ("prog" or "map") a process holds file descriptors of
    (from /proc/PID/fdinfo)."""
    ids, prefix = set(), f"{kind}_id:"
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            for line in fdinfo.read_text().splitlines():
                if line.startswith(prefix):
                    ids.add(int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return ids


def programs_of(pid: int) -> set[int]:
    """Ids of the eBPF programs a process holds file descriptors of."""
    return fd_object_ids(pid, "prog")


def wait_for_server(ready: Callable[[], object], proc: subprocess.Popen, what: str,
                    timeout: float = 30.0) -> None:
    """Calls `ready` until it returns without OSError (connection refused: not listening yet),
    failing if `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ready()
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{what} not up"
            time.sleep(0.1)


def wait_until_only(ids: set[int], names: set[str], timeout: float = 10.0) -> dict[int, str]:
    """Waits until, of `ids`, only programs named `names` are loaded; returns those loaded."""
    deadline = time.monotonic() + timeout
    left = {i: n for i, n in loaded_programs().items() if i in ids}
    while set(left.values()) - names and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {i: n for i, n in loaded_programs().items() if i in ids}
    return left


PIN_DIR = Path("/sys/fs/bpf/tapwire")
PIN_LOG = re.compile(r"propagation sockhash pinned.* path=(\S+)")


def pin_of(agent: "TapwireProcess") -> Path | None:
    """Where the agent pinned its propagation sockhash (from its log), if it did."""
    found = PIN_LOG.search(agent.stderr())
    return Path(found.group(1)) if found else None


def wait_until_unloaded(ids: set[int], timeout: float = 10.0) -> dict[int, str]:
    """Waits until none of `ids` is loaded any more; returns those still loaded."""
    return wait_until_only(ids, set(), timeout)
