"""The four measurements of `cargo xtask bench`. Each returns a JSON-ready dict: its settings,
every run, and a summary the report turns into figures and targets.

Runs come in groups, one per pair: the same service without the agent ("plain") and with it.
Within a group the order alternates, ABC then CBA, so a machine that slowly gets busier or
quieter biases neither side; every ratio is taken within one group (per-pair ratios), and the
summary is their median.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import loads
import services
from harness import Agent, Harness, NoiseMeter, Sampler, http_get
from sink import CountingReceiver, spans_since

SEED_CONNECTIONS = 16
NGINX_CONNECTIONS = 32
RATE_CONNECTIONS = 64
CHURN_CONNECTIONS = 8
# After `capture ready`, before the load starts: the agent's first selection scan and start-up
# allocations are not what a service pays per request.
SETTLE_S = 0.5
SDK_SERVICE = "bench-seed-sdk"


@dataclass
class Settings:
    pairs: int
    run_s: float
    warmup_s: float
    rates: list[int]
    rate_s: float
    churn_rate: int
    churn_s: float


@dataclass
class Context:
    h: Harness
    sink: CountingReceiver
    tapwire: str
    loadgen: str
    settings: Settings
    _services: dict[str, services.Service] = field(default_factory=dict)
    # Runs of the scenario in progress, by scenario: what the JSON keeps when it fails or is
    # interrupted halfway.
    partial: dict[str, list[dict]] = field(default_factory=dict)

    def service(self, name: str, start: Callable[[], services.Service]) -> services.Service:
        """A service shared by the scenarios, started on first use."""
        if name not in self._services or not self._services[name].proc.alive():
            self._services[name] = start()
        return self._services[name]

    def nginx(self) -> services.Service:
        return self.service("nginx", lambda: services.start_nginx(self.h, "nginx"))


def stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": [round(v, 5) for v in values]}


def measure(ctx: Context, label: str, load: Callable[[], dict], watch: list[Path] | None,
            exporter_env: dict[str, str] | None, sample_rss: bool = False) -> dict:
    """One run: optionally start tapwire watching `watch`, run `load`, measure the agent over the
    load's window, stop the agent. Every path out stops the agent."""
    record: dict = {"label": label}
    spans_before = ctx.sink.span_counts()
    agent = None
    try:
        if watch:
            agent = Agent(ctx.h, ctx.tapwire, watch, f"tapwire-{label}", exporter_env)
            time.sleep(SETTLE_S)
            start = agent.usage()
            t0 = time.monotonic()
        sampler = Sampler(lambda: agent.usage()["rss_bytes"]) if agent and sample_rss else None
        with NoiseMeter(ctx.h, {agent.pid} if agent else set()) as noise:
            if sampler:
                with sampler:
                    record["load"] = load()
            else:
                record["load"] = load()
        record["other_cpu_cores"] = round(noise.other_cores, 3)
        record["bench_cpu_cores"] = noise.bench_cores
        record["foreign_agents"] = noise.foreign_agents
        if agent:
            end = agent.usage()
            wall = time.monotonic() - t0
            cpu_s = end["cpu_s"] - start["cpu_s"]
            record["agent"] = {
                "ready_s": round(agent.ready_s, 3),
                "window_s": round(wall, 3),
                "cpu_s": round(cpu_s, 3),
                "cpu_s_live_threads_schedstat": round(
                    end["cpu_s_live_threads_schedstat"] - start["cpu_s_live_threads_schedstat"], 4),
                "cores": round(cpu_s / wall, 4),
                "rss_start_bytes": start["rss_bytes"],
                "rss_end_bytes": end["rss_bytes"],
                "rss_max_sampled_bytes": max(sampler.samples, default=0) if sampler else None,
                "hwm_bytes": end["hwm_bytes"],
                "bpf": agent.bpf_memory(),
            }
    finally:
        if agent:
            stopped = agent.stop()
            record.setdefault("agent", {})["exit"] = stopped
    if agent:
        record["spans_received"] = spans_since(spans_before, ctx.sink.span_counts(),
                                               exclude=(SDK_SERVICE,))
    return record


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _describe(run: dict) -> str:
    load = run["load"]
    p99 = load.get("latency_ms", {}).get("p99")
    text = f"{load['rps']:.0f} req/s" + (f", p99 {p99:.2f} ms" if p99 is not None else "")
    agent = run.get("agent")
    if agent and "cores" in agent:
        text += f"; agent {agent['cores'] * 1000:.0f} mcores"
    return text + f"; other load {run['other_cpu_cores']:.2f} cores"


