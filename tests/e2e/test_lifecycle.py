"""Start and stop: what tapwire leaves behind it, after SIGTERM and after kill -9.

Attachments are file descriptors owned by the agent, so the kernel frees every program when the
process goes away, however it goes away, with one exception: the propagation sockhash is pinned
in bpffs (agent/src/capture/pin.rs), so that the connections in it lose no received data, and it
keeps its two message programs until no connection is left in it and a tapwire removes the pin:
the agent itself at a clean stop, or the next one on the node. This checks it with bpftool.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

import cgroupfs
import procs
from procs import loaded_programs, pin_of, programs_of, wait_until_only, wait_until_unloaded

# Program names as bpftool shows them (from BTF, so not cut to 15 characters).
HOOKS = [
    "sys_enter_read", "sys_exit_read", "sys_enter_write", "sys_exit_write",
    "sys_enter_readv", "sys_exit_readv", "sys_enter_writev", "sys_exit_writev",
    "sys_enter_recvfrom", "sys_exit_recvfrom", "sys_enter_sendto", "sys_exit_sendto",
    "sys_enter_recvmsg", "sys_exit_recvmsg", "sys_enter_sendmsg", "sys_exit_sendmsg",
    "sys_enter_sendfile64", "sys_exit_sendfile64", "sys_enter_close",
    "sock_send_length", "sock_recv_length", "inet_sock_set_state",
    "tcp_retransmit_skb", "tcp_send_reset", "tcp_receive_reset", "tcp_destroy_sock",
    # Context propagation (on by default): sock_ops on the cgroup, sk_msg and sk_skb on its sockhash.
    "client_sockets", "inject_traceparent", "client_receive",
]
# What the pinned sockhash keeps loaded after a kill -9, until the next tapwire removes its pin.
PINNED = {"inject_traceparent", "client_receive"}


def start_agent(tapwire_bin, cgroup_path, tmp_path, label) -> tuple[procs.TapwireProcess, set[int]]:
    """Starts tapwire and returns it with the ids of its programs, checking every hook is there
    exactly once (other agents may run on a developer's machine: only this one's count)."""
    agent = procs.TapwireProcess(tapwire_bin, [str(cgroup_path)],
                                 procs.base_env({"TAPWIRE_EXPORTER": "none"}), tmp_path, label=label)
    agent.start()
    try:
        ids = programs_of(agent.pid)
        loaded = loaded_programs()
        names = sorted(loaded.get(i, "?") for i in ids)
        assert names == sorted(HOOKS), f"expected every hook loaded once, got {names}"
    except BaseException:
        agent.kill()  # never leave an agent attached behind a failed check
        raise
    return agent, ids


def test_sigterm_detaches_everything(tapwire_bin, cgroup, tmp_path):
    agent, ids = start_agent(tapwire_bin, cgroup("lifecycle-term"), tmp_path, "tapwire-term")
    pin = pin_of(agent)
    assert pin is not None and pin.exists(), agent.diagnostics()
    assert agent.stop() == 0, agent.diagnostics()
    left = wait_until_unloaded(ids)
    assert left == {}, f"programs still loaded after SIGTERM: {sorted(left.values())}"
    assert not pin.exists(), "the sockhash pin outlived a clean stop with no connection in it"


def test_kill_9_leaves_only_the_pinned_sockhash_until_the_next_agent(tapwire_bin, cgroup, tmp_path):
    cg = cgroup("lifecycle-kill")
    agent, ids = start_agent(tapwire_bin, cg, tmp_path, "tapwire-kill")
    pin = pin_of(agent)
    assert pin is not None, agent.diagnostics()
    agent.proc.send_signal(signal.SIGKILL)
    assert agent.proc.wait(10) == -signal.SIGKILL
    left = wait_until_only(ids, PINNED)
    assert sorted(left.values()) == sorted(PINNED), f"after kill -9: {sorted(left.values())}"
    assert pin.exists()
    # `tapwire check` tells the operator what is pinned.
    check = subprocess.run([tapwire_bin, "check"], capture_output=True, text=True, timeout=120,
                           env=procs.base_env({}))
    line = re.search(r"^\[ok  \] bpffs\s+mounted at /sys/fs/bpf; (\d+) sockhash\(es\) pinned", check.stdout, re.M)
    assert line and int(line.group(1)) >= 1, check.stdout
    # The next agent finds the sockhash empty and removes it, which frees the rest.
    second, second_ids = start_agent(tapwire_bin, cg, tmp_path, "tapwire-kill-next")
    try:
        left = wait_until_unloaded(ids)
        assert left == {}, f"the first agent's programs outlived the next agent's start: {sorted(left.values())}"
        assert not pin.exists()
        assert "removed the sockhash a stopped tapwire left pinned" in second.stderr()
    finally:
        assert second.stop() == 0, second.diagnostics()
    assert wait_until_unloaded(second_ids) == {}


# ---- kill -9 under load, then a restart on the same connections ---------------------------------

CLIENT_APP = procs.APPS_DIR / "keepalive_client.py"
CONNECTIONS = 4
# Span timing: the kernel timestamps lie inside the client's window around each request (1 ms
# covers clock conversions), and a SERVER span covers at least the handler's sleep.
TIMING_TOLERANCE_NS = 1_000_000
WALL_CLOCK_TOLERANCE_NS = 100_000_000
# A request in flight across the restart: long enough for the new agent to be ready before
# the answer (agent start-up takes a few seconds on a busy 2-CPU machine).
IN_FLIGHT_DELAY_MS = 12_000


class KeepAliveClient:
    """apps/keepalive_client.py in a watched cgroup: kept-alive connections, commands on stdin."""

    def __init__(self, cgroup_path, port: int, log_dir):
        self.stderr_path = log_dir / "keepalive-client.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = cgroupfs.popen_in_cgroup(
                cgroup_path, [sys.executable, str(CLIENT_APP), "--port", str(port),
                              "--connections", str(CONNECTIONS)],
                env=procs.base_env({"PYTHONUNBUFFERED": "1"}), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True)
        self._lines: "queue.Queue[dict]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self._next(30)
        assert ready.get("ready"), ready
        self.local_ports = ready["local_ports"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(json.loads(line))

    def _next(self, timeout: float) -> dict:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the client said nothing in {timeout} s; stderr:\n"
                                 f"{procs.tail(self.stderr_path)}") from None

    def send(self, **command) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def results(self, tags: set[str], timeout: float) -> dict[str, list[dict]]:
        """Waits for the results of the commands `tags` (in any order)."""
        out, deadline = {}, time.monotonic() + timeout
        while set(out) != tags:
            line = self._next(max(0.1, deadline - time.monotonic()))
            out[line["tag"]] = line["results"]
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def check_span(span: dict, sent: dict, port: int) -> list[str]:
    """What is wrong with `span` as the span of request `sent` (empty: nothing)."""
    a, problems = span["attributes"], []
    expect = {"http.request.method": "GET", "http.response.status_code": sent["expected_status"]}
    if span["kind_name"] == "SERVER":
        expect.update({"url.path": sent["path"], "http.route": "/items/{id}"})
    else:
        expect["url.full"] = f"http://127.0.0.1:{port}{sent['path']}?REDACTED"
    # The client's end of the connection, when the agent knows the connection's addresses.
    port_key = "network.peer.port" if span["kind_name"] == "SERVER" else "network.local.port"
    if port_key in a:
        expect[port_key] = sent["local_port"]
    for key, value in expect.items():
        if a.get(key) != value:
            problems.append(f"{key}={a.get(key)!r}, expected {value!r}")
    want_status = "ERROR" if sent["expected_status"] >= 500 else "UNSET"
    if span["status_name"] != want_status:
        problems.append(f"status {span['status_name']}, expected {want_status}")
    client_ns = sent["end_ns"] - sent["start_ns"]
    if not sent["delay_ms"] * 1_000_000 <= span["duration_ns"] <= client_ns + TIMING_TOLERANCE_NS:
        problems.append(f"duration {span['duration_ns']} ns outside [{sent['delay_ms']} ms, "
                        f"client's {client_ns} ns]")
    if not (sent["start_ns"] - WALL_CLOCK_TOLERANCE_NS <= span["start_ns"]
            and span["end_ns"] <= sent["end_ns"] + WALL_CLOCK_TOLERANCE_NS):
        problems.append("outside the client's wall-clock window")
    return problems


def spans_by_request(spans: list[dict], sent: list[dict]) -> tuple[dict, list[dict]]:
    """Path of the client's requests (unique ids) -> their spans; and spans matching none."""
    matched, stray = {r["path"]: [] for r in sent}, []
    for span in spans:
        a = span["attributes"]
        path = (a.get("url.path") if span["kind_name"] == "SERVER"
                else urllib.parse.urlsplit(a.get("url.full", "")).path)
        (matched[path] if path in matched else stray).append(span)
    return matched, stray


