//! `cargo xtask build`: the agent with its real eBPF object embedded, never the stub.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    process::{log, run},
    workspace,
};

const TAG: &str = "build";

/// The object agent/build.rs writes into its OUT_DIR (and embeds in the binary).
const PROBES_OBJECT: &str = "tapwire-probes";

/// ELF e_machine of eBPF objects.
const EM_BPF: u16 = 247;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

/// Builds the `tapwire` binary (setup must have run) and returns its absolute path.
pub fn build(profile: Profile) -> Result<PathBuf> {
    let start = Instant::now();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace::root())
        .args(["build", "-p", "tapwire"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    // Either would make agent/build.rs embed an empty stub object instead of the programs.
    cmd.env_remove("TAPWIRE_SKIP_EBPF")
        .env_remove("AYA_BUILD_SKIP");
    run(TAG, &mut cmd)?;

    let profile_dir = workspace::target_dir().join(profile.dir());
    let object = check_probes(&profile_dir)?;
    let binary = profile_dir.join("tapwire");
    if !binary.is_file() {
        bail!(
            "cargo build succeeded but {} does not exist",
            binary.display()
        );
    }
    log(
        TAG,
        format!(
            "eBPF object: {} ({} bytes)",
            object.display(),
            fs::metadata(&object)?.len()
        ),
    );
    log(
        TAG,
        format!(
            "agent: {} (built in {:.1} s)",
            binary.display(),
            start.elapsed().as_secs_f64()
        ),
    );
    Ok(binary)
}

/// Finds the newest `build/tapwire-<hash>/out/tapwire-probes` and checks that it is a real eBPF
/// ELF object: agent/build.rs writes an empty one (with only a cargo warning) when bpf-linker is
/// missing.
fn check_probes(profile_dir: &Path) -> Result<PathBuf> {
    let build_dir = profile_dir.join("build");
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in
        fs::read_dir(&build_dir).with_context(|| format!("cannot list {}", build_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // `tapwire-<hash>` only: tapwire-common-<hash>, tapwire-probes-<hash> are other crates.
        let is_agent = name
            .strip_prefix("tapwire-")
            .is_some_and(|hash| !hash.is_empty() && hash.chars().all(|c| c.is_ascii_hexdigit()));
        let object = entry.path().join("out").join(PROBES_OBJECT);
        if !is_agent {
            continue;
        }
        if let Ok(modified) = fs::metadata(&object).and_then(|m| m.modified())
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, object));
        }
    }
    let (_, object) = newest.with_context(|| {
        format!(
            "no {}/tapwire-*/out/{PROBES_OBJECT} after the build",
            build_dir.display()
        )
    })?;
    let bytes = fs::read(&object).with_context(|| format!("cannot read {}", object.display()))?;
    if bytes.is_empty() {
        bail!(
            "the agent embeds the EMPTY stub eBPF object {}: agent/build.rs could not build the \
             probes (bpf-linker missing from PATH, or TAPWIRE_SKIP_EBPF set). Run `cargo xtask setup`.",
            object.display()
        );
    }
    let machine = bytes.get(18..20).map(|m| u16::from_le_bytes([m[0], m[1]]));
    if !bytes.starts_with(b"\x7fELF") || machine != Some(EM_BPF) {
        bail!(
            "{} is not an eBPF ELF object (e_machine {machine:?})",
            object.display()
        );
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use std::{fs, path::PathBuf};

    use super::{EM_BPF, PROBES_OBJECT, check_probes};

    /// A fake `target/<profile>` with one agent build-script output holding `object`.
    fn profile_dir(name: &str, object: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let out = dir.join("build/tapwire-0123abcd/out");
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join(PROBES_OBJECT), object).unwrap();
        // Another crate's build dir with the same file name must be ignored.
        let other = dir.join("build/tapwire-probes-0123abcd/out");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join(PROBES_OBJECT), b"not the agent's").unwrap();
        dir
    }

    fn bpf_elf_header() -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[18..20].copy_from_slice(&EM_BPF.to_le_bytes());
        h
    }

    #[test]
    fn accepts_a_bpf_object() {
        let dir = profile_dir("ok", &bpf_elf_header());
        let found = check_probes(&dir).unwrap();
        assert!(found.starts_with(dir.join("build/tapwire-0123abcd")));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_the_empty_stub() {
        let dir = profile_dir("stub", b"");
        let err = check_probes(&dir).unwrap_err().to_string();
        assert!(err.contains("EMPTY stub"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_a_non_bpf_elf() {
        let mut header = bpf_elf_header();
        header[18] = 62; // EM_X86_64
        let dir = profile_dir("x86", &header);
        assert!(check_probes(&dir).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
