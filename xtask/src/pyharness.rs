//! Python drivers xtask hands over to (bench/harness.py, examples/pipeline/demo.py): the venv's
//! python with the venv first on PATH, Ctrl-C left to the driver, and the cgroups a driver killed
//! halfway may have left behind removed afterwards.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    build::{self, Profile},
    process::{display, log},
    signals, workspace,
};

/// The value after `--tapwire`.
pub fn tapwire_option<'a>(rest: &mut impl Iterator<Item = &'a String>) -> Result<PathBuf> {
    let path = rest
        .next()
        .context("--tapwire needs the agent binary's path")?;
    Ok(PathBuf::from(path))
}

/// `--tapwire PATH` made absolute and checked, or the release build of the tree.
pub fn agent_binary(tag: &str, given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(path) => {
            let path = std::path::absolute(path)
                .with_context(|| format!("cannot resolve {}", path.display()))?;
            if !path.is_file() {
                bail!("--tapwire {}: no such file", path.display());
            }
            log(tag, format!("using the given agent {}", path.display()));
            Ok(path)
        }
        None => build::build(Profile::Release),
    }
}

/// `<venv>/bin/python SCRIPT`, run from the workspace root with the venv first on PATH.
pub fn command(script: &str) -> Result<Command> {
    let venv_bin = workspace::venv().join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(venv_bin).chain(std::env::split_paths(&path)))?;
    let mut cmd = Command::new(workspace::venv_python());
    cmd.current_dir(workspace::root())
        .arg(script)
        .env("PATH", path)
        .env("VIRTUAL_ENV", workspace::venv());
    Ok(cmd)
}

/// Runs the driver with inherited stdio and waits for it. From here Ctrl-C only sets a flag in
/// this process: the driver gets it too and cleans up, and we wait for it to finish doing so.
pub fn run(tag: &str, cmd: &mut Command) -> Result<ExitStatus> {
    log(tag, format!("$ {}", display(cmd)));
    signals::install();
    cmd.status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))
}

/// Removes `<prefix>*-<pid>` cgroups whose driver process is gone (tests/e2e/cgroupfs.py).
pub fn remove_leftover_cgroups(tag: &str, prefix: &str) {
    let script = format!(
        "import sys; sys.path.insert(0, 'tests/e2e'); import cgroupfs; \
         print(len(cgroupfs.remove_stale('{prefix}')))"
    );
    match Command::new(workspace::venv_python())
        .current_dir(workspace::root())
        .args(["-c", &script])
        .output()
    {
        Ok(out) if out.status.success() => {
            let removed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if removed != "0" {
                log(
                    tag,
                    format!("removed {removed} cgroups the driver left behind"),
                );
            }
        }
        Ok(out) => log(
            tag,
            format!(
                "could not check for leftover {prefix}* cgroups: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ),
        Err(e) => log(tag, format!("could not check for leftover cgroups: {e}")),
    }
}
