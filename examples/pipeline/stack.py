"""The demo's processes: the pipeline's six services in their cgroups, what they depend on (the
static site, the LLM stub, redis-server), the OTLP receiver and tapwire.

    /sys/fs/cgroup[/unified]/tapwire-demo-<pid>/
        pipeline/{gateway,orchestrator,scraper,processor,search,vectorstore}   watched by tapwire
        deps/{site,llm-stub,redis}                                             not watched

tapwire names each service after its cgroup. Starting and stopping reuse the end-to-end suite's
helpers (tests/e2e: cgroupfs, procs, otlp_receiver); `Stack.close` stops tapwire first (so it
flushes), then every process, then removes the cgroups, and reports anything that survived.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import cgroupfs  # noqa: E402  (tests/e2e: cgroup v2 helpers)
import procs  # noqa: E402  (tests/e2e: services, the agent, ports)
from otlp_receiver import OtlpReceiver  # noqa: E402  (tests/e2e: OTLP on opentelemetry-proto)

SERVICES_DIR = HERE / "services"
SITE_DIR = HERE / "site"
CGROUP_PREFIX = "tapwire-demo-"

# The six services tapwire watches, callers first.
WATCHED = ["gateway", "orchestrator", "scraper", "processor", "search", "vectorstore"]
# What they depend on, outside tapwire's selection.
DEPS = ["site", "llm-stub", "redis"]


def log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Proc:
    name: str
    service: procs.ServiceProcess


class Stack:
    def __init__(self, tapwire_bin: str, log_dir: Path):
        self.tapwire_bin = tapwire_bin
        self.log_dir = log_dir
        self.root_cgroup: Path | None = None
        self.ports: dict[str, int] = {}
        self.procs: list[Proc] = []
        self.receiver: OtlpReceiver | None = None
        self.agent: procs.TapwireProcess | None = None
        self.agent_programs: set[int] = set()
        self.prometheus_port = 0

    # ---- start -------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}/metrics"

    def port_names(self) -> dict[int, str]:
        return {port: name for name, port in self.ports.items()}

    def create_cgroups(self) -> None:
        stale = cgroupfs.remove_stale(CGROUP_PREFIX)
        if stale:
            log(f"removed {len(stale)} cgroups of earlier runs that were interrupted: "
                f"{', '.join(p.name for p in stale)}")
        self.root_cgroup = cgroupfs.create(f"{CGROUP_PREFIX}{os.getpid()}")
        for group in ("pipeline", "deps"):
            (self.root_cgroup / group).mkdir()
        for name in WATCHED:
            (self.root_cgroup / "pipeline" / name).mkdir()
        for name in DEPS:
            (self.root_cgroup / "deps" / name).mkdir()
        log(f"created cgroup {self.root_cgroup} with pipeline/{{{','.join(WATCHED)}}} "
            f"and deps/{{{','.join(DEPS)}}}")

    def _cgroup(self, name: str) -> Path:
        assert self.root_cgroup is not None
        group = "pipeline" if name in WATCHED else "deps"
        return self.root_cgroup / group / name

    def _env(self) -> dict[str, str]:
        """Every service's downstream addresses (each reads the ones it needs)."""
        return {
            "ORCHESTRATOR_URL": self.url("orchestrator"),
            "SCRAPER_URL": self.url("scraper"),
            "SEARCH_URL": self.url("search"),
            "PROCESSOR_URL": self.url("processor"),
            "VECTORSTORE_URL": self.url("vectorstore"),
            "SITE_URL": self.url("site"),
            "LLM_URL": self.url("llm-stub") + "/v1",
            "REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
        }

    def _argv(self, name: str, port: int) -> list[str]:
        python = sys.executable
        if name == "processor":  # the threaded Flask service
            return [python, "-m", "gunicorn", "--chdir", str(SERVICES_DIR),
                    "--worker-class", "gthread", "--workers", "1", "--threads", "4",
                    "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "processor:app"]
        if name == "site":
            return [python, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                    "--directory", str(SITE_DIR)]
        if name == "redis":
            return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(self.log_dir), "--loglevel", "warning"]
        module = name.replace("-", "_")
        return [python, "-m", "uvicorn", f"{module}:app", "--app-dir", str(SERVICES_DIR),
                "--host", "127.0.0.1", "--port", str(port), "--http", "h11", "--loop", "asyncio",
                "--no-access-log", "--log-level", "warning"]

    def _start_one(self, name: str) -> procs.ServiceProcess:
        port = self.ports[name]
        if name == "redis":
            return self._start_redis(port)
        return procs.start_http_service(
            lambda p: self._argv(name, p), self.log_dir, name, cgroup=self._cgroup(name),
            env=self._env(), hosts=("127.0.0.1",), port=port,
            ready_path="/index.html" if name == "site" else "/healthz")

    def _start_redis(self, port: int, timeout: float = 15.0) -> procs.ServiceProcess:
        log_path = self.log_dir / "redis.log"
        with open(log_path, "ab") as out:
            proc = cgroupfs.popen_in_cgroup(self._cgroup("redis"), self._argv("redis", port),
                                            env=procs.base_env(), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        service = procs.ServiceProcess(proc, port, "redis", log_path, self._cgroup("redis"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return service
            except OSError:
                pass
            time.sleep(0.05)
        service.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {port} within {timeout:.0f} s "
                           f"(exit code {proc.poll()})\n{service.diagnostics()}")

    def start_services(self) -> None:
        """Starts the dependencies and the six services at once (each on a port chosen here, so
        every service knows its downstreams' addresses from the start) and waits until each
        answers its readiness request."""
        taken: set[int] = set()
        for name in [*DEPS, *WATCHED]:
            port = procs.free_port()
            while port in taken:
                port = procs.free_port()
            taken.add(port)
            self.ports[name] = port
        started = time.monotonic()
        names = [*DEPS, *WATCHED]
        errors = []
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            futures = {pool.submit(self._start_one, name): name for name in names}
            for future in concurrent.futures.as_completed(futures):
                name = futures[future]
                try:
                    self.procs.append(Proc(name, future.result()))
                except (AssertionError, RuntimeError, OSError) as err:
                    errors.append(f"{name}: {err}")
        if errors:
            raise RuntimeError("could not start the pipeline:\n" + "\n".join(errors))
        self.procs.sort(key=lambda p: names.index(p.name))
        log(f"started {len(self.procs)} processes in {time.monotonic() - started:.1f} s:")
        for p in self.procs:
            role = "watched" if p.name in WATCHED else "not watched"
            log(f"  {p.name:<12} pid {p.service.pid:<7} {self.url(p.name):<24} "
                f"cgroup {self._cgroup(p.name).relative_to(self.root_cgroup.parent)} ({role})")

    def start_agent(self) -> None:
        """The OTLP receiver, then `tapwire run --cgroup <root>/pipeline` exporting spans to it
        over OTLP/HTTP and serving Prometheus metrics on a free loopback port."""
        self.receiver = OtlpReceiver().start()
        self.prometheus_port = procs.free_port()
        # Context propagation (on by default) inserts a `traceparent` into the services' outbound
        # requests, so that one request's spans form one trace across the services.
        env = procs.base_env({**self.receiver.exporter_env("http/protobuf"),
                              "OTEL_METRICS_EXPORTER": "prometheus"})
        pipeline = self.root_cgroup / "pipeline"
        self.agent = procs.TapwireProcess(
            self.tapwire_bin, [str(pipeline)], env, self.log_dir, label="tapwire",
            extra_args=["--prometheus-listen", f"127.0.0.1:{self.prometheus_port}"])
        started = time.monotonic()
        log(f"starting tapwire: {' '.join(self.agent.argv)} "
            f"(spans by OTLP/HTTP to {self.receiver.http_endpoint})")
        self.agent.start()
        self.agent_programs = procs.programs_of(self.agent.pid)
        log(f"tapwire ready in {time.monotonic() - started:.1f} s: pid {self.agent.pid}, "
            f"{len(self.agent_programs)} eBPF programs attached "
            f"(ids {','.join(str(i) for i in sorted(self.agent_programs))})")

    # ---- stop --------------------------------------------------------------------------------

    def stop_agent(self) -> int | None:
        """SIGTERM to tapwire (it flushes its spans, detaches and exits 0); its exit code."""
        if self.agent is None or self.agent.proc is None:
            return None
        try:
            return self.agent.stop()
        except AssertionError as err:
            log(str(err))
            return None

    def close(self) -> list[str]:
        """Stops everything that runs and removes the cgroups; returns what could not be cleaned
        up (empty when nothing is left)."""
        problems = []
        # The services first: their connections close, which leaves tapwire's propagation
        # sockhash empty, so that tapwire removes it at its stop (a sockhash still holding
        # connections stays pinned for them; see the README's Safety section).
        for p in reversed(self.procs):
            p.service.stop()
        code = self.stop_agent()
        if self.agent is not None and self.agent.proc is not None and code not in (0, None):
            problems.append(f"tapwire exited with {code}\n{self.agent.diagnostics()}")
        if self.receiver is not None:
            self.receiver.stop()
        if self.root_cgroup is not None and self.root_cgroup.exists():
            try:
                cgroupfs.remove(self.root_cgroup)
            except RuntimeError as err:
                problems.append(str(err))
        left = procs.wait_until_unloaded(self.agent_programs) if self.agent_programs else {}
        if left:
            problems.append(f"eBPF programs of tapwire still loaded: {sorted(left.values())}")
        alive = [p.name for p in self.procs if p.service.proc.poll() is None]
        if self.agent is not None and self.agent.running():
            alive.append("tapwire")
        if alive:
            problems.append(f"still running: {', '.join(alive)}")
        return problems
