//! `cargo xtask setup`: everything the build, the demo and the tests need, installed from the
//! registries this project may use (crates.io, Debian, PyPI). Each step checks first and skips
//! when its tool is already there, so running it again takes about a second.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    process::{log, output, run},
    workspace,
};

/// Debian packages the end-to-end tests and `cargo xtask run` use. Extend this list when a test
/// needs another real program; setup installs whatever is missing.
pub const APT_PACKAGES: &[&str] = &[
    "curl",
    "iproute2",
    "nginx",
    "wrk",
    "bpftool",
    "procps",
    "util-linux",
    "prometheus",
    // tests/e2e/test_http_matrix.py builds its Go net/http server (stdlib only) with it.
    "golang-go",
    // The vector store of the example pipeline (`cargo xtask demo`) keeps its data in it.
    "redis-server",
];

/// bpf-linker release to build when none is installed. 0.13.0 offers `llvm-22`, the LLVM of the
/// nightly the eBPF programs build with; move it together with the nightly.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// cargo-fuzz release used to run the fuzz targets under agent/fuzz.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Pinned Python packages for the end-to-end tests (servers, clients, the OTLP receiver).
pub const REQUIREMENTS: &str = "tests/requirements.txt";

/// Pinned Python packages `cargo xtask bench` adds to the same venv (the OpenTelemetry Python SDK
/// it compares tapwire with), installed with the tests' pins as constraints.
pub const BENCH_REQUIREMENTS: &str = "bench/requirements.txt";

/// Pinned Python packages the example pipeline of `cargo xtask demo` adds to the same venv (the
/// Redis and OpenAI clients), installed with the tests' pins as constraints.
pub const PIPELINE_REQUIREMENTS: &str = "examples/pipeline/requirements.txt";

const TAG: &str = "setup";

pub fn setup() -> Result<()> {
    let start = Instant::now();
    let sysroot = nightly_sysroot()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)?;
    apt_packages()?;
    cargo_fuzz()?;
    python_venv()?;
    extra_requirements(BENCH_REQUIREMENTS, "bench", "`cargo xtask bench`")?;
    extra_requirements(PIPELINE_REQUIREMENTS, "pipeline", "`cargo xtask demo`")?;
    log(
        TAG,
        format!("done in {:.1} s", start.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// cargo-fuzz runs the fuzz targets (with the nightly); installed from crates.io when missing.
fn cargo_fuzz() -> Result<()> {
    let working = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if working {
        log(TAG, "cargo-fuzz: present, skipping");
        return Ok(());
    }
    log(TAG, format!("cargo-fuzz: installing {CARGO_FUZZ_VERSION} from crates.io"));
    run(
        TAG,
        Command::new("cargo").args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION]),
    )
}

/// The nightly toolchain builds the eBPF programs (`-Z build-std=core` for bpfel-unknown-none).
/// It cannot be downloaded here, so its absence is an error with the command to fix it.
fn nightly_sysroot() -> Result<PathBuf> {
    let version = output(Command::new("rustc").args(["+nightly", "--version"])).context(
        "the nightly Rust toolchain is missing; the eBPF programs build with it. Install it with \
         `rustup toolchain install nightly --profile minimal --component rust-src`",
    )?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    log(TAG, format!("nightly toolchain: {version}, present"));
    Ok(PathBuf::from(sysroot))
}

fn rust_src(sysroot: &Path) -> Result<()> {
    if sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
    {
        log(TAG, "rust-src (nightly): present, skipping");
        return Ok(());
    }
    log(TAG, "rust-src (nightly): missing, installing");
    run(
        TAG,
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

/// bpf-linker must use the nightly's LLVM. Build it against the nightly's own libLLVM: an LLVM
/// "prefix" whose lib/ holds symlinks to the sysroot's libLLVM.so.<version>.
fn bpf_linker(sysroot: &Path) -> Result<()> {
    if let Some(version) = bpf_linker_version() {
        let at = workspace::which("bpf-linker")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        log(
            TAG,
            format!("bpf-linker: {version} ({at}), working, skipping"),
        );
        return Ok(());
    }
    let libllvm = nightly_libllvm(sysroot)?;
    let file_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM file name is not UTF-8")?;
    let major = llvm_major(file_name)
        .with_context(|| format!("cannot read the LLVM major version from {file_name}"))?;
    log(
        TAG,
        format!(
            "bpf-linker: missing or not working, building {BPF_LINKER_VERSION} against {file_name}"
        ),
    );

    // The bpf-linker binary keeps this directory as its RUNPATH, so it lives in the user's cache
    // (not target/, which `cargo clean` removes).
    let prefix = workspace::cache_dir()?.join("llvm-prefix");
    let lib = prefix.join("lib");
    if lib.exists() {
        fs::remove_dir_all(&lib).with_context(|| format!("cannot clear {}", lib.display()))?;
    }
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in ["libLLVM.so", file_name] {
        std::os::unix::fs::symlink(&libllvm, lib.join(name)).with_context(|| {
            format!(
                "cannot link {} to {}",
                lib.join(name).display(),
                libllvm.display()
            )
        })?;
    }
    log(
        TAG,
        format!("LLVM prefix: {} -> {}", lib.display(), libllvm.display()),
    );

    run(
        TAG,
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ]),
    )?;
    match bpf_linker_version() {
        Some(version) => {
            log(TAG, format!("bpf-linker: {version} installed"));
            Ok(())
        }
        None => bail!(
            "bpf-linker was installed but `bpf-linker --version` still fails; is {} on PATH?",
            workspace::cargo_bin_dirs()?[0].display()
        ),
    }
}

