//! The part of the cgroup v2 tree a selection can reach, kept current with inotify: a new
//! directory is seen when it is created (mkdir fires IN_CREATE on its parent), a removed one
//! when it is removed. Only directories that are selected or could lead to a match are walked
//! and watched; the tree is walked once at start and after an inotify queue overflow.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use super::CgroupPattern;
use crate::discover::cgroup::{self, CgroupError};

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cannot watch the cgroup tree with inotify")]
    Inotify(#[source] std::io::Error),
}

/// Which cgroups the path patterns select, as directory path (relative to the mount, `/a/b`)
/// -> cgroup id.
pub struct CgroupTree {
    mount: PathBuf,
    includes: Vec<CgroupPattern>,
    excludes: Vec<CgroupPattern>,
    inotify: AsyncFd<InotifyFd>,
    watches: HashMap<WatchDescriptor, String>,
    /// Every walked directory, selected or not, with its id.
    dirs: HashMap<String, u64>,
    /// inotify queue overflows (each followed by a full walk).
    pub overflows: u64,
}

/// The inotify instance, as tokio needs it (a raw fd that stays the same while owned).
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

fn parts(rel: &str) -> Vec<&str> {
    rel.split('/').filter(|c| !c.is_empty()).collect()
}

fn join(rel: &str, name: &str) -> String {
    if rel == "/" { format!("/{name}") } else { format!("{rel}/{name}") }
}

