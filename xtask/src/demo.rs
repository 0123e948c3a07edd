//! `cargo xtask demo`: tapwire on the example document pipeline (examples/pipeline), start to
//! finish, in about half a minute once setup and the build have run.
//!
//! setup (with redis-server and the pipeline's Python packages) -> release build of the agent
//! (or `--tapwire PATH`) -> examples/pipeline/demo.py with the venv's Python, as root: six
//! services in their own cgroups, tapwire watching them, a bounded burst of traffic, then the
//! trace of one request, a per-service table and the service graph. The driver stops everything
//! and removes its cgroups (after Ctrl-C with `--keep`); this process only waits for it, then
//! removes whatever cgroup a driver that died outright may have left.

use std::{path::PathBuf, time::Instant};

use anyhow::{Result, bail};

use crate::{process::log, pyharness, setup, workspace};

const TAG: &str = "demo";
const DRIVER: &str = "examples/pipeline/demo.py";

#[derive(Debug, Default, PartialEq)]
pub struct Options {
    /// `--keep`: leave everything running after the report, until Ctrl-C.
    pub keep: bool,
    /// `--tapwire PATH`: run this agent binary instead of building the tree.
    pub tapwire: Option<PathBuf>,
}

pub fn options(args: &[String]) -> Result<Options> {
    let mut opts = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--keep" => opts.keep = true,
            "--tapwire" => opts.tapwire = Some(pyharness::tapwire_option(&mut it)?),
            other => {
                bail!("unknown option `{other}` for `cargo xtask demo` (see `cargo xtask help`)")
            }
        }
    }
    Ok(opts)
}

pub fn demo(opts: Options) -> Result<()> {
    if !workspace::is_root() {
        bail!(
            "the demo creates cgroups and loads eBPF programs: run it as root \
             (`sudo -E cargo xtask demo`)"
        );
    }
    let start = Instant::now();
    log(TAG, "1/3 setup: installing what is missing");
    setup::setup()?;
    log(TAG, "2/3 the agent");
    let tapwire = pyharness::agent_binary(TAG, opts.tapwire.as_deref())?;
    log(TAG, "3/3 the pipeline, tapwire and the traffic");
    let mut cmd = pyharness::command(DRIVER)?;
    cmd.arg("--tapwire")
        .arg(&tapwire)
        .arg("--log-dir")
        .arg(workspace::target_dir().join("demo"));
    if opts.keep {
        cmd.arg("--keep");
    }
    let status = pyharness::run(TAG, &mut cmd)?;
    pyharness::remove_leftover_cgroups(TAG, "tapwire-demo-");
    log(
        TAG,
        format!("done in {:.0} s", start.elapsed().as_secs_f64()),
    );
    if !status.success() {
        bail!("{DRIVER} failed ({status}); what went wrong is printed above");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{Options, options};

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn demo_options() {
        assert_eq!(options(&[]).unwrap(), Options::default());
        let o = options(&args("--keep --tapwire target/release/tapwire")).unwrap();
        assert!(o.keep);
        assert_eq!(o.tapwire, Some(PathBuf::from("target/release/tapwire")));
        assert!(options(&args("--tapwire")).is_err());
        assert!(options(&args("--bogus")).is_err());
    }
}
