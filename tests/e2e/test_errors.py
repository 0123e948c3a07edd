"""Clear errors: where tapwire cannot run, it prints exactly one line on stderr, `tapwire: ` and
one sentence naming the problem (the path, file, key or value) and what to do, and exits 1
before anything is loaded. A collector it cannot reach is not such a case: tapwire keeps running,
counts what it could not export and warns once, in a plain sentence naming the endpoint.

The missing-capability and missing-tracefs cases run the DaemonSet's container and are in
test_deploy.py; the configuration file's every key and value check is in the unit tests
(agent/src/config/tests.rs). This checks what the user sees: the whole line and the exit code.
"""

from __future__ import annotations

import re
import subprocess
import time
import pytest
import requests

import cgroupfs
import procs

UNREACHABLE_TIMEOUT_S = 30.0  # the first batch is due after 200 ms, then retried 4 times


def run_tapwire(tapwire_bin: str, args: list[str], env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    return subprocess.run([tapwire_bin, *args], env=procs.base_env(env), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def the_error(result: subprocess.CompletedProcess) -> str:
    """The one sentence of a run that could not start (exit 1, one stderr line, nothing loaded)."""
    report = f"exit {result.returncode}\n--- stderr ---\n{result.stderr}--- stdout ---\n{result.stdout}"
    assert result.returncode == 1, report
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tapwire: "), report
    assert result.stdout == "", report
    return lines[0].removeprefix("tapwire: ")


def test_bad_cgroup_is_one_clear_error(tapwire_bin):
    """A wrong --cgroup: the path given, where it was looked for, and what to give instead."""
    mount = cgroupfs.cgroup2_mount()
    sentence = the_error(run_tapwire(tapwire_bin, ["run", "--cgroup", "no-such-service-cgroup"]))
    assert sentence == (
        f'cgroup "no-such-service-cgroup" does not exist: looked for '
        f"{mount}/no-such-service-cgroup; give a directory that exists under {mount} (absolute, "
        f"or relative to it) or a glob such as /kubepods*, which may match nothing yet"), sentence


CONFIG_CASES = {
    # name: (file content, the sentence after "configuration file PATH")
    "malformed": ("selection:\n  cgroups: [svc\nlog: info\n",
                  r": did not find expected ',' or ']' at line 3 column 4, while parsing a flow "
                  r"sequence at line 2 column 12; correct that line \(the README's "
                  r"\"Configuration\" section lists every key\)"),
    "unknown key": ("selection:\n  cgroups: [svc]\nexport:\n  prometheus_lsiten: 0.0.0.0:9464\n",
                    r": export: unknown field `prometheus_lsiten`, expected one of `exporter`, "
                    r"`prometheus_listen`, `otlp` at line 4 column 3; correct that line \(the "
                    r"README's \"Configuration\" section lists every key\)"),
    "bad value": ("selection:\n  cgroups: [svc]\ncapture:\n  payload_bytes: 9000\n",
                  r": capture: payload_bytes: 9000 is out of range: expected 64..=4096 at line 4 "
                  r"column 3; correct that line \(the README's \"Configuration\" section lists "
                  r"every key\)"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_configuration_file_is_one_clear_error(tapwire_bin, tmp_path, case):
    """A malformed file, an unknown key, a bad value: the file, the key, the line, the fix."""
    text, rest = CONFIG_CASES[case]
    path = tmp_path / "tapwire.yaml"
    path.write_text(text)
    sentence = the_error(run_tapwire(tapwire_bin, ["run", "--config", str(path)]))
    assert re.fullmatch(re.escape(f"configuration file {path}") + rest, sentence), sentence
    # `tapwire config --print` reads the file the same way and says the same.
    assert the_error(run_tapwire(tapwire_bin, ["config", "--print", "--config", str(path)])) \
        == sentence


@pytest.mark.parametrize("given_by", ["--config", "TAPWIRE_CONFIG"])
def test_missing_configuration_file_is_one_clear_error(tapwire_bin, tmp_path, given_by):
    path = tmp_path / "absent.yaml"
    args, env = (["run", "--config", str(path)], {}) if given_by == "--config" else \
        (["run"], {"TAPWIRE_CONFIG": str(path)})
    sentence = the_error(run_tapwire(tapwire_bin, args, env))
    assert sentence == (f"cannot read the configuration file {path} (given by {given_by}): "
                        "No such file or directory (os error 2); check the path"), sentence


def failed_spans(metrics: str) -> float:
    """tapwire.agent.spans{state="failed"} from a /metrics scrape."""
    total = 0.0
    for line in metrics.splitlines():
        m = re.fullmatch(r'tapwire_agent_spans(?:_total)?\{([^}]*)\} (\S+)', line)
        if m and 'state="failed"' in m.group(1):
            total += float(m.group(2))
    return total


def test_unreachable_collector_is_one_warning_and_tapwire_keeps_running(
        tapwire, cgroup, fastapi_service):
    """Nothing listens at the OTLP endpoint: tapwire stays up, counts the spans it could not
    export, and logs one warning naming the endpoint and what to check, not one per export."""
    endpoint = f"http://127.0.0.1:{procs.free_port()}"  # nothing listens: connections are refused
    cg = cgroup("errors-unreachable")
    service = fastapi_service(cg, label="errors-unreachable")
    port = procs.free_port()
    agent = tapwire([str(cg)], label="tapwire-unreachable",
                    args=["--prometheus-listen", f"127.0.0.1:{port}"],
                    env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                         "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                         "OTEL_METRICS_EXPORTER": "prometheus",  # spans only: one exporter
                         "OTEL_BSP_SCHEDULE_DELAY": "200"})
    session = requests.Session()
    session.trust_env = False

    def send(n: int) -> None:
        for i in range(n):
            r = session.get(f"{service.base_url}/items/{i}", timeout=10)
            assert r.status_code == 200

    def warnings() -> list[str]:
        return [line for line in agent.stderr().splitlines() if " WARN " in line]

    def failed() -> float:
        return failed_spans(session.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)

    # The first batch fails after its 5 attempts (about 4 to 8 s of backoff).
    send(5)
    deadline = time.monotonic() + UNREACHABLE_TIMEOUT_S
    while failed() < 5:
        assert agent.running(), agent.diagnostics()
        assert time.monotonic() < deadline, \
            f"5 spans not counted as failed within {UNREACHABLE_TIMEOUT_S:.0f}s\n{agent.diagnostics()}"
        time.sleep(0.2)
    first = time.monotonic()
    # A second batch fails within the same 10 s log interval: counted, not logged again.
    send(3)
    while failed() < 8:
        assert agent.running(), agent.diagnostics()
        assert time.monotonic() < first + 9.5, \
            f"the second batch was not counted as failed within 9.5 s\n{agent.diagnostics()}"
        time.sleep(0.2)
    assert agent.running(), agent.diagnostics()
    assert len(warnings()) == 1, "\n".join(warnings())
    line = warnings()[0]
    assert re.search(
        r" WARN tapwire::export: export failed: spans could not be delivered to the OTLP "
        r"collector at " + re.escape(endpoint) + r" and are counted as failed; check that the "
        r"collector runs there and that OTEL_EXPORTER_OTLP_ENDPOINT \(or export\.otlp\.endpoint\) "
        r'names it what="spans" kind="grpc unavailable" attempts=5 items=\d ', line), line
