"""Processes, cgroups, CPU pinning and /proc measurements of one `cargo xtask bench` run.

Every process the bench starts (services, load generators, the agent) runs inside a cgroup named
`tapwire-bench-<name>-<pid of this harness>`, pinned to a CPU with taskset, in its own session (so
a Ctrl-C reaches only the harness, which then stops them in order). `Harness.close()` stops them
and removes the cgroups on every way out; cgroups left by a harness that was killed outright are
removed by the next run (`remove_stale`) and by `cargo xtask bench` itself once the harness exits.
"""

from __future__ import annotations

import http.client
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import cgroupfs  # noqa: E402  (tests/e2e: cgroup v2 helpers)
import procs  # noqa: E402  (tests/e2e: free_port, base_env, the agent's ready marker)

CGROUP_PREFIX = "tapwire-bench-"

# Two cores: the service under test gets one to itself, everything that measures or loads it the
# other. The agent shares CPU 1 with the load generator, as an agent shares a node's CPUs with
# other work; its in-kernel probes run on CPU 0 inside the service's own syscalls.
CPU_SERVICE = 0
CPU_CLIENT = 1
PINNING = {
    "service": CPU_SERVICE,
    "load_generator": CPU_CLIENT,
    "agent": CPU_CLIENT,
    "otlp_sink_and_harness": CPU_CLIENT,
    "how": "taskset -c CPU at exec (inherited by every thread and child); this harness pins "
           "itself with sched_setaffinity. Processes outside the bench are not pinned.",
}

