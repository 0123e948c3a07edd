//! Which processes tapwire watches: cgroup paths and globs, Kubernetes namespaces and pod
//! labels, listening ports, executable names, each with exclusions.

pub mod labels;
pub mod pattern;
pub mod process;
pub mod tree;

pub use labels::LabelSelector;
pub use pattern::{CgroupPattern, ExeGlob};

/// The user's selection, resolved from flags, environment and configuration file. A process is
/// watched when it matches every kind of criterion that is given (one value of a kind is
/// enough) and no exclusion of any kind.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectionConfig {
    pub cgroups: Vec<CgroupPattern>,
    pub exclude_cgroups: Vec<CgroupPattern>,
    pub namespaces: Vec<String>,
    pub exclude_namespaces: Vec<String>,
    pub pod_selectors: Vec<LabelSelector>,
    pub exclude_pod_selectors: Vec<LabelSelector>,
    pub ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    pub executables: Vec<ExeGlob>,
    pub exclude_executables: Vec<ExeGlob>,
    /// Leave out processes that export OTLP traces themselves.
    pub exclude_otlp_exporters: bool,
}

impl SelectionConfig {
    /// Whether any inclusion criterion is given (without one, nothing would be watched).
    pub fn selects_anything(&self) -> bool {
        !(self.cgroups.is_empty()
            && self.namespaces.is_empty()
            && self.pod_selectors.is_empty()
            && self.ports.is_empty()
            && self.executables.is_empty())
    }

    /// Whether the selection needs Kubernetes metadata.
    pub fn uses_pods(&self) -> bool {
        !(self.namespaces.is_empty()
            && self.exclude_namespaces.is_empty()
            && self.pod_selectors.is_empty()
            && self.exclude_pod_selectors.is_empty())
    }

    /// Whether only some processes of a selected cgroup are watched (ports, executables).
    pub fn per_process(&self) -> bool {
        !(self.ports.is_empty() && self.executables.is_empty())
    }
}

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use tapwire_common::{CGROUP_ALL, CGROUP_LISTED, TGID_EXCLUDE, TGID_INCLUDE};

use self::{
    process::{ProcInfo, listening_ports, otlp_exporter_reason},
    tree::{CgroupTree, TreeError},
};
use crate::{
    capture::{CaptureError, Probes},
    discover::{
        container,
        k8s::{PodLookup, PodMeta},
    },
};

/// What is known of one process of a selected cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    In,
    Out,
    /// Not listening on a selected port yet: asked again every second.
    Waiting,
}

/// The live selection: the cgroup tree under watch, pod and process criteria, and the kernel
/// maps kept equal to them.
pub struct Selector {
    config: SelectionConfig,
    tree: CgroupTree,
    pods: Arc<dyn PodLookup>,
    proc_root: PathBuf,
    /// Selected cgroups (paths and pods agree): id -> directory.
    cgroups: HashMap<u64, PathBuf>,
    /// Pod cgroups whose pod metadata is not known yet (re-checked every tick).
    waiting_for_pods: usize,
    verdicts: crate::FastMap<u32, (Verdict, Instant)>,
    applied_cgroups: HashMap<u64, u32>,
    applied_tgids: HashMap<u32, u32>,
    dirty: bool,
}

impl Selector {
    pub fn new(config: &SelectionConfig, mount: &Path, pods: Arc<dyn PodLookup>) -> Result<Selector, TreeError> {
        let tree = CgroupTree::new(mount, &config.cgroups, &config.exclude_cgroups)?;
        let mut s = Selector {
            config: config.clone(),
            tree,
            pods,
            proc_root: PathBuf::from("/proc"),
            cgroups: HashMap::new(),
            waiting_for_pods: 0,
            verdicts: crate::FastMap::default(),
            applied_cgroups: HashMap::new(),
            applied_tgids: HashMap::new(),
            dirty: true,
        };
        s.recompute();
        s.tick();
        Ok(s)
    }

    /// The selected cgroups: id -> directory.
    pub fn cgroups(&self) -> &HashMap<u64, PathBuf> {
        &self.cgroups
    }

    /// Directories under inotify watch.
    pub fn watched(&self) -> usize {
        self.tree.watched()
    }

    /// Waits for a change in the cgroup tree (cancel-safe).
    pub async fn tree_changed(&self) -> std::io::Result<()> {
        self.tree.readable().await
    }

