//! Selecting services by cgroup v2 directory: resolving user paths and finding the ids of a
//! directory and all its descendants (bpf_get_current_cgroup_id() returns the leaf's id, which is
//! the inode number of its directory).

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 filesystem is mounted (looked in /proc/self/mounts): tapwire selects services by cgroup v2; \
         mount it (`mount -t cgroup2 none /sys/fs/cgroup`, or /sys/fs/cgroup/unified on a hybrid host)"
    )]
    NoCgroup2,
    #[error(
        "cgroup {given:?} does not exist: looked for {}; give a directory that exists under {} (absolute, or relative to it) \
         or a glob such as /kubepods*, which may match nothing yet",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and "),
        mount.display()
    )]
    NotFound { given: String, tried: Vec<PathBuf>, mount: PathBuf },
    #[error("{} is not inside the cgroup v2 mount {}: give a directory under {}", path.display(), mount.display(), mount.display())]
    OutsideMount { path: PathBuf, mount: PathBuf },
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup on pure-v2 hosts, /sys/fs/cgroup/unified on
/// hybrid ones. Read from /proc/self/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    parse_cgroup2_mount(&mounts)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target.replace("\\040", " ")))
        })
        .collect();
    // Prefer the host's usual places when several are mounted.
    found.sort_by_key(|p| match p.to_str() {
        Some("/sys/fs/cgroup") => 0,
        Some("/sys/fs/cgroup/unified") => 1,
        _ => 2,
    });
    found.into_iter().next()
}

/// Resolves a user-given cgroup path: an absolute path inside the mount, or a path relative to the
/// cgroup2 mount (a leading `/` that does not exist as given is also read as relative).
pub fn resolve(given: &str, mount: &Path) -> Result<PathBuf, CgroupError> {
    let as_given = Path::new(given);
    let relative = mount.join(given.trim_start_matches('/'));
    if as_given.is_absolute() && as_given.starts_with(mount) {
        return if as_given.is_dir() {
            Ok(as_given.to_path_buf())
        } else {
            Err(CgroupError::NotFound { given: given.into(), tried: vec![as_given.to_path_buf()], mount: mount.to_path_buf() })
        };
    }
    if relative.is_dir() {
        return Ok(relative);
    }
    if as_given.is_absolute() && as_given.is_dir() {
        return Err(CgroupError::OutsideMount { path: as_given.to_path_buf(), mount: mount.to_path_buf() });
    }
    let mut tried = vec![relative];
    if as_given.is_absolute() {
        tried.insert(0, as_given.to_path_buf());
    }
    Err(CgroupError::NotFound { given: given.into(), tried, mount: mount.to_path_buf() })
}

/// The ids (directory inode numbers) of `root` and every cgroup below it, with their paths.
/// A directory that vanishes during the walk is skipped.
pub fn scan(root: &Path, out: &mut HashMap<u64, PathBuf>) {
    let Ok(meta) = fs::metadata(root) else { return };
    out.insert(meta.ino(), root.to_path_buf());
    let Ok(entries) = fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            scan(&entry.path(), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_pure_v2_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(parse_cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn resolves_relative_and_absolute_paths() {
        let mount = std::env::temp_dir().join(format!("tapwire-cg-test-{}", std::process::id()));
        fs::create_dir_all(mount.join("svc/child")).unwrap();
        assert_eq!(resolve("svc", &mount).unwrap(), mount.join("svc"));
        assert_eq!(resolve("/svc", &mount).unwrap(), mount.join("svc"));
        assert_eq!(resolve(mount.join("svc").to_str().unwrap(), &mount).unwrap(), mount.join("svc"));
        let err = resolve("nope", &mount).unwrap_err().to_string();
        assert!(err.contains("does not exist") && err.contains("nope"), "{err}");
        let mut ids = HashMap::new();
        scan(&mount.join("svc"), &mut ids);
        assert_eq!(ids.len(), 2);
        fs::remove_dir_all(&mount).unwrap();
    }
}
