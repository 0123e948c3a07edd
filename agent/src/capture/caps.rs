//! The Linux capabilities tapwire uses, what each one is for, and which of them this process
//! holds (its effective set, from /proc/self/status). `tapwire check` reports them by name and
//! `tapwire run` refuses to start, with one sentence naming them, when a required one is missing.

/// A capability tapwire may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// The kernel's name (`CAP_BPF`); Kubernetes writes it without the prefix.
    pub name: &'static str,
    /// Bit number in the capability sets (linux/capability.h).
    pub bit: u32,
    /// What tapwire does with it.
    pub purpose: &'static str,
    pub need: Need,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// tapwire cannot run without it (CAP_SYS_ADMIN stands in for it, as in the kernel's
    /// `bpf_capable()` and `perfmon_capable()`).
    Required,
    /// One feature is lost without it: the sentence says what happens instead.
    Feature(&'static str),
    /// Only on kernels before this version.
    Before((u32, u32), &'static str),
    /// Required when tracefs is not mounted; otherwise a feature: what is lost without it.
    TracefsMount(&'static str),
}

pub const SYS_ADMIN: u32 = 21;

/// Every capability tapwire uses, in the order `tapwire check` lists them. The DaemonSet of
/// deploy/kubernetes grants the first six.
pub const CAPABILITIES: &[Capability] = &[
    Capability { name: "CAP_BPF", bit: 39, purpose: "load the eBPF programs and create their maps", need: Need::Required },
    Capability {
        name: "CAP_PERFMON",
        bit: 38,
        purpose: "attach the programs to tracepoints and read the watched processes' syscall buffers",
        need: Need::Required,
    },
    Capability {
        name: "CAP_NET_ADMIN",
        bit: 12,
        purpose: "create the socket maps and attach the cgroup socket programs of trace-context propagation, \
                  which are part of the eBPF object even when propagation is off",
        need: Need::Required,
    },
    Capability {
        name: "CAP_SYS_PTRACE",
        bit: 19,
        purpose: "read /proc/<pid>/exe and fd/ of services that hold capabilities tapwire lacks or run as another user \
                  (their environ is readable with CAP_PERFMON)",
        need: Need::Feature("tapwire cannot read the executable or the sockets of such services"),
    },
    Capability {
        name: "CAP_DAC_READ_SEARCH",
        bit: 2,
        purpose: "pass the permission bits of /proc/<pid>/environ and fd/ of services run as another user",
        need: Need::Feature("tapwire cannot read OTEL_SERVICE_NAME or the sockets of services run as another user"),
    },
    Capability {
        name: "CAP_SYS_RESOURCE",
        bit: 24,
        purpose: "lift RLIMIT_MEMLOCK, which limits eBPF map memory",
        need: Need::Before((5, 11), "Linux 5.11 and later charge eBPF memory to the memory cgroup instead"),
    },
    Capability {
        name: "CAP_SYS_ADMIN",
        bit: SYS_ADMIN,
        purpose: "mount tracefs and bpffs when they are not mounted, enter other network namespaces for the accept-queue limit \
                  of their listeners, and turn on the eBPF programs' run-time statistics",
        need: Need::TracefsMount(
            "tapwire leaves out the accept-queue limit of services in other network namespaces and the eBPF \
             programs' run counts and times (unless the node sets sysctl kernel.bpf_stats_enabled=1), and cannot \
             mount bpffs for the propagation sockhash where the node has none at /sys/fs/bpf",
        ),
    },
];

/// The effective capability set of this process, or None when /proc/self/status cannot say.
pub fn effective() -> Option<u64> {
    parse_cap_eff(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Whether `set` grants `cap` for tapwire's purpose (SYS_ADMIN covers the required ones).
pub fn holds(set: u64, cap: &Capability) -> bool {
    let has = |bit: u32| set & (1u64 << bit) != 0;
    has(cap.bit) || (cap.need == Need::Required && has(SYS_ADMIN))
}

/// The required capabilities missing from `set`.
pub fn missing_required(set: u64) -> Vec<&'static Capability> {
    CAPABILITIES.iter().filter(|c| c.need == Need::Required && !holds(set, c)).collect()
}

/// `CAP_BPF`, `CAP_BPF and CAP_PERFMON`, `CAP_A, CAP_B and CAP_C`.
pub fn names(caps: &[&Capability]) -> String {
    match caps {
        [] => String::new(),
        [one] => one.name.to_owned(),
        [init @ .., last] => format!("{} and {}", init.iter().map(|c| c.name).collect::<Vec<_>>().join(", "), last.name),
    }
}

/// The sentence `tapwire run` stops with when required capabilities are missing from `set`.
pub fn missing_required_error(set: u64) -> Option<String> {
    let missing = missing_required(set);
    if missing.is_empty() {
        return None;
    }
    let kubernetes = missing.iter().map(|c| c.name.trim_start_matches("CAP_")).collect::<Vec<_>>().join(", ");
    Some(format!(
        "tapwire lacks {}, which it needs to load and attach its eBPF programs: run it as root or grant {} \
         (in Kubernetes, securityContext.capabilities.add: [{kubernetes}]); `tapwire check` lists every capability",
        names(&missing),
        if missing.len() == 1 { "it" } else { "them" },
    ))
}

/// One `tapwire check` line per capability: (ok, required, what, detail).
pub fn report(set: u64, kernel: (u32, u32), tracefs_mounted: bool) -> Vec<(bool, bool, String, String)> {
    CAPABILITIES
        .iter()
        .map(|cap| {
            let fix = format!("grant {} (Kubernetes: capabilities.add {}) or run as root", cap.name, cap.name.trim_start_matches("CAP_"));
            let (ok, required, detail) = match (holds(set, cap), cap.need) {
                (true, _) => (true, false, format!("held: tapwire uses it to {}", cap.purpose)),
                (false, Need::Required) => (false, true, format!("missing: tapwire cannot run without it, it is needed to {}; {fix}", cap.purpose)),
                (false, Need::Feature(loss)) => (false, false, format!("missing: {loss}; {fix}")),
                (false, Need::Before(version, why)) if kernel >= version => (true, false, format!("not held, not needed: {why}")),
                (false, Need::Before(..)) => (false, false, format!("missing: eBPF maps may not fit under RLIMIT_MEMLOCK on this kernel; {fix}")),
                (false, Need::TracefsMount(loss)) if tracefs_mounted => (false, false, format!("missing: not needed to run (tracefs is mounted), but {loss}; {fix}")),
                (false, Need::TracefsMount(_)) => {
                    (false, true, format!("missing: tracefs is not mounted and tapwire cannot mount it without {}; mount tracefs on the node or {fix}", cap.name))
                }
            };
            (ok, required, cap.name.to_owned(), detail)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> u64 {
        names.iter().map(|n| CAPABILITIES.iter().find(|c| c.name == *n).unwrap().bit).fold(0, |s, b| s | 1 << b)
    }

    #[test]
    fn parses_the_effective_set() {
        let status = "Name:\ttapwire\nCapInh:\t0000000000000000\nCapEff:\t000000c000001004\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(set(&["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_DAC_READ_SEARCH"])));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn sys_admin_stands_in_for_the_required_ones_only() {
        assert!(missing_required(set(&["CAP_SYS_ADMIN"])).is_empty());
        let sys_admin_only = report(set(&["CAP_SYS_ADMIN"]), (6, 18), true);
        let ptrace = sys_admin_only.iter().find(|l| l.2 == "CAP_SYS_PTRACE").unwrap();
        assert!(!ptrace.0 && !ptrace.1, "{ptrace:?}");
    }

    #[test]
    fn the_error_names_what_is_missing_and_what_to_do() {
        assert_eq!(missing_required_error(set(&["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"])), None);
        assert_eq!(
            missing_required_error(set(&["CAP_PERFMON", "CAP_NET_ADMIN"])).unwrap(),
            "tapwire lacks CAP_BPF, which it needs to load and attach its eBPF programs: run it as root or grant it \
             (in Kubernetes, securityContext.capabilities.add: [BPF]); `tapwire check` lists every capability"
        );
        assert!(missing_required_error(0).unwrap().starts_with("tapwire lacks CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, which "));
    }

    #[test]
    fn report_lines() {
        let daemonset = set(&["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_SYS_RESOURCE"]);
        let lines = report(daemonset, (6, 18), true);
        assert_eq!(lines.iter().map(|l| l.2.as_str()).collect::<Vec<_>>(), CAPABILITIES.iter().map(|c| c.name).collect::<Vec<_>>());
        // Everything but SYS_ADMIN, which is a warning: what is lost, not a failure.
        let (sys_admin, rest) = lines.split_last().unwrap();
        assert!(rest.iter().all(|l| l.0), "{lines:?}");
        assert!(!sys_admin.0 && !sys_admin.1 && sys_admin.3.contains("not needed to run (tracefs is mounted)"), "{sys_admin:?}");
        // Without tracefs, SYS_ADMIN becomes required.
        let sys_admin = report(daemonset, (6, 18), false).pop().unwrap();
        assert!(!sys_admin.0 && sys_admin.1 && sys_admin.3.contains("tracefs is not mounted"), "{sys_admin:?}");
        // SYS_RESOURCE matters before 5.11 only.
        let old = report(set(&["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]), (5, 10), true);
        assert!(!old.iter().find(|l| l.2 == "CAP_SYS_RESOURCE").unwrap().0);
        let new = report(set(&["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]), (6, 1), true);
        assert!(new.iter().find(|l| l.2 == "CAP_SYS_RESOURCE").unwrap().0);
    }
}
