"""Load generators of the bench, on CPU_CLIENT in cgroup `load`, each bounded in time.

- wrk (closed loop, fixed connections for a fixed duration): throughput and latency at saturation;
- tapwire-loadgen (bench/loadgen, open loop): fixed request rates and connection churn, latency
  from each request's scheduled time.
"""

from __future__ import annotations

import json
import re

from harness import CPU_CLIENT, BenchError, Harness

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


def _seconds(value: str, unit: str) -> float:
    return float(value) * _UNITS_S[unit]


def parse_wrk(text: str) -> dict:
    """Requests/s, request count, latency percentiles (ms) and errors from `wrk --latency`."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in " + _DURATION, text, re.M)
    if not rps or not total:
        raise BenchError(f"cannot read wrk's output:\n{text[-2000:]}")
    latency_ms = {}
    dist = text.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pct, value, unit in re.findall(r"^\s*(\d+)%\s+" + _DURATION, dist[1], re.M):
            latency_ms[f"p{pct}"] = round(_seconds(value, unit) * 1e3, 4)
    errors = {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups())))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "elapsed_s": round(_seconds(total.group(2), total.group(3)), 3),
        "latency_ms": latency_ms,
        "socket_errors": errors,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def wrk(h: Harness, url: str, connections: int, seconds: float, label: str,
        threads: int = 1) -> dict:
    """`wrk -tT -cC -dSs --latency URL` on CPU_CLIENT; the parsed result plus its command."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "--timeout", "5s", url]
    proc = h.spawn(label, argv, "load", CPU_CLIENT)
    code = proc.wait(timeout=seconds + 30)
    if code != 0:
        raise BenchError(f"wrk exited with {code}:\n{proc.tail()}")
    result = parse_wrk(proc.output())
    result["command"] = " ".join(argv)
    return result


def loadgen(h: Harness, binary: str, port: int, path: str, rate: float, seconds: float,
            label: str, connections: int, close: bool = False) -> dict:
    """tapwire-loadgen at a fixed rate on CPU_CLIENT; its JSON summary plus its command."""
    argv = [binary, "--addr", f"127.0.0.1:{port}", "--path", path, "--rate", f"{rate:g}",
            "--duration", f"{seconds:g}", "--connections", str(connections)]
    if close:
        argv.append("--close")
    proc = h.spawn(label, argv, "load", CPU_CLIENT)
    code = proc.wait(timeout=seconds + 30)
    if code != 0:
        raise BenchError(f"tapwire-loadgen exited with {code}:\n{proc.tail()}")
    result = parse_loadgen(proc.output())
    result["command"] = " ".join(argv)
    return result


def parse_loadgen(text: str) -> dict:
    """The JSON object tapwire-loadgen prints (its last line starting with '{')."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"tapwire-loadgen printed no summary:\n{text[-2000:]}")
