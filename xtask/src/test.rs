//! `cargo xtask test`: the one command that runs every test (and the command CI runs).
//!
//! setup -> `cargo test --release --workspace` -> release build -> end-to-end suite (pytest, as
//! root, against the built agent). A failing unit-test step does not stop the build and the
//! end-to-end suite, so one run reports everything; the exit status is non-zero if any step failed.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    build::{self, Profile},
    process::{display, log, run},
    setup, workspace,
};

const TAG: &str = "test";

/// pytest's exit status when it collected no test.
const PYTEST_NO_TESTS: i32 = 5;

/// Fuzz targets under agent/fuzz and how long CI runs each (seconds).
const FUZZ_TARGETS: &[(&str, u32)] = &[
    ("http1_stream", 60),
    ("correlator", 30),
    ("event_decode", 20),
    ("http1_head", 20),
    ("traceparent", 10),
    ("route", 15),
    ("proc_files", 20),
];

pub struct Options {
    pub unit: bool,
    pub e2e: bool,
    /// Run the fuzz targets for their bounded time.
    pub fuzz: bool,
    /// pytest `-k` expression.
    pub keyword: Option<String>,
    /// Extra arguments for pytest (after `--`).
    pub pytest_args: Vec<String>,
}

struct Step {
    name: String,
    took: Duration,
    ok: bool,
}

pub fn test(opts: Options) -> Result<()> {
    if opts.e2e && !workspace::is_root() {
        bail!(
            "the end-to-end tests load eBPF programs and need root: run `sudo -E cargo xtask test` \
             (or `cargo xtask test --unit-only` for the unprivileged tests alone)"
        );
    }
    let total = Instant::now();
    let mut steps = Vec::new();
    let result = run_steps(&opts, &mut steps);
    summary(&steps, total.elapsed());
    let failed: Vec<&str> = steps
        .iter()
        .filter(|s| !s.ok)
        .map(|s| s.name.as_str())
        .collect();
    result?;
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

fn run_steps(opts: &Options, steps: &mut Vec<Step>) -> Result<()> {
    step(steps, "setup", setup::setup)?;
    if opts.unit {
        // --release: the dependencies are then shared with the release build below.
        let _ = step(steps, "cargo test --release --workspace", || {
            // As root the unit tests marked `#[ignore = "needs root: ..."]` run too (CI is root).
            let ignored: &[&str] = if workspace::is_root() { &["--", "--include-ignored"] } else { &[] };
            run(
                TAG,
                Command::new("cargo")
                    .current_dir(workspace::root())
                    .args(["test", "--release", "--workspace"])
                    .args(ignored)
                    .env_remove("TAPWIRE_SKIP_EBPF")
                    .env_remove("AYA_BUILD_SKIP"),
            )
        });
    }
    if opts.unit {
        // The benchmark harness's own parsers and verdicts (no load is run here).
        let _ = step(steps, "bench harness tests", || {
            run(
                TAG,
                Command::new("cargo")
                    .current_dir(workspace::root())
                    .args(["test", "--release", "--manifest-path", "bench/loadgen/Cargo.toml"])
                    .env("CARGO_TARGET_DIR", workspace::root().join("target/bench-loadgen")),
            )?;
            run(
                TAG,
                Command::new(workspace::venv_python())
                    .current_dir(workspace::root())
                    .args(["-m", "pytest", "bench", "-q"]),
            )
        });
    }
    if opts.e2e {
        let mut binary = None;
        step(steps, "build (release)", || {
            binary = Some(build::build(Profile::Release)?);
            Ok(())
        })?;
        if let Some(binary) = binary {
            let _ = step(steps, "end-to-end (pytest tests/e2e)", || {
                e2e(&binary, opts)
            });
        }
    }
    if opts.fuzz {
        for (target, seconds) in FUZZ_TARGETS {
            let _ = step(steps, &format!("fuzz {target} ({seconds} s)"), || fuzz(target, *seconds));
        }
    }
    Ok(())
}

/// Runs one cargo-fuzz target for a bounded time; a crash fails the step and leaves its input
/// under agent/fuzz/artifacts/ (turn it into a regression test).
fn fuzz(target: &str, seconds: u32) -> Result<()> {
    run(
        TAG,
        Command::new("cargo")
            .current_dir(workspace::root().join("agent"))
            .args(["+nightly", "fuzz", "run", target, "--", &format!("-max_total_time={seconds}")])
            // The fuzz build needs no eBPF object.
            .env("TAPWIRE_SKIP_EBPF", "1"),
    )
}

fn e2e(binary: &Path, opts: &Options) -> Result<()> {
    let root = workspace::root();
    let venv_bin = workspace::venv().join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(venv_bin).chain(std::env::split_paths(&path)))?;
    let mut cmd = Command::new(workspace::venv_python());
    cmd.current_dir(root)
        .args(["-m", "pytest", "tests/e2e", "-v"])
        .env("TAPWIRE_BIN", binary)
        // Tests may start `uvicorn`, `gunicorn`, ... by name: the venv's come first.
        .env("PATH", path)
        .env("VIRTUAL_ENV", workspace::venv());
    if let Some(k) = &opts.keyword {
        cmd.args(["-k", k]);
    }
    cmd.args(&opts.pytest_args);
    let shown = display(&cmd);
    log(TAG, format!("$ {shown}"));
    let status = cmd.status()?;
    match status.code() {
        Some(0) => Ok(()),
        Some(PYTEST_NO_TESTS) => bail!("pytest collected no end-to-end test (`{shown}`)"),
        _ => bail!("end-to-end tests failed ({status})"),
    }
}

/// Runs one step, records its time and outcome; the error is logged and returned.
fn step(steps: &mut Vec<Step>, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    log(TAG, format!("=== {name}"));
    let start = Instant::now();
    let result = f();
    let took = start.elapsed();
    if let Err(e) = &result {
        log(TAG, format!("{name}: FAILED: {e:#}"));
    }
    steps.push(Step {
        name: name.to_owned(),
        took,
        ok: result.is_ok(),
    });
    result
}

fn summary(steps: &[Step], total: Duration) {
    log(TAG, "summary:");
    let width = steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in steps {
        let outcome = if s.ok { "ok" } else { "FAILED" };
        log(
            TAG,
            format!(
                "  {:<width$}  {:>7.1} s  {outcome}",
                s.name,
                s.took.as_secs_f64()
            ),
        );
    }
    log(
        TAG,
        format!("  {:<width$}  {:>7.1} s", "total", total.as_secs_f64()),
    );
}
