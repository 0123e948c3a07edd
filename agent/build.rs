//! Builds the kernel programs (ebpf-probes/) with the nightly toolchain and bpf-linker and puts
//! the object in OUT_DIR, where capture/ embeds it.
//!
//! When bpf-linker is not installed (plain `cargo check` / `cargo clippy` on a machine that never
//! ran `cargo xtask setup`) or TAPWIRE_SKIP_EBPF=1, an empty stub object is written instead:
//! the agent still builds, and refuses at run time to load probes it does not have.

use std::{env, fs, path::PathBuf, process::Command};

const OBJECT: &str = "tapwire-probes";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=TAPWIRE_SKIP_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let skip = env::var("TAPWIRE_SKIP_EBPF").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let has_linker = Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success());
    if skip || !has_linker {
        let why = if skip { "TAPWIRE_SKIP_EBPF is set" } else { "bpf-linker is not installed (run `cargo xtask setup`)" };
        println!("cargo:warning=building without eBPF probes: {why}");
        println!("cargo:rustc-cfg=tapwire_stub_probes");
        fs::write(out_dir.join(OBJECT), [])?;
        println!("cargo::rustc-check-cfg=cfg(tapwire_stub_probes)");
        return Ok(());
    }
    println!("cargo::rustc-check-cfg=cfg(tapwire_stub_probes)");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../ebpf-probes").canonicalize()?;
    let root = root.to_str().ok_or_else(|| anyhow::anyhow!("non UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "tapwire-probes", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
