"""Unprivileged tests of the bench's parsers, statistics and verdicts (no root, no processes):

    .venv/bin/python -m pytest bench -q
"""

import math

import harness
import loads
import report
import scenarios

WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:18080/f.txt
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.16ms    3.37ms  40.82ms   91.83%
    Req/Sec    23.60k    14.85k   56.85k    78.00%
  Latency Distribution
     50%  691.00us
     75%    2.67ms
     90%    4.90ms
     99%    1.02s
  117519 requests in 5.02s, 84.17MB read
  Socket errors: connect 0, read 2, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:  23396.26
Transfer/sec:     16.76MB
"""


def test_parse_wrk():
    r = loads.parse_wrk(WRK_OUTPUT)
    assert r["rps"] == 23396.26
    assert r["requests"] == 117519
    assert r["elapsed_s"] == 5.02
    assert r["latency_ms"] == {"p50": 0.691, "p75": 2.67, "p90": 4.9, "p99": 1020.0}
    assert r["socket_errors"] == {"connect": 0, "read": 2, "write": 0, "timeout": 12}
    assert r["non_2xx"] == 5


def test_parse_wrk_rejects_garbage():
    try:
        loads.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
    except harness.BenchError:
        return
    raise AssertionError("accepted wrk output without a result")


def test_parse_loadgen_takes_the_json_line():
    r = loads.parse_loadgen('$ tapwire-loadgen ...\n{"completed": 3, "achieved_rps": 1.5}\n')
    assert r == {"completed": 3, "achieved_rps": 1.5}


def test_exit_counters_from_the_stopped_line():
    log = (
        "2026-11-24T17:14:14Z  INFO tapwire::app: capture ready cgroups=1 hooks=25\n"
        "\x1b[2m2026-11-24T17:14:19Z\x1b[0m \x1b[32m INFO\x1b[0m tapwire::app: stopped "
        "events_read=101643 events_lost=7 spans_created=33860 spans_exported=0 "
        "spans_failed=0 spans_dropped=2\n")
    assert harness.parse_exit_counters(log) == {
        "events_read": 101643, "events_lost": 7, "spans_created": 33860,
        "spans_exported": 0, "spans_failed": 0, "spans_dropped": 2}
    assert harness.parse_exit_counters("INFO capture ready\n") is None


def _run(variant, pair, rps, p99):
    return {"variant": variant, "pair": pair, "load": {"rps": rps, "latency_ms": {"p99": p99}},
            "other_cpu_cores": 0.0}


def test_ratios_are_taken_within_each_pair():
    runs = [_run("plain", 0, 100, 10), _run("tapwire", 0, 99, 10.1),
            _run("tapwire", 1, 50, 20), _run("plain", 1, 52, 19)]
    ratios = scenarios._pair_ratios(runs, "tapwire", scenarios._rps)
    assert [round(r, 4) for r in ratios] == [0.99, round(50 / 52, 4)]
    st = scenarios.stats(ratios)
    assert st["min"] == 50 / 52 and st["max"] == 0.99
    assert scenarios.stats([]) is None
    assert scenarios._orders(0, ("a", "b", "c")) == ("a", "b", "c")
    assert scenarios._orders(1, ("a", "b", "c")) == ("c", "b", "a")


def _seed_results(tapwire_ratio, sdk_ratio):
    def st(v):
        return {"median": v, "min": v, "max": v, "values": [v]}
    return {"scenarios": {"seed": {"summary": {
        "tapwire_throughput_ratio": st(tapwire_ratio), "tapwire_p99_ratio": st(1.0),
        "sdk_throughput_ratio": st(sdk_ratio), "sdk_p99_ratio": st(1.5),
        "tapwire_loss": 1 - tapwire_ratio, "sdk_loss": 1 - sdk_ratio}}}}


def _row(rows, key):
    return next(r for r in rows if r["id"] == key)


def test_loss_against_the_sdk():
    rows = report.evaluate(_seed_results(0.98, 0.70))  # 2% vs 30%: 15x less
    assert _row(rows, "seed.throughput_ratio")["met"] is False
    loss = _row(rows, "seed.loss_vs_sdk")
    assert loss["met"] is True and math.isclose(loss["value"], 15.0)
    assert _row(report.evaluate(_seed_results(0.90, 0.70)), "seed.loss_vs_sdk")["met"] is False
    # No measurable tapwire loss: met; no measurable SDK loss: nothing to compare.
    assert _row(report.evaluate(_seed_results(1.01, 0.70)), "seed.loss_vs_sdk")["met"] is True
    assert _row(report.evaluate(_seed_results(0.99, 1.00)), "seed.loss_vs_sdk")["met"] is None


def test_a_failed_scenario_is_not_measured_not_met():
    rows = report.evaluate({"scenarios": {"nginx": {"error": "BenchError: wrk exited with 1"}}})
    assert [r["met"] for r in rows] == [None, None]
    assert all("not measured" in r["shown"] for r in rows)


def test_rate_rows_and_verdicts():
    figures = {"target_rps": 20000, "achieved_rps": 19990.0, "agent_cores": 0.05,
               "agent_cpu_ms_per_10k_requests": 25.0, "hwm_bytes": 70 * 2**20,
               "rss_start_bytes": 1, "rss_end_bytes": 2, "bpf_map_bytes": 3,
               "events_lost": 0, "events_read": 60000}
    rows = report.evaluate({"scenarios": {"rates": {"runs": [{"figures": figures}]}}})
    assert _row(rows, "rates.20000.cpu_ms_per_10k")["met"] is True
    assert _row(rows, "rates.20000.rss_peak")["met"] is False
    assert _row(rows, "rates.20000.events_lost")["met"] is True