AGENT_READY_TIMEOUT_S = 60.0
AGENT_STOP_TIMEOUT_S = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A step of the bench failed (a process did not start, a tool's output was unreadable)."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwinds like KeyboardInterrupt, through every cleanup."""


def install_signal_handlers() -> None:
    def raise_interrupted(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)


def pin_self(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def require_cpus(*cpus: int) -> None:
    online = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    missing = [c for c in cpus if c not in online]
    if missing:
        raise BenchError(f"the bench pins to CPUs {sorted(set(cpus))}; this machine has "
                         f"{sorted(online)}")


class Proc:
    """A process started by the harness: its Popen, label and output file."""

    def __init__(self, label: str, popen: subprocess.Popen, log_path: Path, cgroup: Path):
        self.label = label
        self.popen = popen
        self.log_path = log_path
        self.cgroup = cgroup

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        kept = self.output().splitlines()[-lines:]
        return "\n".join(kept) if kept else "(no output)"

    def wait(self, timeout: float) -> int:
        """Waits for a process that ends by itself (a load generator); kills it past `timeout`."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.label} did not finish within {timeout:.0f} s (killed it)\n"
                             f"{self.tail()}") from None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """`sig`, then SIGKILL after `timeout`; returns the exit code (None if it was killed)."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        try:
            self.popen.send_signal(sig)
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass


def _remove_stale_tempdirs() -> None:
    """/tmp/tapwire-bench-<name>-<pid>-* directories of harnesses that are gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{CGROUP_PREFIX}*"):
        parts = path.name[len(CGROUP_PREFIX):].split("-")
        owner = next((p for p in parts if p.isdigit()), None)
        if path.is_dir() and owner and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(path, ignore_errors=True)


class Harness:
    """Owns the cgroups and processes of one bench run; close() undoes everything."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.mount = cgroupfs.cgroup2_mount()
        self._cgroups: dict[str, Path] = {}
        self._procs: list[Proc] = []
        self._tempdirs: list[Path] = []
        removed = cgroupfs.remove_stale(CGROUP_PREFIX)
        _remove_stale_tempdirs()
        if removed:
            print(f"[bench] removed {len(removed)} cgroups left by an earlier bench: "
                  f"{', '.join(p.name for p in removed)}", file=sys.stderr, flush=True)

    def cgroup(self, name: str) -> Path:
        """The cgroup `tapwire-bench-NAME-<pid>` (created on first use, kept until close())."""
        if name not in self._cgroups:
            self._cgroups[name] = cgroupfs.create(f"{CGROUP_PREFIX}{name}-{os.getpid()}",
                                                  self.mount)
        return self._cgroups[name]

    def tempdir(self, name: str) -> Path:
        """A fresh world-readable directory under /tmp (nginx's worker runs as `nobody` and
        must reach its document root), removed by close()."""
        path = Path(tempfile.mkdtemp(prefix=f"{CGROUP_PREFIX}{name}-{os.getpid()}-"))
        path.chmod(0o755)
        self._tempdirs.append(path)
        return path

    def spawn(self, label: str, argv: list[str], cgroup: str, cpu: int,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
        """Starts `taskset -c CPU ARGV` inside cgroup `cgroup`, output to WORKDIR/LABEL.log."""
        log_path = self.workdir / f"{label}.log"
        full_env = procs.base_env({"PYTHONUNBUFFERED": "1", **(env or {})})
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            popen = cgroupfs.popen_in_cgroup(
                self.cgroup(cgroup), ["taskset", "-c", str(cpu), *argv], env=full_env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=cwd)
        proc = Proc(label, popen, log_path, self.cgroup(cgroup))
        self._procs.append(proc)
        return proc

    def cpu_usec_by_part(self) -> dict[str, int]:
        """CPU time used so far by each of the bench's cgroups and by this process ("harness",
        which includes the OTLP receiver's threads)."""
        parts = {}
        for name, path in self._cgroups.items():
            try:
                for line in (path / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        parts[name] = int(line.split()[1])
            except (FileNotFoundError, ValueError):
                pass
        me = resource.getrusage(resource.RUSAGE_SELF)
        parts["harness"] = int((me.ru_utime + me.ru_stime) * 1e6)
        return parts

    def close(self) -> list[str]:
        """Stops every process (newest first), removes every cgroup; returns what went wrong."""
        problems = []
        for proc in reversed(self._procs):
            if proc.alive():
                proc.stop(timeout=5.0)
        for name, path in reversed(list(self._cgroups.items())):
            try:
                cgroupfs.remove(path)
            except (RuntimeError, OSError) as err:
                problems.append(f"cgroup {name}: {err}")
        self._cgroups.clear()
        for path in self._tempdirs:
            shutil.rmtree(path, ignore_errors=True)
        self._tempdirs.clear()
        return problems


# ---- the agent --------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FIELD = re.compile(r"(\w+)=(\d+)")


def parse_exit_counters(log: str) -> dict[str, int] | None:
    """The counters of tapwire's last `stopped events_read=.. events_lost=..` log line."""
    found = None
    for line in _ANSI.sub("", log).splitlines():
        if re.search(r"\bstopped\b", line) and "events_read=" in line:
            found = {k: int(v) for k, v in _FIELD.findall(line.split("stopped", 1)[1])}
    return found


def read_proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (utime+stime of all threads, incl. exited ones), RSS and peak RSS (bytes)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    cpu_s = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    sched_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            sched_ns += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            pass
    return {"cpu_s": cpu_s, "cpu_s_live_threads_schedstat": sched_ns / 1e9,
            "rss_bytes": rss, "hwm_bytes": hwm}


def read_bpf_memory(pid: int) -> dict[str, int]:
    """memlock bytes of the eBPF maps and programs `pid` holds open (from /proc/PID/fdinfo),
    each object counted once however many fds point at it."""
    maps: dict[int, int] = {}
    progs: dict[int, int] = {}
    ringbuf = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
            kind = "map" if target == "anon_inode:bpf-map" else \
                "prog" if target == "anon_inode:bpf-prog" else None
            if kind is None:
                continue
            info = dict(line.split(":", 1) for line in
                        (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text().splitlines()
                        if ":" in line)
        except (FileNotFoundError, OSError, ValueError):
            continue
        memlock = int(info.get("memlock", "0").strip() or 0)
        if kind == "map":
            map_id = int(info.get("map_id", "-1").strip())
            if map_id not in maps and info.get("map_type", "").strip() == "27":  # RINGBUF
                ringbuf += memlock
            maps[map_id] = memlock
        else:
            progs[int(info.get("prog_id", "-1").strip())] = memlock
    return {"maps": len(maps), "map_bytes": sum(maps.values()), "ringbuf_bytes": ringbuf,
            "programs": len(progs), "program_bytes": sum(progs.values())}


class Sampler:
    """Calls fn() every `interval` seconds on a thread; keeps what it returns (errors skipped)."""

    def __init__(self, fn, interval: float = 0.25):
        self._fn = fn
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list = []
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._fn())
            except (OSError, ValueError):
                pass
            self._stop.wait(self._interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


class Agent:
    """`tapwire run --cgroup ...` in cgroup `agent`, on CPU_CLIENT."""

    def __init__(self, harness: Harness, binary: str, watch: list[Path], label: str,
                 exporter_env: dict[str, str] | None):
        argv = [binary, "run"]
        for cg in watch:
            argv += ["--cgroup", str(cg)]
        env = {"TAPWIRE_LOG": "info", "NO_COLOR": "1"}
        if exporter_env is None:
            argv += ["--exporter", "none"]
        else:
            argv += ["--exporter", "otlp"]
            env.update(exporter_env)
        self.proc = harness.spawn(label, argv, "agent", CPU_CLIENT, env=env)
        self.ready_s = self._wait_ready()

    def _wait_ready(self) -> float:
        start = time.monotonic()
        deadline = start + AGENT_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if procs.READY_MARKER in self.proc.output():
                return time.monotonic() - start
            if not self.proc.alive():
                raise BenchError(f"tapwire exited ({self.proc.popen.returncode}) before "
                                 f"{procs.READY_MARKER!r}:\n{self.proc.tail()}")
            time.sleep(0.02)
        self.proc.kill()
        raise BenchError(f"tapwire did not log {procs.READY_MARKER!r} within "
                         f"{AGENT_READY_TIMEOUT_S:.0f} s (killed it):\n{self.proc.tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def usage(self) -> dict[str, float]:
        return read_proc_usage(self.pid)

    def bpf_memory(self) -> dict[str, int]:
        return read_bpf_memory(self.pid)

    def stop(self) -> dict:
        """SIGTERM; returns the exit code and the counters of its `stopped` line."""
        code = self.proc.stop(timeout=AGENT_STOP_TIMEOUT_S)
        counters = parse_exit_counters(self.proc.output())
        return {"exit_code": code, "counters": counters}

    def kill(self) -> None:
        self.proc.kill()


# ---- machine-wide CPU: how noisy was this run? ------------------------------------------------

def _system_busy_usec() -> int:
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    user, nice, system = int(cpu[1]), int(cpu[2]), int(cpu[3])
    steal = int(cpu[8]) if len(cpu) > 8 else 0
    return int((user + nice + system + steal) * 1e6 / CLK_TCK)


def foreign_agents(own: set[int] = frozenset()) -> list[int]:
    """Pids of tapwire processes the bench did not start (an end-to-end test, a developer's
    agent): their syscall tracepoints slow every process on the machine, the bench's included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in own:
            try:
                if (entry / "comm").read_text().strip() == "tapwire":
                    found.append(int(entry.name))
            except OSError:
                pass
    return sorted(found)


class NoiseMeter:
    """What the machine did during a run.

    other_cores: CPU used by anything that is not part of the bench, in cores (user+nice+system+
    steal of /proc/stat, minus the bench's cgroups and this process; interrupt and softirq time
    are left out of both sides). 0 on a quiet machine; 0.5 means something else kept half a core
    busy while the run measured. bench_cores: the same per part of the bench. foreign_agents:
    tapwire processes the bench did not start, seen at the start of the run.
    """

    def __init__(self, harness: Harness, own_pids: set[int] = frozenset()):
        self.harness = harness
        self.foreign_agents = foreign_agents(own_pids)

    def __enter__(self) -> "NoiseMeter":
        self._start = (time.monotonic(), _system_busy_usec(), self.harness.cpu_usec_by_part())
        return self

    def __exit__(self, *exc) -> None:
        self._end = (time.monotonic(), _system_busy_usec(), self.harness.cpu_usec_by_part())

    @property
    def bench_cores(self) -> dict[str, float]:
        (t0, _, parts0), (t1, _, parts1) = self._start, self._end
        wall_us = max((t1 - t0) * 1e6, 1.0)
        return {name: round((used - parts0.get(name, 0)) / wall_us, 3)
                for name, used in parts1.items() if used - parts0.get(name, 0) > 0}

    @property
    def other_cores(self) -> float:
        (t0, busy0, parts0), (t1, busy1, parts1) = self._start, self._end
        wall_us = max((t1 - t0) * 1e6, 1.0)
        ours = sum(parts1.values()) - sum(parts0.values())
        return max(0.0, ((busy1 - busy0) - ours) / wall_us)


# ---- small HTTP helpers (readiness, stats) ----------------------------------------------------

def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:PORT/PATH on a fresh connection, no proxy."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http_ok(proc: Proc, port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.label} exited ({proc.popen.returncode}) before answering "
                             f"GET {path}:\n{proc.tail()}")
        try:
            if http_get(port, path)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{proc.label} did not answer GET {path} on port {port} within "
                     f"{timeout:.0f} s:\n{proc.tail()}")