def _orders(pair: int, variants: tuple[str, ...]) -> tuple[str, ...]:
    return variants if pair % 2 == 0 else tuple(reversed(variants))


def _pair_ratios(runs: list[dict], variant: str, metric: Callable[[dict], float | None],
                 base: str = "plain") -> list[float]:
    by_pair: dict[int, dict[str, dict]] = {}
    for run in runs:
        by_pair.setdefault(run["pair"], {})[run["variant"]] = run
    ratios = []
    for pair in sorted(by_pair):
        group = by_pair[pair]
        if variant in group and base in group:
            num, den = metric(group[variant]), metric(group[base])
            if num is not None and den:
                ratios.append(num / den)
    return ratios


def _rps(run: dict) -> float:
    return run["load"]["rps"]


def _p99(run: dict) -> float | None:
    return run["load"].get("latency_ms", {}).get("p99")


def _medians(runs: list[dict], variant: str) -> dict:
    mine = [r for r in runs if r["variant"] == variant]
    return {"rps": stats([_rps(r) for r in mine]), "p99_ms": stats([_p99(r) for r in mine]),
            "other_cpu_cores": stats([r["other_cpu_cores"] for r in mine])}


# ---- 1. the seed service: tapwire vs the OpenTelemetry SDK ------------------------------------

def seed(ctx: Context) -> dict:
    s, h = ctx.settings, ctx.h
    plain = services.start_seed(h, "seed", "bench-seed")
    sdk = services.start_seed(h, "seed-sdk", SDK_SERVICE, sdk_env=ctx.sink.grpc_env())
    for svc in (plain, sdk):
        loads.wrk(h, svc.url("/work"), SEED_CONNECTIONS, s.warmup_s, f"warmup-{svc.name}")
    runs = ctx.partial.setdefault("seed", [])
    for pair in range(s.pairs):
        for variant in _orders(pair, ("plain", "tapwire", "sdk")):
            svc = sdk if variant == "sdk" else plain
            label = f"seed-{variant}-{pair}"
            run = measure(
                ctx, label,
                lambda svc=svc, label=label: loads.wrk(h, svc.url("/work"), SEED_CONNECTIONS,
                                                       s.run_s, f"wrk-{label}"),
                watch=[plain.cgroup] if variant == "tapwire" else None,
                exporter_env=ctx.sink.grpc_env())
            run.update(variant=variant, pair=pair)
            runs.append(run)
            _log(f"seed pair {pair + 1}/{s.pairs} {variant:8} {_describe(run)}")
    work = {}
    for svc in (plain, sdk):
        try:
            work[svc.name] = json.loads(http_get(svc.port, "/stats")[1])
        except (OSError, ValueError) as err:
            work[svc.name] = {"error": str(err)}
    thr = stats(_pair_ratios(runs, "tapwire", _rps))
    sdk_thr = stats(_pair_ratios(runs, "sdk", _rps))
    return {
        "settings": {"service": "uvicorn (1 worker, h11, asyncio) + bench/apps/seed.py GET /work",
                     "load": f"wrk -t1 -c{SEED_CONNECTIONS} -d{s.run_s:g}s --latency",
                     "tapwire": "OTLP/gRPC to the bench's receiver",
                     "sdk": "opentelemetry-instrument (distro 0.66b2, FastAPI instrumentation, "
                            "SDK 1.45.2), OTLP/gRPC traces + metrics to the same receiver",
                     "pairs": s.pairs, "run_s": s.run_s, "order": "plain,tapwire,sdk then reversed"},
        "work_per_request": work,
        "runs": runs,
        "summary": {
            "plain": _medians(runs, "plain"),
            "tapwire": _medians(runs, "tapwire"),
            "sdk": _medians(runs, "sdk"),
            "tapwire_throughput_ratio": thr,
            "tapwire_p99_ratio": stats(_pair_ratios(runs, "tapwire", _p99)),
            "sdk_throughput_ratio": sdk_thr,
            "sdk_p99_ratio": stats(_pair_ratios(runs, "sdk", _p99)),
            "tapwire_loss": 1 - thr["median"] if thr else None,
            "sdk_loss": 1 - sdk_thr["median"] if sdk_thr else None,
            "sdk_spans_received": ctx.sink.span_counts().get(SDK_SERVICE, 0),
        },
    }


