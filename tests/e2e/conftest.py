"""Fixtures for tapwire's end-to-end tests (run as root against the real kernel).

    tapwire_bin                        absolute path from $TAPWIRE_BIN (fails, never skips)
    cgroup(name) -> Path               fresh cgroup2 dir tapwire-e2e-<name>-<pid>, removed at teardown
    start_in_cgroup(cgroup, argv, env=None) -> Popen
                                       a process that joins `cgroup` before it execs
    otlp_receiver -> OtlpReceiver      gRPC + HTTP/protobuf OTLP receiver on 127.0.0.1
    fastapi_service(cgroup=None, env=None, label="fastapi") -> ServiceProcess
                                       uvicorn + apps/fastapi_app.py on a free port, answering
    tapwire(cgroups, env=None, label="tapwire", args=None) -> TapwireProcess
                                       `tapwire run --cgroup ... [args]` past `capture ready`;
                                       SIGTERM and exit code 0 asserted at teardown
    attach_log(title, text)            text() goes into this test's failure report

Teardown order is fixed by the dependencies: tapwire stops first (while the receiver still
listens, so its final flush has somewhere to go), then the receiver, services and cgroups.
When a test fails, the tails of every process's output are attached to its report.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cgroupfs  # noqa: E402
import procs  # noqa: E402
from otlp_receiver import OtlpReceiver  # noqa: E402

_LOGS = pytest.StashKey[list]()  # [(title, callable returning text)] per test item


def _attach_log(request: pytest.FixtureRequest, title: str, text: Callable[[], str]) -> None:
    request.node.stash.setdefault(_LOGS, []).append((title, text))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for title, text in item.stash.get(_LOGS, []):
            try:
                report.sections.append((title, text()))
            except Exception as err:  # noqa: BLE001 (a report must never break on a log)
                report.sections.append((title, f"(cannot read: {err})"))
    return report


@pytest.fixture
def attach_log(request) -> Callable[[str, Callable[[], str]], None]:
    """attach_log(title, text): text() is added to this test's report if it fails. For processes
    that outlive one test (module-scoped services and agents), attach them in each test."""
    return lambda title, text: _attach_log(request, title, text)


# ---- environment preconditions (fail, never skip) --------------------------------------------

@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("tapwire's end-to-end tests load eBPF programs and create cgroups: run them "
                    "as root (CI does)", pytrace=False)


@pytest.fixture(scope="session")
def tapwire_bin(require_root) -> Iterator[str]:
    path = os.environ.get("TAPWIRE_BIN", "")
    if not path:
        pytest.fail("TAPWIRE_BIN is not set: build the agent (cargo build --release) and set "
                    "TAPWIRE_BIN to the absolute path of the tapwire binary", pytrace=False)
    if not os.path.isabs(path):
        pytest.fail(f"TAPWIRE_BIN={path!r} must be an absolute path", pytrace=False)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"TAPWIRE_BIN={path!r} is not an executable file", pytrace=False)
    yield path
    # Agents that tests killed, or stopped while propagated connections were open, leave their
    # sockhash pinned (agent/src/capture/pin.rs); every test process is gone by now, so those
    # are empty: remove them rather than leave them to the machine's next tapwire.
    for pin in procs.PIN_DIR.glob("client_socks_*"):
        pin.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def cgroup2_root(require_root) -> Path:
    try:
        root = cgroupfs.cgroup2_mount()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    cgroupfs.remove_stale()  # cgroups of earlier runs that were killed before their teardown
    return root


# ---- cgroups and processes in them ------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@pytest.fixture
def cgroup(cgroup2_root) -> Callable[[str], Path]:
    """Factory: cgroup(name) creates <cgroup2 mount>/tapwire-e2e-<name>-<pytest pid>."""
    created: list[Path] = []

    def make(name: str) -> Path:
        if not _NAME_RE.match(name):
            raise ValueError(f"cgroup name {name!r}: use letters, digits, '.', '_' or '-'")
        path = cgroupfs.create(f"tapwire-e2e-{name}-{os.getpid()}", cgroup2_root)
        created.append(path)
        return path

    yield make
    errors = []
    for path in reversed(created):
        try:
            cgroupfs.remove(path)
        except RuntimeError as err:
            errors.append(str(err))
    if errors:
        pytest.fail("cgroup teardown failed:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def start_in_cgroup(request, tmp_path, cgroup) -> Callable[..., subprocess.Popen]:
    """Factory: start_in_cgroup(cgroup, argv, env=None) -> Popen, in the cgroup from its exec on.

    Output goes to a log file (attached to the report on failure); the process is stopped at
    teardown if still running.
    """
    started: list[subprocess.Popen] = []

    def start(cgroup_path: Path, argv: list[str], env: dict[str, str] | None = None):
        log_path = tmp_path / f"proc-{len(started)}-{Path(argv[0]).name}.log"
        with open(log_path, "wb") as log:
            proc = cgroupfs.popen_in_cgroup(Path(cgroup_path), list(argv),
                                            env=procs.base_env(env), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append(proc)
        _attach_log(request, f"{' '.join(argv)} (pid {proc.pid}) output",
                    lambda: procs.tail(log_path))
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def fastapi_service(request, tmp_path, cgroup) -> Callable[..., procs.ServiceProcess]:
    """Factory: fastapi_service(cgroup=None, env=None, label="fastapi") -> ServiceProcess.

    uvicorn serving apps/fastapi_app.py on 127.0.0.1:<free port>, started in `cgroup` (None: in
    the test's own cgroup, i.e. outside every test cgroup) with `env` added to a scrubbed
    environment (no OTEL_* from outside). Returns once GET /hello answers: start services before
    the agent, or their readiness requests become spans.
    """
    services: list[procs.ServiceProcess] = []

    def start(cgroup_path: Path | None = None, env: dict[str, str] | None = None,
              label: str = "fastapi") -> procs.ServiceProcess:
        service = procs.start_uvicorn("fastapi_app:app", tmp_path, f"{label}-{len(services)}",
                                      cgroup=cgroup_path, env=env)
        services.append(service)
        _attach_log(request, f"{service.label} (pid {service.pid}, port {service.port})",
                    service.diagnostics)
        return service

    yield start
    for service in services:
        service.stop()


# ---- OTLP receiver and the agent --------------------------------------------------------------

@pytest.fixture
def otlp_receiver(request) -> OtlpReceiver:
    receiver = OtlpReceiver().start()
    _attach_log(request, "OTLP receiver",
                lambda: receiver.describe("what the OTLP receiver holds at the failure"))
    yield receiver
    receiver.stop()


@pytest.fixture
def tapwire(request, tmp_path, tapwire_bin, otlp_receiver, cgroup, fastapi_service
            ) -> Callable[..., procs.TapwireProcess]:
    """Factory: tapwire(cgroups, env=None, label="tapwire", args=None) -> TapwireProcess (ready).

    `cgroups` are paths (absolute, or relative to the cgroup2 mount) passed as --cgroup each;
    `args` are more `tapwire run` arguments (e.g. ["--prometheus-listen", "127.0.0.1:9464"]);
    `env` is added to the scrubbed environment (use otlp_receiver.exporter_env(protocol) to export
    to the receiver; without it tapwire prints spans to stdout). At teardown every agent still
    running gets SIGTERM and must exit 0 within 15 s.
    """
    agents: list[procs.TapwireProcess] = []
    serial = itertools.count()

    def start(cgroups: list[Path | str], env: dict[str, str] | None = None,
              label: str = "tapwire", args: list[str] | None = None) -> procs.TapwireProcess:
        agent = procs.TapwireProcess(tapwire_bin, [str(c) for c in cgroups], procs.base_env(env),
                                     tmp_path, label=f"{label}-{next(serial)}", extra_args=args)
        _attach_log(request, f"{agent.label} logs", agent.diagnostics)
        agent.start()  # raises with the stderr if it exits or never gets ready (then it is gone)
        agents.append(agent)
        return agent

    yield start
    failures = []
    for agent in agents:
        try:
            code = agent.stop()
        except AssertionError as err:
            failures.append(str(err))
            continue
        if code != 0:
            failures.append(f"{agent.label} exited with {code} after SIGTERM, expected 0\n"
                            f"{agent.diagnostics()}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