    /// Reads the tree changes; true when the selected cgroups changed.
    pub fn on_tree_change(&mut self) -> bool {
        self.tree.drain() && self.recompute()
    }

    /// Once a second: pods whose metadata arrived, new processes of cgroups where only some
    /// processes are watched, processes that started listening.
    pub fn tick(&mut self) -> bool {
        let mut changed = self.waiting_for_pods > 0 && self.recompute();
        if self.config.per_process() {
            let mut pids = Vec::new();
            for dir in self.cgroups.values() {
                if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    pids.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                }
            }
            for pid in pids {
                let known = self.verdicts.get(&pid).map(|(v, _)| *v);
                if matches!(known, None | Some(Verdict::Waiting)) {
                    let v = self.decide(pid);
                    changed |= known != Some(v);
                    self.verdicts.insert(pid, (v, Instant::now()));
                }
            }
        }
        self.dirty |= changed;
        changed
    }

    /// Forgets processes that have exited (and their kernel entries at the next sync).
    pub fn prune(&mut self) {
        let root = self.proc_root.clone();
        let before = self.verdicts.len();
        self.verdicts.retain(|pid, _| root.join(pid.to_string()).exists());
        self.dirty |= before != self.verdicts.len();
    }

    /// Whether events of `pid` (in cgroup `cgroup_id`) are wanted. A process seen for the first
    /// time in a cgroup where every process is watched is checked against the exclusions here,
    /// before its first event is used.
    pub fn admits(&mut self, pid: u32, cgroup_id: u64) -> bool {
        if pid == 0 || !self.cgroups.contains_key(&cgroup_id) {
            return true;
        }
        if let Some((v, _)) = self.verdicts.get(&pid) {
            return *v == Verdict::In;
        }
        if self.config.per_process() {
            // The kernel only passes listed processes of these cgroups.
            return true;
        }
        // A process that already exited (a short-lived client such as curl, gone before its
        // first events are read) cannot be checked against the exclusions; its cgroup is
        // selected, so its events are kept rather than lost.
        let v = match ProcInfo::read(&self.proc_root, pid) {
            Some(info) => decide(&self.config, &info, || listening_ports(&self.proc_root, pid), pid),
            None => Verdict::In,
        };
        self.verdicts.insert(pid, (v, Instant::now()));
        if v == Verdict::Out {
            self.dirty = true;
        }
        v == Verdict::In
    }

    /// `pid` was seen sending an OTLP/HTTP trace export: it instruments itself.
    pub fn saw_otlp_export(&mut self, pid: u32) {
        if self.config.exclude_otlp_exporters && self.verdicts.get(&pid).map(|(v, _)| *v) != Some(Verdict::Out) {
            tracing::info!(pid, "excluding a process seen exporting OTLP traces itself");
            self.verdicts.insert(pid, (Verdict::Out, Instant::now()));
            self.dirty = true;
        }
    }

    /// Brings the kernel maps in line with the selection.
    pub fn sync(&mut self, probes: &mut Probes) -> Result<(), CaptureError> {
        if !self.dirty {
            return Ok(());
        }
        let mode = if self.config.per_process() { CGROUP_LISTED } else { CGROUP_ALL };
        let want_cgroups: HashMap<u64, u32> = self.cgroups.keys().map(|id| (*id, mode)).collect();
        let want_tgids: HashMap<u32, u32> = self
            .verdicts
            .iter()
            .filter_map(|(pid, (v, _))| match v {
                Verdict::In if self.config.per_process() => Some((*pid, TGID_INCLUDE)),
                Verdict::Out => Some((*pid, TGID_EXCLUDE)),
                _ => None,
            })
            .collect();
        let cg = diff(&self.applied_cgroups, &want_cgroups);
        let tg = diff(&self.applied_tgids, &want_tgids);
        probes.update_selection(&cg, &tg)?;
        if !cg.is_empty() {
            tracing::info!(changed = cg.len(), watched = want_cgroups.len(), "cgroup selection changed");
        }
        self.applied_cgroups = want_cgroups;
        self.applied_tgids = want_tgids;
        self.dirty = false;
        Ok(())
    }

    fn recompute(&mut self) -> bool {
        let mut waiting = 0;
        let mut now = HashMap::new();
        for (id, dir) in self.tree.selected() {
            match self.pod_verdict(&dir) {
                Some(true) => {
                    now.insert(id, dir);
                }
                Some(false) => {}
                None => waiting += 1,
            }
        }
        self.waiting_for_pods = waiting;
        let changed = now.len() != self.cgroups.len() || now.keys().any(|k| !self.cgroups.contains_key(k));
        self.cgroups = now;
        self.dirty |= changed;
        changed
    }

    /// Some(selected) by the pod criteria; None while the cgroup's pod is not known yet.
    fn pod_verdict(&self, dir: &Path) -> Option<bool> {
        if !self.config.uses_pods() {
            return Some(true);
        }
        let path = dir.to_string_lossy();
        let uid = container::pod_uid(&path);
        let pod = container::container_id(&path)
            .and_then(|c| self.pods.by_container_id(&c))
            .or_else(|| uid.as_deref().and_then(|u| self.pods.by_pod_uid(u)));
        match (pod, uid) {
            (Some(pod), _) => Some(self.pod_matches(&pod)),
            (None, Some(_)) => None,
            // Not a pod: only exclusions are about pods, so it stays.
            (None, None) => Some(self.config.namespaces.is_empty() && self.config.pod_selectors.is_empty()),
        }
    }

    fn pod_matches(&self, pod: &PodMeta) -> bool {
        let c = &self.config;
        (c.namespaces.is_empty() || c.namespaces.contains(&pod.namespace))
            && (c.pod_selectors.is_empty() || c.pod_selectors.iter().any(|s| s.matches(&pod.labels)))
            && !c.exclude_namespaces.contains(&pod.namespace)
            && !c.exclude_pod_selectors.iter().any(|s| s.matches(&pod.labels))
    }

    fn decide(&self, pid: u32) -> Verdict {
        let Some(info) = ProcInfo::read(&self.proc_root, pid) else { return Verdict::Out };
        decide(&self.config, &info, || listening_ports(&self.proc_root, pid), pid)
    }
}

