//! `cargo xtask`: the project's build, test and demo entry points.
//!
//! setup (toolchain, bpf-linker, Debian packages, Python venv) -> build (agent with the real eBPF
//! object) -> demo (tapwire on an example pipeline) / test (everything, what CI runs) / run (the
//! agent, or a quick start) / bench (the overhead benchmark).

mod bench;
mod build;
mod demo;
mod process;
mod pyharness;
mod quickstart;
mod setup;
mod signals;
mod test;
mod workspace;

use std::{os::unix::process::CommandExt as _, process::ExitCode};

use anyhow::{Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  demo [options]        setup and build, then tapwire on a pipeline of six services (needs root;
                        about 30 s after the first run): the trace of one request across them,
                        rate / errors / p50 / p95 / CPU / memory / queue per service, the service
                        graph; then stops everything and removes its cgroups
      --keep            keep the pipeline, tapwire and its Prometheus endpoint running until Ctrl-C
      --tapwire PATH    run this agent binary instead of building the tree
  setup                 install what the build and tests need (nightly rust-src, bpf-linker,
                        Debian packages, Python venv in .venv); skips what is present
  build [--debug]       setup, then build the agent (target/release/tapwire) with its eBPF probes
  test [options]        setup, unit tests, release build, end-to-end tests (needs root), fuzzing
                        (about 2 minutes); what CI runs
      --unit-only       only `cargo test --release --workspace`
      --e2e-only        only the build and the end-to-end suite
      --no-fuzz         skip the bounded cargo-fuzz runs (agent/fuzz) that end the full suite
      -k EXPR           select end-to-end tests by pytest expression
      -- ARGS           more pytest arguments
  run [-- ARGS]         setup and build, then `tapwire ARGS`; without ARGS, a quick start demo
                        (a small HTTP service in a cgroup, traced by tapwire; needs root)
  bench [options]       setup and build, then the overhead benchmark (needs root; about 7 minutes):
                        a FastAPI service with tapwire / with the OpenTelemetry SDK / with neither,
                        nginx with tapwire selecting it or a neighbour, agent CPU and memory at
                        fixed rates, connection churn; prints a table with the targets and writes
                        target/bench/<timestamp>.json and target/bench/latest.json (bench/README.md)
      --quick           2 pairs of short runs (about 2-3 minutes): a smoke test of the harness
      --pairs N         runs without/with the agent per scenario (default 5)
      --only LIST       some of the scenarios seed,nginx,rates,churn
      --tapwire PATH    bench this agent binary instead of building the tree
  help                  this text";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match workspace::init().and_then(|()| dispatch(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("[xtask] error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: Vec<String>) -> Result<()> {
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        bail!("no command given");
    };
    match command.as_str() {
        "setup" => {
            no_args(command, rest)?;
            setup::setup()
        }
        "build" => {
            let profile = match rest {
                [] => build::Profile::Release,
                [flag] if flag == "--debug" => build::Profile::Debug,
                _ => bail!("usage: cargo xtask build [--debug]"),
            };
            setup::setup()?;
            build::build(profile).map(drop)
        }
        "test" => test::test(test_options(rest)?),
        "run" => {
            // Everything after `run` (a leading `--` dropped) goes to tapwire.
            let tapwire_args = match rest {
                [dashdash, tail @ ..] if dashdash == "--" => tail,
                all => all,
            };
            if tapwire_args.is_empty() {
                quickstart::preflight()?;
            }
            setup::setup()?;
            let binary = build::build(build::Profile::Release)?;
            if tapwire_args.is_empty() {
                quickstart::quickstart(&binary)
            } else {
                let err = std::process::Command::new(&binary)
                    .args(tapwire_args)
                    .exec();
                bail!("cannot run {}: {err}", binary.display())
            }
        }
        "bench" => bench::bench(bench::options(rest)?),
        "demo" => demo::demo(demo::options(rest)?),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("{USAGE}");
            bail!("unknown command `{other}`")
        }
    }
}

fn no_args(command: &str, rest: &[String]) -> Result<()> {
    if !rest.is_empty() {
        bail!(
            "`cargo xtask {command}` takes no arguments (got {})",
            rest.join(" ")
        );
    }
    Ok(())
}

fn test_options(args: &[String]) -> Result<test::Options> {
    let mut opts = test::Options {
        unit: true,
        e2e: true,
        fuzz: true,
        keyword: None,
        pytest_args: Vec::new(),
    };
    let (mut unit_only, mut e2e_only) = (false, false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--unit-only" => unit_only = true,
            "--e2e-only" => e2e_only = true,
            "--no-fuzz" => opts.fuzz = false,
            "-k" => {
                let Some(expr) = it.next() else {
                    bail!("-k needs a pytest expression")
                };
                opts.keyword = Some(expr.clone());
            }
            "--" => opts.pytest_args.extend(it.by_ref().cloned()),
            other => {
                bail!("unknown option `{other}` for `cargo xtask test` (see `cargo xtask help`)")
            }
        }
    }
    if unit_only && e2e_only {
        bail!("--unit-only and --e2e-only exclude each other");
    }
    opts.unit = !e2e_only;
    opts.e2e = !unit_only;
    // The fuzz targets run with the full suite only (CI), unless turned off.
    opts.fuzz = opts.fuzz && !unit_only && !e2e_only;
    if !opts.e2e && (opts.keyword.is_some() || !opts.pytest_args.is_empty()) {
        bail!("-k and pytest arguments apply to the end-to-end tests, which --unit-only skips");
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::test_options;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn test_runs_everything_by_default() {
        let o = test_options(&[]).unwrap();
        assert!(o.unit && o.e2e && o.fuzz && o.keyword.is_none() && o.pytest_args.is_empty());
        assert!(!test_options(&args("--no-fuzz")).unwrap().fuzz);
        assert!(!test_options(&args("--unit-only")).unwrap().fuzz);
    }

    #[test]
    fn test_flags() {
        let o = test_options(&args("--e2e-only -k http -- -x --maxfail 2")).unwrap();
        assert!(!o.unit && o.e2e);
        assert_eq!(o.keyword.as_deref(), Some("http"));
        assert_eq!(o.pytest_args, args("-x --maxfail 2"));
        let o = test_options(&args("--unit-only")).unwrap();
        assert!(o.unit && !o.e2e);
        assert!(test_options(&args("--unit-only --e2e-only")).is_err());
        assert!(test_options(&args("--unit-only -k x")).is_err());
        assert!(test_options(&args("-k")).is_err());
        assert!(test_options(&args("--bogus")).is_err());
    }
}