# ---- 2 + 3. nginx at saturation: selected, and as a neighbour ---------------------------------

def nginx(ctx: Context) -> dict:
    s, h = ctx.settings, ctx.h
    ngx = ctx.nginx()
    idle = ctx.service("idle", lambda: services.start_idle(h, "idle"))
    url = ngx.url(f"/{services.STATIC_FILE}")
    loads.wrk(h, url, NGINX_CONNECTIONS, s.warmup_s, "warmup-nginx")
    runs = ctx.partial.setdefault("nginx", [])
    for pair in range(s.pairs):
        for variant in _orders(pair, ("plain", "selected", "neighbour")):
            label = f"nginx-{variant}-{pair}"
            watch = {"plain": None, "selected": [ngx.cgroup], "neighbour": [idle.cgroup]}[variant]
            run = measure(ctx, label,
                          lambda label=label: loads.wrk(h, url, NGINX_CONNECTIONS, s.run_s,
                                                        f"wrk-{label}"),
                          watch=watch, exporter_env=None)
            run.update(variant=variant, pair=pair)
            runs.append(run)
            _log(f"nginx pair {pair + 1}/{s.pairs} {variant:9} {_describe(run)}")
    return {
        "settings": {"service": f"nginx, 1 worker, {services.STATIC_BYTES} B static file, "
                                "keep-alive, sendfile on, access_log off",
                     "load": f"wrk -t1 -c{NGINX_CONNECTIONS} -d{s.run_s:g}s --latency",
                     "tapwire": "--exporter none (spans built, then discarded: the receiver would "
                                "otherwise compete with wrk for CPU 1)",
                     "neighbour": "tapwire watches only an idle service's cgroup (python "
                                  "http.server), not nginx's",
                     "pairs": s.pairs, "run_s": s.run_s,
                     "order": "plain,selected,neighbour then reversed"},
        "runs": runs,
        "summary": {
            "plain": _medians(runs, "plain"),
            "selected": _medians(runs, "selected"),
            "neighbour": _medians(runs, "neighbour"),
            "selected_throughput_ratio": stats(_pair_ratios(runs, "selected", _rps)),
            "neighbour_throughput_ratio": stats(_pair_ratios(runs, "neighbour", _rps)),
            "selected_p99_ratio": stats(_pair_ratios(runs, "selected", _p99)),
        },
    }


# ---- 4. agent cost at fixed rates -------------------------------------------------------------

def _agent_figures(run: dict) -> dict:
    """Per-run figures of an agent run at a fixed rate: CPU per 10k requests, memory, losses."""
    agent, load = run["agent"], run["load"]
    completed = load["completed"]
    counters = (agent.get("exit") or {}).get("counters") or {}
    cpu_ms_per_10k = agent["cpu_s"] * 1000 / (completed / 10_000) if completed else None
    return {
        "target_rps": load["target_rps"],
        "achieved_rps": load["achieved_rps"],
        "completed": completed,
        "client_errors": load["errors"] + load["unsent"] + load["non_2xx"],
        "latency_us": load["latency_us"],
        "agent_cores": agent["cores"],
        # CPU milliseconds per 10k requests: numerically the agent's millicores at 10k req/s.
        "agent_cpu_ms_per_10k_requests": cpu_ms_per_10k,
        "rss_start_bytes": agent["rss_start_bytes"],
        "rss_end_bytes": agent["rss_end_bytes"],
        "rss_max_sampled_bytes": agent["rss_max_sampled_bytes"],
        "hwm_bytes": agent["hwm_bytes"],
        "bpf_map_bytes": agent["bpf"]["map_bytes"],
        "bpf_ringbuf_bytes": agent["bpf"]["ringbuf_bytes"],
        "bpf_program_bytes": agent["bpf"]["program_bytes"],
        "events_read": counters.get("events_read"),
        "events_lost": counters.get("events_lost"),
        "spans_created": counters.get("spans_created"),
        "spans_dropped": counters.get("spans_dropped"),
        "spans_failed": counters.get("spans_failed"),
        "spans_received": run.get("spans_received"),
        "agent_exit_code": (agent.get("exit") or {}).get("exit_code"),
    }