/// The verdict on one process of a selected cgroup.
fn decide(c: &SelectionConfig, info: &ProcInfo, ports: impl FnOnce() -> HashSet<u16>, pid: u32) -> Verdict {
    let named = |globs: &[ExeGlob]| globs.iter().any(|g| info.names().any(|n| g.matches(n)));
    if named(&c.exclude_executables) {
        return Verdict::Out;
    }
    if let Some(reason) = c.exclude_otlp_exporters.then(|| otlp_exporter_reason(&info.environ, &info.cmdline)).flatten() {
        tracing::info!(pid, exe = info.exe.as_deref().unwrap_or("?"), reason, "not watching a process that exports OTLP itself");
        return Verdict::Out;
    }
    if !c.executables.is_empty() && !named(&c.executables) {
        return Verdict::Out;
    }
    if c.ports.is_empty() && c.exclude_ports.is_empty() {
        return Verdict::In;
    }
    let listening = ports();
    if c.exclude_ports.iter().any(|p| listening.contains(p)) {
        return Verdict::Out;
    }
    if !c.ports.is_empty() && !c.ports.iter().any(|p| listening.contains(p)) {
        return Verdict::Waiting;
    }
    Verdict::In
}

/// The pid of a process whose span shows it sending an OTLP/HTTP trace export
/// (`POST .../v1/traces`), if this span is one.
pub fn otlp_export_sender(span: &crate::model::Span) -> Option<u32> {
    use crate::model::{SpanKind, Value};
    if span.kind != SpanKind::Client {
        return None;
    }
    let is = |k: &str, want: &dyn Fn(&str) -> bool| matches!(span.attributes.get(k), Some(Value::Str(v)) if want(v));
    if !(is("http.request.method", &|m| m == "POST") && is("url.full", &|u| u.split('?').next().is_some_and(|p| p.ends_with("/v1/traces")))) {
        return None;
    }
    match span.resource.attributes.get("process.pid") {
        Some(Value::Int(pid)) => u32::try_from(*pid).ok(),
        _ => None,
    }
}

/// Entries to write (Some) and to delete (None) to turn `have` into `want`.
fn diff<K: Copy + Eq + std::hash::Hash>(have: &HashMap<K, u32>, want: &HashMap<K, u32>) -> Vec<(K, Option<u32>)> {
    let mut out: Vec<(K, Option<u32>)> =
        want.iter().filter(|(k, v)| have.get(k) != Some(v)).map(|(k, v)| (*k, Some(*v))).collect();
    out.extend(have.keys().filter(|k| !want.contains_key(k)).map(|k| (*k, None)));
    out
}

#[cfg(test)]
mod tests;