impl CgroupTree {
    /// `includes` empty: every cgroup (the other criteria then decide). A literal include must
    /// exist; globs may match nothing yet.
    pub fn new(mount: &Path, includes: &[CgroupPattern], excludes: &[CgroupPattern]) -> Result<CgroupTree, TreeError> {
        for p in includes.iter().filter(|p| p.is_literal()) {
            cgroup::resolve(p.as_str(), mount)?;
        }
        let rel = |p: &CgroupPattern| p.relative_to(mount);
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| TreeError::Inotify(e.into()))?;
        let mut tree = CgroupTree {
            mount: mount.to_path_buf(),
            includes: includes.iter().map(rel).collect(),
            excludes: excludes.iter().map(rel).collect(),
            // SAFETY: the Inotify owns its fd until it is dropped with the AsyncFd, and as_raw_fd
            // always returns that fd.
            inotify: unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), tokio::io::Interest::READABLE) }
                .map_err(|e| TreeError::Inotify(e.into()))?,
            watches: HashMap::new(),
            dirs: HashMap::new(),
            overflows: 0,
        };
        tree.visit("/");
        Ok(tree)
    }

    fn any_prefix_matches(patterns: &[CgroupPattern], p: &[&str]) -> bool {
        (0..=p.len()).any(|n| patterns.iter().any(|pat| pat.matches(&p[..n])))
    }

    /// Selected by the path patterns: an include matches it or an ancestor, no exclude does.
    pub fn selects(&self, rel: &str) -> bool {
        let p = parts(rel);
        (self.includes.is_empty() || Self::any_prefix_matches(&self.includes, &p)) && !Self::any_prefix_matches(&self.excludes, &p)
    }

    /// Worth walking and watching: selected, or a descendant could be.
    fn interesting(&self, rel: &str) -> bool {
        let p = parts(rel);
        if Self::any_prefix_matches(&self.excludes, &p) {
            return false;
        }
        self.includes.is_empty() || Self::any_prefix_matches(&self.includes, &p) || self.includes.iter().any(|i| i.may_match_below(&p))
    }

    /// Walks `rel` and its interesting descendants, watching each (the watch is added before
    /// listing, so a child created meanwhile is either listed or reported).
    fn visit(&mut self, rel: &str) {
        if !self.interesting(rel) {
            return;
        }
        let dir = self.mount.join(rel.trim_start_matches('/'));
        let Ok(meta) = std::fs::metadata(&dir) else { return };
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_ONLYDIR
            | AddWatchFlags::IN_DONT_FOLLOW;
        match self.inotify.get_ref().0.add_watch(&dir, flags) {
            Ok(wd) => {
                self.watches.insert(wd, rel.to_owned());
            }
            Err(e) => tracing::warn!(path = %dir.display(), error = %e, "cannot watch a cgroup directory: its new children are seen only at the next full walk"),
        }
        self.dirs.insert(rel.to_owned(), meta.ino());
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                self.visit(&join(rel, &name));
            }
        }
    }

    fn forget(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        self.dirs.retain(|d, _| d != rel && !d.starts_with(&prefix));
    }

    /// Waits until inotify has something to say.
    pub async fn readable(&self) -> std::io::Result<()> {
        let mut guard = self.inotify.readable().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Applies what inotify reported; true when the set of directories changed.
    pub fn drain(&mut self) -> bool {
        let mut changed = false;
        loop {
            let events = match self.inotify.get_ref().0.read_events() {
                Ok(events) if !events.is_empty() => events,
                _ => break,
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    self.overflows += 1;
                    tracing::warn!("the cgroup watch queue overflowed: walking the tree again");
                    self.dirs.clear();
                    self.visit("/");
                    changed = true;
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.watches.remove(&ev.wd);
                    continue;
                }
                let (Some(parent), Some(name)) = (self.watches.get(&ev.wd).cloned(), ev.name) else { continue };
                if !ev.mask.contains(AddWatchFlags::IN_ISDIR) {
                    continue;
                }
                let rel = join(&parent, &name.to_string_lossy());
                if ev.mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                    self.visit(&rel);
                    changed = true;
                } else if ev.mask.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM) {
                    self.forget(&rel);
                    changed = true;
                }
            }
        }
        changed
    }

    /// The selected cgroups: id -> absolute directory.
    pub fn selected(&self) -> HashMap<u64, PathBuf> {
        self.dirs
            .iter()
            .filter(|(rel, _)| self.selects(rel))
            .map(|(rel, id)| (*id, self.mount.join(rel.trim_start_matches('/'))))
            .collect()
    }

    /// How many directories are watched.
    pub fn watched(&self) -> usize {
        self.watches.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> CgroupPattern {
        CgroupPattern::parse(s).unwrap()
    }

    #[tokio::test]
    async fn follows_creation_and_removal() {
        // A plain directory tree behaves like cgroupfs for mkdir/rmdir and inotify.
        let mount = std::env::temp_dir().join(format!("tapwire-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&mount);
        std::fs::create_dir_all(mount.join("kubepods/burstable/podaaa/c1")).unwrap();
        std::fs::create_dir_all(mount.join("system.slice/x")).unwrap();
        let mut tree = CgroupTree::new(&mount, &[pat("/kubepods/**/pod*")], &[pat("/kubepods/**/podbad")]).unwrap();
        let names = |t: &CgroupTree| {
            let mut v: Vec<String> = t.selected().values().map(|p| p.strip_prefix(&mount).unwrap().display().to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&tree), vec!["kubepods/burstable/podaaa", "kubepods/burstable/podaaa/c1"]);
        // system.slice is never walked or watched.
        assert!(!tree.dirs.contains_key("/system.slice"));

        std::fs::create_dir_all(mount.join("kubepods/besteffort/podbbb")).unwrap();
        std::fs::create_dir_all(mount.join("kubepods/besteffort/podbad")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), tree.readable()).await.unwrap().unwrap();
        // mkdir -p made two levels; the walk of the new parent finds the child.
        tree.drain();
        assert_eq!(
            names(&tree),
            vec!["kubepods/besteffort/podbbb", "kubepods/burstable/podaaa", "kubepods/burstable/podaaa/c1"]
        );
        std::fs::remove_dir(mount.join("kubepods/burstable/podaaa/c1")).unwrap();
        std::fs::remove_dir(mount.join("kubepods/burstable/podaaa")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), tree.readable()).await.unwrap().unwrap();
        assert!(tree.drain());
        assert_eq!(names(&tree), vec!["kubepods/besteffort/podbbb"]);
        std::fs::remove_dir_all(&mount).unwrap();
    }

    #[test]
    fn literal_includes_must_exist() {
        let mount = std::env::temp_dir();
        let err = CgroupTree::new(&mount, &[pat("no-such-cgroup-here")], &[]).err().unwrap().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
