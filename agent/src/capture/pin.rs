//! The propagation sockhash outlives the agent: pinned in bpffs, it is freed only once no
//! connection is left in it.
//!
//! Received data of a socket in the sockhash goes through the pass-through verdict program
//! into the socket's psock queue (see `client_receive` in ebpf-probes/src/inject.rs for why
//! that program is there), and the kernel frees that queue when the socket leaves the sockhash,
//! which a map freed with the agent's exit makes every socket do at once. Responses that had
//! arrived but were not yet read were lost when tapwire was stopped or killed. So the sockhash
//! is pinned under [`DIR`], named by its map id (unique until the next boot): a stopped or
//! killed agent leaves its sockets where they are, with their message programs, and the
//! connections go on unharmed. Every tapwire on the node removes the pins of sockhashes left
//! empty (their connections closed), its own at a clean stop when nothing is in it; that frees
//! those two programs and the map.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData, SockHash};

/// Where the sockhashes are pinned (the conventional bpffs mount point).
pub const BPFFS: &str = "/sys/fs/bpf";
pub const DIR: &str = "/sys/fs/bpf/tapwire";
/// bpffs refuses dots in names (reserved by the kernel).
const PREFIX: &str = "client_socks_";
/// statfs(2) f_type of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &str) -> bool {
    let Ok(c) = CString::new(path) else { return false };
    // SAFETY: a valid C string and an out-parameter of the right type.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure [`DIR`] exists on a bpffs, mounting bpffs at [`BPFFS`] when nothing is mounted
/// there (systemd mounts it at boot on most distributions; the DaemonSet mounts the host's).
pub fn ensure_dir() -> Result<(), String> {
    if !is_bpffs(BPFFS) {
        let (source, target, fstype, data) = (c"bpf", c"/sys/fs/bpf", c"bpf", c"mode=0700");
        // SAFETY: valid C strings; mount(2) reads them only.
        let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast()) };
        if rc != 0 {
            return Err(format!(
                "{BPFFS} is not a bpffs and mounting one failed ({}); mount it on the host (mount -t bpf bpf {BPFFS}) \
                 and, in a container, give tapwire the host's {BPFFS}",
                std::io::Error::last_os_error()
            ));
        }
    }
    std::fs::create_dir_all(DIR).map_err(|e| format!("cannot create {DIR}: {e}"))
}

/// The pin path of a sockhash with this map id.
pub fn path_for(map_id: u32) -> PathBuf {
    Path::new(DIR).join(format!("{PREFIX}{map_id}"))
}

/// Sockets in a sockhash.
pub fn members<T: std::borrow::Borrow<MapData>>(socks: &SockHash<T, u64>) -> usize {
    socks.keys().filter(Result::is_ok).count()
}

/// What [`reap`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Pins removed: their sockhash had no socket left.
    pub removed: Vec<PathBuf>,
    /// Pins kept, with the sockets still in them.
    pub kept: Vec<(PathBuf, usize)>,
}

/// The sockhash pins under [`DIR`] other than `own`, with the sockets in each (None: not a
/// sockhash tapwire can read).
pub fn pins(own: Option<&Path>) -> Vec<(PathBuf, Option<usize>)> {
    let Ok(entries) = std::fs::read_dir(DIR) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| Some(e.path().as_path()) != own && e.file_name().as_bytes().starts_with(PREFIX.as_bytes()))
        .map(|e| {
            let count = MapData::from_pin(e.path())
                .ok()
                .and_then(|data| Map::from_map_data(data).ok())
                .and_then(|map| SockHash::<MapData, u64>::try_from(map).ok())
                .map(|socks| members(&socks));
            (e.path(), count)
        })
        .collect()
}

/// Removes the pins under [`DIR`], other than `own`, whose sockhash holds no socket.
pub fn reap(own: Option<&Path>) -> Reaped {
    let mut out = Reaped::default();
    for (path, count) in pins(own) {
        match count {
            Some(0) if std::fs::remove_file(&path).is_ok() => out.removed.push(path),
            Some(0) => {}
            Some(n) => out.kept.push((path, n)),
            // Not a sockhash of ours (or unreadable): left alone.
            None => {}
        }
    }
    out
}
