//! `cargo xtask bench`: the reproducible overhead benchmark (bench/README.md says what each
//! figure means and how it is measured).
//!
//! setup -> release build of the agent (or `--tapwire PATH`) -> build bench/loadgen (the
//! open-loop load generator, its own little workspace) -> bench/overhead.py with the venv's
//! Python, as root. The harness starts every process in `tapwire-bench-*` cgroups pinned with
//! taskset, prints the table and writes target/bench/<timestamp>.json and target/bench/latest.json.
//! Ctrl-C reaches the harness (same terminal process group), which stops everything and still
//! writes what it measured; this process only waits for it, then removes whatever cgroup a harness
//! that died outright may have left.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    process::{log, run},
    pyharness, setup, workspace,
};

const TAG: &str = "bench";
const HARNESS: &str = "bench/overhead.py";
const LOADGEN_MANIFEST: &str = "bench/loadgen/Cargo.toml";
const LOADGEN_BIN: &str = "tapwire-loadgen";
/// The scenarios bench/overhead.py knows (`--only`).
const SCENARIOS: &[&str] = &["seed", "nginx", "rates", "churn"];
/// The harness's exit status when one scenario failed (the others still ran).
const HARNESS_SCENARIO_FAILED: i32 = 1;
/// The harness's exit status after Ctrl-C / SIGTERM (partial JSON written).
const HARNESS_INTERRUPTED: i32 = 130;

#[derive(Debug, Default, PartialEq)]
pub struct Options {
    /// `--quick`: 2 pairs of short runs, a smoke test of the harness.
    pub quick: bool,
    /// `--pairs N`: runs without/with the agent per scenario (harness default: 5, quick: 2).
    pub pairs: Option<u32>,
    /// `--only a,b`: a subset of SCENARIOS.
    pub only: Option<String>,
    /// `--tapwire PATH`: bench this binary instead of building the tree.
    pub tapwire: Option<PathBuf>,
}

pub fn options(args: &[String]) -> Result<Options> {
    let mut opts = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--pairs" => {
                let n = it.next().context("--pairs needs a number")?;
                let n: u32 = n
                    .parse()
                    .with_context(|| format!("--pairs {n}: not a number"))?;
                if !(1..=50).contains(&n) {
                    bail!("--pairs must be in 1..=50");
                }
                opts.pairs = Some(n);
            }
            "--only" => {
                let list = it.next().context("--only needs a list of scenarios")?;
                for name in list.split(',') {
                    if !SCENARIOS.contains(&name) {
                        bail!(
                            "unknown scenario `{name}` in --only (choose from {})",
                            SCENARIOS.join(",")
                        );
                    }
                }
                opts.only = Some(list.clone());
            }
            "--tapwire" => opts.tapwire = Some(pyharness::tapwire_option(&mut it)?),
            other => {
                bail!("unknown option `{other}` for `cargo xtask bench` (see `cargo xtask help`)")
            }
        }
    }
    Ok(opts)
}

pub fn bench(opts: Options) -> Result<()> {
    if !workspace::is_root() {
        bail!(
            "the bench creates cgroups, pins processes and loads eBPF programs: run it as root \
             (`sudo -E cargo xtask bench`)"
        );
    }
    let start = Instant::now();
    setup::setup()?;
    let tapwire = pyharness::agent_binary(TAG, opts.tapwire.as_deref())?;
    let loadgen = build_loadgen()?;
    let out = workspace::target_dir().join("bench");

    let mut cmd = pyharness::command(HARNESS)?;
    cmd.arg("--tapwire")
        .arg(&tapwire)
        .arg("--loadgen")
        .arg(&loadgen)
        .arg("--out")
        .arg(&out);
    if opts.quick {
        cmd.arg("--quick");
    }
    if let Some(n) = opts.pairs {
        cmd.args(["--pairs", &n.to_string()]);
    }
    if let Some(only) = &opts.only {
        cmd.args(["--only", only]);
    }
    let status = pyharness::run(TAG, &mut cmd)?;
    // The harness removes its cgroups itself; one killed outright (SIGKILL, OOM) cannot.
    pyharness::remove_leftover_cgroups(TAG, "tapwire-bench-");
    log(
        TAG,
        format!(
            "done in {:.0} s; results in {}",
            start.elapsed().as_secs_f64(),
            out.display()
        ),
    );
    match status.code() {
        Some(0) => Ok(()),
        Some(HARNESS_SCENARIO_FAILED) => {
            bail!(
                "a bench scenario failed (the table says which; logs under {})",
                out.display()
            )
        }
        Some(HARNESS_INTERRUPTED) => bail!("interrupted (partial results under {})", out.display()),
        _ => bail!("{HARNESS} failed ({status})"),
    }
}

/// bench/loadgen in release mode, into its own target directory (it is not a member of the
/// workspace, and a separate directory never waits on the workspace's build lock).
fn build_loadgen() -> Result<PathBuf> {
    let target = workspace::target_dir().join("bench-loadgen");
    run(
        TAG,
        Command::new("cargo")
            .current_dir(workspace::root())
            .args([
                "build",
                "--release",
                "--locked",
                "--quiet",
                "--manifest-path",
            ])
            .arg(LOADGEN_MANIFEST)
            .arg("--target-dir")
            .arg(&target),
    )?;
    let binary = target.join("release").join(LOADGEN_BIN);
    if !binary.is_file() {
        bail!(
            "building {LOADGEN_MANIFEST} succeeded but {} is missing",
            binary.display()
        );
    }
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{Options, options};

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn defaults_and_flags() {
        assert_eq!(options(&[]).unwrap(), Options::default());
        let o = options(&args(
            "--quick --pairs 3 --only seed,churn --tapwire /x/tapwire",
        ))
        .unwrap();
        assert_eq!(
            o,
            Options {
                quick: true,
                pairs: Some(3),
                only: Some("seed,churn".into()),
                tapwire: Some(PathBuf::from("/x/tapwire")),
            }
        );
    }

    #[test]
    fn rejects_bad_options() {
        for bad in [
            "--pairs",
            "--pairs 0",
            "--pairs x",
            "--pairs 51",
            "--only",
            "--only seed,x",
            "--tapwire",
            "--bogus",
        ] {
            assert!(options(&args(bad)).is_err(), "{bad} was accepted");
        }
    }
}
