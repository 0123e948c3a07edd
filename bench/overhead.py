"""`cargo xtask bench`: tapwire's overhead benchmark (run it through xtask, as root).

    python bench/overhead.py --tapwire target/release/tapwire \
        --loadgen target/bench-loadgen/release/tapwire-loadgen --out target/bench [--pairs N]
        [--quick] [--only seed,nginx,rates,churn]

Runs the scenarios of scenarios.py, prints the table of report.py and writes everything it
measured to OUT/<timestamp>.json and OUT/latest.json; process logs go to OUT/<timestamp>-logs/.
Exit status: 0 when every scenario ran (whatever the targets say), 1 when one failed, 130 when
interrupted (a partial JSON is still written, latest.json is left alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import harness
import report
import scenarios
from harness import CPU_CLIENT, CPU_SERVICE, PINNING, ROOT, Harness, Interrupted
from sink import CountingReceiver

DEFAULTS = {  # pairs, run_s, warmup_s, rate_s, churn_s
    "full": dict(pairs=5, run_s=10.0, warmup_s=2.0, rate_s=15.0, churn_s=30.0),
    "quick": dict(pairs=2, run_s=5.0, warmup_s=1.0, rate_s=5.0, churn_s=10.0),
}
RATES = [1_000, 10_000, 20_000]
CHURN_RATE = 2_000


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tapwire", required=True, help="the agent binary")
    p.add_argument("--loadgen", required=True, help="bench/loadgen's binary")
    p.add_argument("--out", required=True, type=Path, help="directory for JSON and logs")
    p.add_argument("--pairs", type=int, help="runs without/with the agent per scenario "
                                             "(default 5, --quick 2)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 pairs of 5 s runs, 5 s per rate, 10 s of churn")
    p.add_argument("--only", default=",".join(scenarios.SCENARIOS),
                   help="comma-separated scenarios (default: all: %(default)s)")
    args = p.parse_args(argv)
    unknown = [s for s in args.only.split(",") if s not in scenarios.SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; "
                f"choose from {', '.join(scenarios.SCENARIOS)}")
    if args.pairs is not None and not 1 <= args.pairs <= 50:
        p.error("--pairs must be in 1..50")
    return args


def settings_from(args: argparse.Namespace) -> scenarios.Settings:
    d = DEFAULTS["quick" if args.quick else "full"]
    return scenarios.Settings(pairs=args.pairs or d["pairs"], run_s=d["run_s"],
                              warmup_s=d["warmup_s"], rates=RATES, rate_s=d["rate_s"],
                              churn_rate=CHURN_RATE, churn_s=d["churn_s"])


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def describe_environment(tapwire: str) -> dict:
    binary = Path(tapwire)
    digest = hashlib.sha256(binary.read_bytes()).hexdigest() if binary.is_file() else None
    return {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "loadavg_at_start": os.getloadavg()},
        "tree": {"commit": _run(["git", "rev-parse", "HEAD"]) or None,
                 "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))},
        "tapwire": {"binary": str(binary), "sha256": digest,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                           time.gmtime(binary.stat().st_mtime))},
        "tools": {"wrk": _run(["wrk", "-v"]).splitlines()[0] if _run(["wrk", "-v"]) else None,
                  "nginx": subprocess.run(["nginx", "-v"], capture_output=True,
                                          text=True).stderr.strip(),
                  "python": sys.version.split()[0]},
    }


def noise_summary(results: dict) -> dict | None:
    values = []
    for sc in results["scenarios"].values():
        for run in sc.get("runs", []) + ([sc["run"]] if "run" in sc else []) \
                + sc.get("partial_runs", []):
            if "other_cpu_cores" in run:
                values.append(run["other_cpu_cores"])
    if not values:
        return None
    return {"median": statistics.median(values), "max": max(values), "runs": len(values)}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    if os.geteuid() != 0:
        print("[bench] needs root: it creates cgroups and loads eBPF programs", file=sys.stderr)
        return 2
    harness.install_signal_handlers()
    harness.require_cpus(CPU_SERVICE, CPU_CLIENT)
    harness.pin_self(CPU_CLIENT)
    others = harness.foreign_agents()
    if others:
        print(f"[bench] warning: {len(others)} tapwire processes this bench did not start are "
              f"running (pids {', '.join(map(str, others))}); their syscall tracepoints slow "
              "every process, so the figures will not be those of a quiet machine",
              file=sys.stderr, flush=True)

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.out / f"{stamp}-logs"
    workdir.mkdir()
    json_path = args.out / f"{stamp}.json"
    started = time.monotonic()
    results: dict = {
        "schema": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": False,
        "options": {"pairs": settings.pairs, "quick": args.quick, "run_s": settings.run_s,
                    "warmup_s": settings.warmup_s, "rates": settings.rates,
                    "rate_s": settings.rate_s, "churn_rate": settings.churn_rate,
                    "churn_s": settings.churn_s, "scenarios": args.only.split(",")},
        "pinning": {**PINNING, "summary": f"CPU {CPU_SERVICE}: the service under test; "
                    f"CPU {CPU_CLIENT}: load generator, tapwire, OTLP receiver, this harness "
                    "(taskset)"},
        **describe_environment(args.tapwire),
        "logs": str(workdir),
        "scenarios": {},
        "notes": [],
    }
    code = 0
    sink = CountingReceiver().start()
    h = Harness(workdir)
    ctx = scenarios.Context(h, sink, args.tapwire, args.loadgen, settings)
    name = ""
    try:
        for name in args.only.split(","):
            print(f"[bench] === {name}", flush=True)
            try:
                results["scenarios"][name] = scenarios.SCENARIOS[name](ctx)
            except Exception as err:  # noqa: BLE001 (one failed scenario must not stop the rest)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                detail = traceback.format_exc()
                (workdir / f"{name}-error.txt").write_text(detail)
                print(f"[bench] {name} FAILED: {detail}", file=sys.stderr, flush=True)
                results["scenarios"][name] = {"error": f"{type(err).__name__}: {first}",
                                              "partial_runs": ctx.partial.get(name, [])}
                code = 1
        results["complete"] = True
    except (KeyboardInterrupt, Interrupted) as why:
        print(f"\n[bench] interrupted ({str(why) or 'SIGINT'}) during {name}: stopping "
              "everything", file=sys.stderr, flush=True)
        if name:
            results["scenarios"][name] = {"error": "interrupted",
                                          "partial_runs": ctx.partial.get(name, [])}
        results["notes"].append("interrupted: partial results")
        code = 130
    finally:
        problems = h.close()
        sink.stop()
        for p in problems:
            print(f"[bench] cleanup: {p}", file=sys.stderr, flush=True)
        results["notes"].extend(f"cleanup: {p}" for p in problems)
        results["took_s"] = round(time.monotonic() - started, 1)
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        results["noise"] = noise_summary(results)
        results["notes"].extend(report.derive_notes(results))
        rows = report.evaluate(results)
        results["targets"] = rows
        results["targets_summary"] = {
            "met": sum(r["met"] is True for r in rows),
            "missed": sum(r["met"] is False for r in rows),
            "not_measured": sum(r["met"] is None for r in rows)}
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        if results["complete"]:
            shutil.copyfile(json_path, args.out / "latest.json")
        print(report.render(results, rows, str(json_path)), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