fn bpf_linker_version() -> Option<String> {
    output(Command::new("bpf-linker").arg("--version")).ok()
}

/// `<sysroot>/lib/libLLVM.so.<version>` (not the `libLLVM-<major>-rust-*.so` next to it).
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found: Vec<PathBuf> = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("libLLVM.so."))
        .map(|e| e.path())
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM.so.* in {}; the nightly toolchain looks incomplete",
            lib.display()
        ),
        many => bail!("several libLLVM.so.* in {}: {many:?}", lib.display()),
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn llvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn apt_packages() -> Result<()> {
    let missing = missing_debian_packages()?;
    if missing.is_empty() {
        log(
            TAG,
            format!(
                "Debian packages: {} present, skipping",
                APT_PACKAGES.join(" ")
            ),
        );
        return Ok(());
    }
    log(
        TAG,
        format!("Debian packages: missing {}", missing.join(" ")),
    );
    if !workspace::is_root() {
        bail!(
            "installing Debian packages needs root: run `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args);
        cmd
    };
    run(TAG, &mut apt(&["update"]))?;
    run(
        TAG,
        apt(&["install", "-y", "--no-install-recommends"]).args(&missing),
    )?;
    let still = missing_debian_packages()?;
    if !still.is_empty() {
        bail!(
            "apt-get finished but these packages are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn missing_debian_packages() -> Result<Vec<String>> {
    // Exits 1 when a package is unknown to dpkg, so read stdout rather than the status.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(APT_PACKAGES)
        .output()
        .context("cannot run dpkg-query: setup installs packages with apt-get (Debian/Ubuntu)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .map(|p| p.split(':').next().unwrap_or(p))
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect())
}

/// `<repo>/.venv` with tests/requirements.txt installed; reinstalls only when that file changes.
fn python_venv() -> Result<()> {
    let root = workspace::root();
    let requirements = root.join(REQUIREMENTS);
    if !requirements.is_file() {
        bail!(
            "{} is missing: it pins the Python packages the end-to-end tests use",
            requirements.display()
        );
    }
    let venv = workspace::venv();
    let python = workspace::venv_python();
    let stamp = venv.join(".tapwire-requirements.sha256");

    let venv_works = Command::new(&python)
        .args(["-c", "import sys"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !venv_works {
        let base = base_python()?;
        let version = output(Command::new(&base).arg("--version"))?;
        log(
            TAG,
            format!(
                "Python venv: creating {} with {} ({version})",
                venv.display(),
                base.display()
            ),
        );
        run(
            TAG,
            Command::new(&base)
                .args(["-m", "venv", "--clear"])
                .arg(&venv),
        )?;
    }

    let hash = output(Command::new("sha256sum").arg(&requirements))?;
    let hash = hash
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    if venv_works && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == hash) {
        log(
            TAG,
            format!(
                "Python venv: {} up to date with {REQUIREMENTS}, skipping",
                venv.display()
            ),
        );
        return Ok(());
    }
    log(TAG, format!("Python venv: installing {REQUIREMENTS}"));
    run(
        TAG,
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "-r",
            ])
            .arg(&requirements),
    )?;
    fs::write(&stamp, format!("{hash}\n"))
        .with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(())
}

/// `requirements` (bench/, examples/pipeline/) into the venv python_venv made. Its own stamp
/// (`.tapwire-<stamp>-requirements.sha256`) holds the hashes of both files, so a change to either
/// reinstalls it; tests/requirements.txt is passed as constraints, so a conflict between the two
/// fails here instead of silently moving a test dependency.
fn extra_requirements(requirements: &str, stamp: &str, user: &str) -> Result<()> {
    let root = workspace::root();
    let extra = root.join(requirements);
    if !extra.is_file() {
        bail!(
            "{} is missing: it pins the Python packages {user} uses",
            extra.display()
        );
    }
    let tests = root.join(REQUIREMENTS);
    let stamp = workspace::venv().join(format!(".tapwire-{stamp}-requirements.sha256"));
    let sums = output(Command::new("sha256sum").arg(&extra).arg(&tests))?;
    let hash = sums
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect::<Vec<_>>()
        .join(" ");
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == hash) {
        log(
            TAG,
            format!("Python venv: up to date with {requirements}, skipping"),
        );
        return Ok(());
    }
    log(TAG, format!("Python venv: installing {requirements}"));
    run(
        TAG,
        Command::new(workspace::venv_python())
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "-r",
            ])
            .arg(&extra)
            .arg("-c")
            .arg(&tests),
    )?;
    fs::write(&stamp, format!("{hash}\n"))
        .with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(())
}

/// The Python that creates the venv: python3 on PATH, else pyenv's shim, else Debian's.
fn base_python() -> Result<PathBuf> {
    let pyenv_shim = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| workspace::home().ok().map(|h| h.join(".pyenv")))
        .map(|r| r.join("shims/python3"));
    workspace::which("python3")
        .into_iter()
        .chain(pyenv_shim)
        .chain([PathBuf::from("/usr/bin/python3")])
        .find(|p| {
            Command::new(p)
                .args(["-c", "import venv"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("no python3 with the venv module found (PATH, pyenv, /usr/bin)")
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_from_sysroot_file_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.21"), Some(21));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
    }
}