def rates(ctx: Context) -> dict:
    s, h = ctx.settings, ctx.h
    ngx = ctx.nginx()
    out = ctx.partial.setdefault("rates", [])
    for rate in s.rates:
        label = f"rate-{rate}"
        run = measure(ctx, label,
                      lambda rate=rate, label=label: loads.loadgen(
                          h, ctx.loadgen, ngx.port, f"/{services.STATIC_FILE}", rate, s.rate_s,
                          f"loadgen-{label}", RATE_CONNECTIONS),
                      watch=[ngx.cgroup], exporter_env=ctx.sink.grpc_env(), sample_rss=True)
        run["figures"] = _agent_figures(run)
        out.append(run)
        f = run["figures"]
        per10k = f["agent_cpu_ms_per_10k_requests"]
        _log(f"rate {rate:>6} req/s: achieved {f['achieved_rps']:.0f}, agent "
             f"{f['agent_cores'] * 1000:.0f} mcores"
             + (f" = {per10k:.1f} ms CPU / 10k req" if per10k is not None else "")
             + f", RSS peak {f['hwm_bytes'] / 2**20:.1f} MiB, events lost {f['events_lost']}"
             + f"; other load {run['other_cpu_cores']:.2f} cores")
    return {
        "settings": {"service": "the same nginx (CPU 0)",
                     "load": f"tapwire-loadgen (open loop, {RATE_CONNECTIONS} keep-alive "
                             f"connections) for {s.rate_s:g} s per rate",
                     "tapwire": "watching nginx, OTLP/gRPC to the bench's receiver; a fresh "
                                "agent per rate",
                     "cpu": "utime+stime of /proc/<tapwire>/stat over the load window "
                            "(user space only: the eBPF programs run inside nginx's syscalls on "
                            "CPU 0 and are charged to nginx)",
                     "memory": "VmRSS at start/end and sampled every 0.25 s, VmHWM; eBPF memlock "
                               "of the maps and programs whose fds tapwire holds "
                               "(/proc/<tapwire>/fdinfo)",
                     "losses": "events_lost of tapwire's exit log line (ring buffer full)"},
        "runs": out,
    }


# ---- 5. connection churn ----------------------------------------------------------------------

def churn(ctx: Context) -> dict:
    s, h = ctx.settings, ctx.h
    ngx = ctx.nginx()
    run = measure(ctx, "churn",
                  lambda: loads.loadgen(h, ctx.loadgen, ngx.port, f"/{services.STATIC_FILE}",
                                        s.churn_rate, s.churn_s, "loadgen-churn",
                                        CHURN_CONNECTIONS, close=True),
                  watch=[ngx.cgroup], exporter_env=ctx.sink.grpc_env(), sample_rss=True)
    run["figures"] = _agent_figures(run)
    f = run["figures"]
    _log(f"churn {s.churn_rate} conn/s for {s.churn_s:g} s: {f['completed']} requests, RSS "
         f"{f['rss_start_bytes'] / 2**20:.1f} -> {f['rss_end_bytes'] / 2**20:.1f} MiB, events "
         f"lost {f['events_lost']}, spans {f['spans_received']}")
    return {
        "settings": {"service": "the same nginx (CPU 0)",
                     "load": f"tapwire-loadgen --close: {s.churn_rate} new connections/s, one "
                             f"request each (Connection: close), {s.churn_s:g} s, "
                             f"{CHURN_CONNECTIONS} workers",
                     "tapwire": "watching nginx, OTLP/gRPC to the bench's receiver"},
        "run": run,
    }


SCENARIOS: dict[str, Callable[[Context], dict]] = {
    "seed": seed,
    "nginx": nginx,
    "rates": rates,
    "churn": churn,
}
