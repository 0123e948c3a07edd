//! The embedded eBPF object: load, attach every hook, keep the cgroup selection map in sync.

use std::{collections::HashSet, os::fd::AsRawFd, path::{Path, PathBuf}};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{CgroupAttachMode, SkMsg, SkSkb, SockOps, TracePoint},
};
use tapwire_common::{COUNTER_SLOTS, MAX_PAYLOAD, SamplerParams, names};

/// The object built by agent/build.rs from ebpf-probes/ (empty when built without eBPF).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapwire-probes"));

/// Every hook tapwire attaches: (program name in the object, tracepoint category, tracepoint
/// name, what it is for). `tapwire check` reports each of them.
pub const HOOKS: &[(&str, &str, &str, &str)] = &[
    ("sys_enter_read", "syscalls", "sys_enter_read", "bytes read from sockets"),
    ("sys_exit_read", "syscalls", "sys_exit_read", "bytes read from sockets"),
    ("sys_enter_write", "syscalls", "sys_enter_write", "bytes written to sockets"),
    ("sys_exit_write", "syscalls", "sys_exit_write", "bytes written to sockets"),
    ("sys_enter_readv", "syscalls", "sys_enter_readv", "vectored reads"),
    ("sys_exit_readv", "syscalls", "sys_exit_readv", "vectored reads"),
    ("sys_enter_writev", "syscalls", "sys_enter_writev", "vectored writes"),
    ("sys_exit_writev", "syscalls", "sys_exit_writev", "vectored writes"),
    ("sys_enter_recvfrom", "syscalls", "sys_enter_recvfrom", "recv/recvfrom"),
    ("sys_exit_recvfrom", "syscalls", "sys_exit_recvfrom", "recv/recvfrom"),
    ("sys_enter_sendto", "syscalls", "sys_enter_sendto", "send/sendto"),
    ("sys_exit_sendto", "syscalls", "sys_exit_sendto", "send/sendto"),
    ("sys_enter_recvmsg", "syscalls", "sys_enter_recvmsg", "recvmsg"),
    ("sys_exit_recvmsg", "syscalls", "sys_exit_recvmsg", "recvmsg"),
    ("sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg", "sendmsg"),
    ("sys_exit_sendmsg", "syscalls", "sys_exit_sendmsg", "sendmsg"),
    ("sys_enter_sendfile64", "syscalls", "sys_enter_sendfile64", "sendfile (static files: bytes counted)"),
    ("sys_exit_sendfile64", "syscalls", "sys_exit_sendfile64", "sendfile (static files: bytes counted)"),
    ("sys_enter_close", "syscalls", "sys_enter_close", "end of connections"),
    ("sock_send_length", "sock", "sock_send_length", "which TCP socket a send uses"),
    ("sock_recv_length", "sock", "sock_recv_length", "which TCP socket a receive uses"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state", "connection endpoints and client/server role"),
    ("tcp_retransmit_skb", "tcp", "tcp_retransmit_skb", "retransmits per service"),
    ("tcp_send_reset", "tcp", "tcp_send_reset", "resets sent per service"),
    ("tcp_receive_reset", "tcp", "tcp_receive_reset", "resets received per service"),
    ("tcp_destroy_sock", "tcp", "tcp_destroy_sock", "forget sockets the kernel frees"),
];

/// The programs that carry trace context to the next service (`--context-propagation
/// headers`): (program name, what it is for). Not attached with `off`.
pub const PROPAGATION_HOOKS: &[(&str, &str)] = &[
    ("client_sockets", "sock_ops on the watched cgroups: adds their client TCP sockets to a sockhash"),
    ("inject_traceparent", "sk_msg on that sockhash: inserts traceparent into outbound HTTP/1 requests"),
    ("client_receive", "sk_skb verdict on that sockhash: passes received data unchanged (keeps FIONREAD and readiness right)"),
];

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("this tapwire binary was built without its eBPF programs (bpf-linker was missing at build time); rebuild with `cargo xtask build`")]
    NoProbes,
    #[error("the kernel refused to load tapwire's eBPF programs")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {0} is missing from the embedded object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the embedded object")]
    MissingMap(&'static str),
    #[error("the kernel refused to load program {name}")]
    ProgramLoad { name: &'static str, #[source] source: aya::programs::ProgramError },
    #[error("could not attach {category}:{name}")]
    Attach { category: &'static str, name: &'static str, #[source] source: aya::programs::ProgramError },
    #[error("could not attach {name} to cgroup {}", path.display())]
    AttachCgroup { name: &'static str, path: PathBuf, #[source] source: aya::programs::ProgramError },
    #[error("could not open cgroup {} to attach {name}", path.display())]
    OpenCgroup { name: &'static str, path: PathBuf, #[source] source: std::io::Error },
    #[error("context propagation is off: {0}")]
    PropagationUnsafe(String),
    #[error("map operation on {map} failed")]
    Map { map: &'static str, #[source] source: aya::maps::MapError },
}

/// Settings that shape the kernel side.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Payload bytes copied per syscall (clamped to MAX_PAYLOAD).
    pub payload_cap: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig { payload_cap: tapwire_common::DEFAULT_PAYLOAD_CAP }
    }
}

/// What the kernel counted for one program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRunStats {
    /// Program name in the object (the hook, e.g. `sys_enter_read`).
    pub program: String,
    /// Times the program ran.
    pub run_count: u64,
    /// Time spent running it.
    pub run_time: std::time::Duration,
}

/// The loaded object. Dropping it detaches every program: attachments are file descriptors
/// held by this process, so even a kill -9 leaves nothing attached, with one exception: the
/// propagation sockhash is pinned (see [`super::pin`]) and keeps its two message programs, and
/// the sockets in it, until no connection is left in it.
pub struct Probes {
    ebpf: Ebpf,
    /// cgroup directories the sock_ops program is attached to.
    propagation_cgroups: HashSet<PathBuf>,
    propagation_loaded: bool,
    /// Where the propagation sockhash is pinned, if it is.
    pin: Option<PathBuf>,
}

impl Probes {
    /// Loads the object with the agent's own pid excluded and the payload cap set.
    pub fn load(config: &CaptureConfig) -> Result<Probes, CaptureError> {
        if OBJECT.is_empty() {
            return Err(CaptureError::NoProbes);
        }
        // Older kernels charge eBPF memory to RLIMIT_MEMLOCK; harmless where memcg accounting is used.
        let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: setrlimit with a valid struct; failure is not fatal.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        let tgid = std::process::id();
        let cap = config.payload_cap.min(MAX_PAYLOAD as u32);
        let ebpf = EbpfLoader::new()
            .override_global(names::AGENT_TGID, &tgid, true)
            .override_global(names::PAYLOAD_CAP, &cap, true)
            .load(OBJECT)
            .map_err(CaptureError::Load)?;
        let mut probes = Probes { ebpf, propagation_cgroups: HashSet::new(), propagation_loaded: false, pin: None };
        probes.set_sampler(SamplerParams::DEFAULT)?;
        Ok(probes)
    }

    /// Loads and attaches one hook.
    pub fn attach(&mut self, hook: &(&'static str, &'static str, &'static str, &'static str)) -> Result<(), CaptureError> {
        let (prog_name, category, name, _) = *hook;
        let program: &mut TracePoint = self
            .ebpf
            .program_mut(prog_name)
            .ok_or(CaptureError::MissingProgram(prog_name))?
            .try_into()
            .map_err(|source| CaptureError::ProgramLoad { name: prog_name, source })?;
        program.load().map_err(|source| CaptureError::ProgramLoad { name: prog_name, source })?;
        program.attach(category, name).map_err(|source| CaptureError::Attach { category, name, source })?;
        Ok(())
    }

    /// Attaches every hook in [`HOOKS`], stopping at the first failure.
    pub fn attach_all(&mut self) -> Result<(), CaptureError> {
        for hook in HOOKS {
            self.attach(hook)?;
        }
        Ok(())
    }

    /// The head-sampling rule the kernel applies to traces that start here (its decision is the
    /// sampled flag of the trace ids it draws and of the `traceparent` it injects).
    pub fn set_sampler(&mut self, params: SamplerParams) -> Result<(), CaptureError> {
        let map = self.ebpf.map_mut(names::SAMPLER).ok_or(CaptureError::MissingMap(names::SAMPLER))?;
        let mut array: Array<&mut MapData, SamplerParams> =
            Array::try_from(map).map_err(|source| CaptureError::Map { map: names::SAMPLER, source })?;
        array.set(0, params, 0).map_err(|source| CaptureError::Map { map: names::SAMPLER, source })
    }

    /// Loads the propagation programs and attaches the sk_msg one to its sockhash (this alone
    /// touches no traffic: the sockhash is empty until sock_ops runs on a watched cgroup).
    pub fn load_propagation(&mut self) -> Result<(), CaptureError> {
        if self.propagation_loaded {
            return Ok(());
        }
        let (ops_name, msg_name) = (PROPAGATION_HOOKS[0].0, PROPAGATION_HOOKS[1].0);
        let ops: &mut SockOps = self
            .ebpf
            .program_mut(ops_name)
            .ok_or(CaptureError::MissingProgram(ops_name))?
            .try_into()
            .map_err(|source| CaptureError::ProgramLoad { name: ops_name, source })?;
        ops.load().map_err(|source| CaptureError::ProgramLoad { name: ops_name, source })?;
        let map = self.ebpf.map(names::CLIENT_SOCKS).ok_or(CaptureError::MissingMap(names::CLIENT_SOCKS))?;
        let socks: SockHash<&MapData, u64> =
            SockHash::try_from(map).map_err(|source| CaptureError::Map { map: names::CLIENT_SOCKS, source })?;
        let map_fd = socks.fd().try_clone().map_err(|e| CaptureError::Map { map: names::CLIENT_SOCKS, source: e.into() })?;
        let msg: &mut SkMsg = self
            .ebpf
            .program_mut(msg_name)
            .ok_or(CaptureError::MissingProgram(msg_name))?
            .try_into()
            .map_err(|source| CaptureError::ProgramLoad { name: msg_name, source })?;
        msg.load().map_err(|source| CaptureError::ProgramLoad { name: msg_name, source })?;
        msg.attach(&map_fd).map_err(|source| CaptureError::Attach { category: "sk_msg", name: msg_name, source })?;
        let verdict_name = PROPAGATION_HOOKS[2].0;
        let verdict: &mut SkSkb = self
            .ebpf
            .program_mut(verdict_name)
            .ok_or(CaptureError::MissingProgram(verdict_name))?
            .try_into()
            .map_err(|source| CaptureError::ProgramLoad { name: verdict_name, source })?;
        verdict.load().map_err(|source| CaptureError::ProgramLoad { name: verdict_name, source })?;
        verdict
            .attach(&map_fd)
            .map_err(|source| CaptureError::Attach { category: "sk_skb", name: verdict_name, source })?;
        if let Err(reason) = self.check_sockhash() {
            // Nothing watched is in the sockhash yet; take the message programs off it again.
            if let Some(Ok(msg)) = self.ebpf.program_mut(msg_name).map(<&mut SkMsg>::try_from) {
                let _ = msg.unload();
            }
            if let Some(Ok(verdict)) = self.ebpf.program_mut(verdict_name).map(<&mut SkSkb>::try_from) {
                let _ = verdict.unload();
            }
            return Err(CaptureError::PropagationUnsafe(reason));
        }
        self.propagation_loaded = true;
        match self.pin_sockhash() {
            Ok(path) => {
                tracing::info!(path = %path.display(), "propagation sockhash pinned: connections in it outlive a stop or kill of tapwire");
                self.pin = Some(path);
            }
            Err(e) => tracing::warn!(
                "the propagation sockhash is not pinned ({e}): if tapwire stops or is killed, responses that \
                 propagated connections have received but not yet read are lost"
            ),
        }
        Ok(())
    }

    /// The propagation sockhash as a typed map.
    fn client_socks(&self) -> Result<SockHash<&MapData, u64>, String> {
        let map = self.ebpf.map(names::CLIENT_SOCKS).ok_or("the sockhash is missing")?;
        SockHash::try_from(map).map_err(|e| e.to_string())
    }

    /// Pins the propagation sockhash under [`super::pin::DIR`], named by its map id.
    fn pin_sockhash(&self) -> Result<PathBuf, String> {
        super::pin::ensure_dir()?;
        let map = self.ebpf.map(names::CLIENT_SOCKS).ok_or("the sockhash is missing")?;
        let aya::maps::Map::SockHash(data) = map else { return Err("CLIENT_SOCKS is not a sockhash".into()) };
        let id = data.info().map_err(|e| e.to_string())?.id();
        let path = super::pin::path_for(id);
        map.pin(&path).map_err(|e| format!("pinning at {}: {}", path.display(), crate::capture::check::error_chain(&e)))?;
        Ok(path)
    }

    /// Pins again if the pin was removed, and removes the pins of sockhashes other tapwire
    /// processes left with no connection in them.
    pub fn maintain_pins(&mut self) -> super::pin::Reaped {
        if let Some(path) = &self.pin
            && !path.exists()
            && let Err(e) = self.pin_sockhash()
        {
            tracing::warn!("the propagation sockhash pin was removed and cannot be made again: {e}");
            self.pin = None;
        }
        super::pin::reap(self.pin.as_deref())
    }

    /// At a clean stop: removes this agent's pin when no connection is in the sockhash (then
    /// nothing of tapwire stays loaded), or keeps it, so that the connections still in it lose
    /// nothing. Returns the sockets left in it.
    pub fn release_pin(&mut self) -> usize {
        let Some(path) = self.pin.take() else { return 0 };
        // No socket may join between the count and the exit.
        if let Some(Ok(ops)) = self.ebpf.program_mut(PROPAGATION_HOOKS[0].0).map(<&mut SockOps>::try_from) {
            let _ = ops.unload();
        }
        let left = self.client_socks().map(|s| super::pin::members(&s)).unwrap_or(0);
        if left == 0 {
            let _ = std::fs::remove_file(&path);
        }
        left
    }

    /// Runs [`sockcheck::check`] with the propagation sockhash.
    fn check_sockhash(&mut self) -> Result<(), String> {
        let map = self.ebpf.map_mut(names::CLIENT_SOCKS).ok_or("the sockhash is missing")?;
        let mut socks: SockHash<&mut MapData, u64> = SockHash::try_from(map).map_err(|e| e.to_string())?;
        let socks = std::cell::RefCell::new(&mut socks);
        super::sockcheck::check(
            |stream, cookie| {
                socks.borrow_mut().insert(cookie, stream.as_raw_fd(), 0).map_err(|e| format!("adding a socket to the sockhash: {e}"))
            },
            |cookie| {
                let _ = socks.borrow_mut().remove(&cookie);
            },
        )
    }

    /// Attaches the sock_ops program to a cgroup directory (and so to every cgroup below it),
    /// alongside any program other software attached there (a bpf_link, which the kernel runs
    /// in addition to other programs). Idempotent.
    pub fn attach_propagation(&mut self, cgroup: &Path) -> Result<(), CaptureError> {
        if self.propagation_cgroups.contains(cgroup) {
            return Ok(());
        }
        self.load_propagation()?;
        let name = PROPAGATION_HOOKS[0].0;
        let dir = std::fs::File::open(cgroup)
            .map_err(|source| CaptureError::OpenCgroup { name, path: cgroup.to_owned(), source })?;
        let ops: &mut SockOps = self
            .ebpf
            .program_mut(name)
            .ok_or(CaptureError::MissingProgram(name))?
            .try_into()
            .map_err(|source| CaptureError::ProgramLoad { name, source })?;
        // A bpf_link attachment (kernel >= 5.7) always coexists with other programs on the
        // cgroup; the link API takes no flags, and the mode that sends none is `Single`.
        ops.attach(&dir, CgroupAttachMode::Single)
            .map_err(|source| CaptureError::AttachCgroup { name, path: cgroup.to_owned(), source })?;
        self.propagation_cgroups.insert(cgroup.to_owned());
        Ok(())
    }

    /// Applies changes to the selection maps: cgroup id -> `CGROUP_ALL`/`CGROUP_LISTED` and
    /// tgid -> `TGID_INCLUDE`/`TGID_EXCLUDE`; `None` removes the entry.
    pub fn update_selection(&mut self, cgroups: &[(u64, Option<u32>)], tgids: &[(u32, Option<u32>)]) -> Result<(), CaptureError> {
        let err = |map| move |source| CaptureError::Map { map, source };
        let map = self.ebpf.map_mut(names::SELECTED_CGROUPS).ok_or(CaptureError::MissingMap(names::SELECTED_CGROUPS))?;
        let mut map: BpfHashMap<&mut MapData, u64, u32> = BpfHashMap::try_from(map).map_err(err(names::SELECTED_CGROUPS))?;
        for (id, mode) in cgroups {
            match mode {
                Some(m) => map.insert(id, m, 0).map_err(err(names::SELECTED_CGROUPS))?,
                // Already gone is fine.
                None => drop(map.remove(id)),
            }
        }
        let map = self.ebpf.map_mut(names::SELECTED_TGIDS).ok_or(CaptureError::MissingMap(names::SELECTED_TGIDS))?;
        let mut map: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(map).map_err(err(names::SELECTED_TGIDS))?;
        for (tgid, verdict) in tgids {
            match verdict {
                Some(v) => map.insert(tgid, v, 0).map_err(err(names::SELECTED_TGIDS))?,
                None => drop(map.remove(tgid)),
            }
        }
        Ok(())
    }

    /// Takes the ring buffer out of the object, for the reader task.
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, CaptureError> {
        let map = self.ebpf.take_map(names::EVENTS).ok_or(CaptureError::MissingMap(names::EVENTS))?;
        RingBuf::try_from(map).map_err(|source| CaptureError::Map { map: names::EVENTS, source })
    }

    /// Run count and run time of every loaded program, as the kernel keeps them while run-time
    /// statistics are enabled (`crate::metrics::ebpf::enable_run_time_stats`); zero otherwise.
    pub fn program_stats(&self) -> Vec<ProgramRunStats> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramRunStats { program: name.to_owned(), run_count: info.run_count(), run_time: info.run_time() })
            })
            .collect()
    }

    /// The kernel's counters (see `tapwire_common::Counter`), summed over CPUs.
    pub fn kernel_counters(&self) -> Result<[u64; COUNTER_SLOTS as usize], CaptureError> {
        let map = self.ebpf.map(names::COUNTERS).ok_or(CaptureError::MissingMap(names::COUNTERS))?;
        let array: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| CaptureError::Map { map: names::COUNTERS, source })?;
        let mut out = [0u64; COUNTER_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = array.get(&(i as u32), 0).map_err(|source| CaptureError::Map { map: names::COUNTERS, source })?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}