@pytest.mark.parametrize("propagation", ["off", "headers"])
def test_kill_9_under_load_and_restart(tapwire_bin, cgroup, fastapi_service, otlp_receiver,
                                       tmp_path, attach_log, propagation):
    """kill -9 of tapwire while a watched client sends 600 requests over 4 kept-alive
    connections to a watched service: no request fails, no program stays loaded. A new tapwire
    then starts with those connections still open, one request in flight on one of them and
    requests going on over the others: every span it makes for requests on the old connections
    is right (method, route, status, duration within the client's measurement), every request
    that starts once it is ready gets its SERVER and CLIENT span, the in-flight request gets
    none (its start was never seen), and nothing else is emitted."""
    env = procs.base_env({**otlp_receiver.exporter_env("grpc"),
                          "TAPWIRE_CONTEXT_PROPAGATION": propagation})
    svc_cg, cli_cg = cgroup("kill-svc"), cgroup("kill-cli")
    service = fastapi_service(svc_cg, label="kill-svc")
    agents = []

    def start_agent(label: str) -> procs.TapwireProcess:
        agent = procs.TapwireProcess(tapwire_bin, [str(svc_cg), str(cli_cg)], env, tmp_path,
                                     label=label)
        attach_log(f"{label} logs", agent.diagnostics)
        agents.append(agent)
        return agent.start()

    client = None
    try:
        first = start_agent("tapwire-first")
        first_programs = programs_of(first.pid)
        client = KeepAliveClient(cli_cg, service.port, tmp_path)
        attach_log("keepalive client stderr", lambda: procs.tail(client.stderr_path))

        # 1. Load over the kept-alive connections; kill -9 the agent in the middle of it.
        client.send(tag="load", connections=list(range(CONNECTIONS)), count=600, rate=100,
                    first_id=1, delay_ms=[0, 2, 5], status_every=7)
        time.sleep(3)
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(10) == -signal.SIGKILL
        killed_at = time.time_ns()
        load = client.results({"load"}, timeout=60)["load"]
        errors = [r for r in load if r["error"] or r["status"] != r["expected_status"]]
        assert errors == [], f"{len(errors)} of {len(load)} requests failed: {errors[:5]}"
        assert load[0]["start_ns"] < killed_at < load[-1]["end_ns"], "the kill missed the load"
        pinned = PINNED if propagation == "headers" else set()
        left = wait_until_only(first_programs, pinned)
        assert sorted(left.values()) == sorted(pinned), f"loaded after kill -9: {sorted(left.values())}"

        # 2. A new agent starts with one request in flight on connection 0 and requests
        # going on over connections 1-3 (5 per second: also keeping them from idling out),
        # before, during and after its start-up.
        otlp_receiver.clear()
        client.send(tag="in-flight", connections=[0], count=1, first_id=5000,
                    delay_ms=[IN_FLIGHT_DELAY_MS])
        client.send(tag="across", connections=[1, 2, 3], count=IN_FLIGHT_DELAY_MS // 200 + 15,
                    rate=5, first_id=6000, delay_ms=[0, 3, 10], status_every=4)
        time.sleep(0.5)
        second = start_agent("tapwire-second")
        ready_at = time.time_ns()
        second_programs = programs_of(second.pid)
        results = client.results({"in-flight", "across"}, timeout=IN_FLIGHT_DELAY_MS / 1000 + 60)
        in_flight = results["in-flight"][0]
        assert in_flight["end_ns"] > ready_at, \
            "the new agent was not ready before the in-flight request ended: raise its delay"
        assert results["across"][-1]["start_ns"] > ready_at + 2_000_000_000, \
            "the requests across the restart ended too early"

        # 3. The connection that had the request in flight, once its answer came.
        client.send(tag="after-0", connections=[0], count=10, first_id=7000, delay_ms=[1],
                    status_every=3)
        results.update(client.results({"after-0"}, timeout=30))
        sent = [in_flight] + results["across"] + results["after-0"]
        errors = [r for r in sent if r["error"] or r["status"] != r["expected_status"]]
        assert errors == [], errors
        assert set(r["local_port"] for r in sent) == set(client.local_ports), \
            "a connection was reopened: the test must run on connections opened before"

        time.sleep(2)  # the exporter's schedule delay is 200 ms
        # The connections close, which empties the first agent's sockhash: the second agent
        # removes its pin (on its 5 s round, or at its stop), and its own at its clean stop.
        client.close()
        assert second.stop() == 0, second.diagnostics()
        left = wait_until_unloaded(first_programs | second_programs)
        assert left == {}, f"loaded after the connections closed and tapwire stopped: {sorted(left.values())}"
        pins = [pin_of(a) for a in agents]
        assert not [p for p in pins if p is not None and p.exists()], pins
    finally:
        if client is not None:
            client.close()
        for agent in agents:
            agent.kill()

    matched, stray = spans_by_request(otlp_receiver.spans(), sent)
    assert stray == [], f"spans for no request sent after the restart: {stray[:3]}"
    problems = {}
    for r in sent:
        spans = matched[r["path"]]
        kinds = sorted(s["kind_name"] for s in spans)
        if kinds not in ([], ["SERVER"], ["CLIENT"], ["CLIENT", "SERVER"]):
            problems[r["path"]] = [f"spans {kinds}"]
        for span in spans:
            wrong = check_span(span, r, service.port)
            if wrong:
                problems.setdefault(r["path"], []).append(f"{span['kind_name']}: {wrong}")
    assert problems == {}, f"wrong spans after the restart: {problems}"
    assert matched[in_flight["path"]] == [], \
        "the request in flight across the restart got a span"
    later = [r for r in results["across"] + results["after-0"] if r["start_ns"] > ready_at]
    with_spans = {kind: sum(1 for r in later if any(s["kind_name"] == kind for s in
                                                    matched[r["path"]]))
                  for kind in ("SERVER", "CLIENT")}
    # Capture is attached before `capture ready`: what starts later is seen whole.
    assert with_spans == {"SERVER": len(later), "CLIENT": len(later)}, with_spans
    print(f"propagation {propagation}: {len(load)} requests across kill -9, 0 failed; "
          f"{len(sent)} requests on old connections around the restart, all spans correct; "
          f"of the {len(later)} sent once the new agent was ready, {with_spans} got spans")
