//! Where things are (repository, target dir, cargo's bin dir, the user's cache) and the
//! environment every child process inherits.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, Result, bail};

static ROOT: OnceLock<PathBuf> = OnceLock::new();

/// Cleans up the environment `cargo run` handed us, so that children (cargo, rustup, pytest,
/// tapwire) see the user's environment plus the cargo bin directories on PATH.
///
/// Must run first in `main`, before any thread exists: it calls `env::set_var`.
pub fn init() -> Result<()> {
    // `cargo run` points CARGO_MANIFEST_DIR at xtask/; its parent is the workspace root.
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let root = manifest_dir
        .parent()
        .context("xtask's manifest directory has no parent")?
        .to_path_buf();
    if !root.join("Cargo.toml").is_file() {
        bail!(
            "cannot find the workspace root (looked at {})",
            root.display()
        );
    }
    let _ = ROOT.set(root.clone());

    // Directories the binaries `cargo install` writes live in. A fresh shell may lack them.
    let mut path: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    for dir in cargo_bin_dirs()?.into_iter().rev() {
        if !path.contains(&dir) {
            path.insert(0, dir);
        }
    }
    let path = env::join_paths(path).context("PATH contains a directory with ':' in its name")?;

    // `cargo run` prepends target/debug/deps and the stable toolchain's lib dirs to
    // LD_LIBRARY_PATH; none of our children need them.
    let ld_library_path: Option<OsString> = env::var_os("LD_LIBRARY_PATH").map(|v| {
        let rustup_home = rustup_home();
        let keep: Vec<PathBuf> = env::split_paths(&v)
            .filter(|p| {
                !p.starts_with(&root) && !rustup_home.as_ref().is_some_and(|r| p.starts_with(r))
            })
            .collect();
        env::join_paths(keep).unwrap_or_default()
    });

    let cargo_run_vars: Vec<OsString> = env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            k.starts_with("CARGO_PKG_") || k == "CARGO_MANIFEST_DIR" || k == "CARGO_MANIFEST_PATH"
        })
        .collect();

    // SAFETY: called at the start of main while the process is single-threaded, so nothing can
    // read the environment concurrently.
    unsafe {
        env::set_var("PATH", path);
        match ld_library_path {
            Some(v) if !v.is_empty() => env::set_var("LD_LIBRARY_PATH", v),
            Some(_) => env::remove_var("LD_LIBRARY_PATH"),
            None => {}
        }
        for k in cargo_run_vars {
            env::remove_var(k);
        }
    }
    Ok(())
}

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn root() -> &'static Path {
    ROOT.get().expect("workspace::init runs first")
}

/// cargo's target directory: CARGO_TARGET_DIR when set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                env::current_dir().unwrap_or_default().join(dir)
            }
        }
        _ => root().join("target"),
    }
}

/// The project's Python virtualenv.
pub fn venv() -> PathBuf {
    root().join(".venv")
}

pub fn venv_python() -> PathBuf {
    venv().join("bin/python")
}

pub fn home() -> Result<PathBuf> {
    match env::var_os("HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h)),
        _ => bail!("HOME is not set"),
    }
}

/// A per-user cache for things that outlive `cargo clean` (the LLVM prefix bpf-linker links to).
pub fn cache_dir() -> Result<PathBuf> {
    let base = match env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => home()?.join(".cache"),
    };
    Ok(base.join("tapwire"))
}

/// `$CARGO_INSTALL_ROOT/bin` (when set, that is where `cargo install` writes) and
/// `$CARGO_HOME/bin` (rustup's proxies and, by default, installed binaries).
pub fn cargo_bin_dirs() -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    if let Some(root) = env::var_os("CARGO_INSTALL_ROOT").filter(|r| !r.is_empty()) {
        dirs.push(PathBuf::from(root).join("bin"));
    }
    let cargo_home = match env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => home()?.join(".cargo"),
    };
    dirs.push(cargo_home.join("bin"));
    Ok(dirs)
}

fn rustup_home() -> Option<PathBuf> {
    env::var_os("RUSTUP_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| home().ok().map(|h| h.join(".rustup")))
}

/// The first `name` on PATH, like `command -v`.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
