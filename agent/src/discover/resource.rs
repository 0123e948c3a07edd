//! Service identity of a watched process: its own environment, its pod (Kubernetes metadata),
//! its cgroup, its executable.
//!
//! `service.name`, first found wins: `OTEL_SERVICE_NAME`, then `service.name` in
//! `OTEL_RESOURCE_ATTRIBUTES`, both from the process's own environment; the pod annotation
//! `resource.opentelemetry.io/service.name`; the pod labels `app.kubernetes.io/instance`, then
//! `app.kubernetes.io/name`; the owning Deployment / StatefulSet / DaemonSet / CronJob / Job;
//! the pod name; the container name; the cgroup directory name; the executable name.

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    ResourceLookup, container,
    k8s::{NoPods, PodLookup, PodMeta},
};
use crate::model::{Attributes, Resource};

/// A resource built while its pod's metadata was not known yet is built again after this long.
const RETRY_WITHOUT_POD: Duration = Duration::from_secs(2);

/// Looks processes up in /proc and caches one resource per pid.
pub struct ProcResources {
    host_name: String,
    by_pid: HashMap<u32, Arc<Resource>>,
    /// Pids whose cgroup names a pod that was not known when their resource was built.
    without_pod: HashMap<u32, Instant>,
    pods: Arc<dyn PodLookup>,
    /// Added to every resource for keys not set otherwise (the agent's own
    /// `OTEL_RESOURCE_ATTRIBUTES` and the configuration's `resource.attributes`).
    extra: Vec<(String, String)>,
    /// Known cgroup ids and their paths (from the latest scan of the selection).
    cgroups: HashMap<u64, PathBuf>,
    proc_root: PathBuf,
}

impl ProcResources {
    pub fn new() -> Self {
        let host_name = nix::unistd::gethostname().map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned());
        ProcResources {
            host_name,
            by_pid: HashMap::new(),
            without_pod: HashMap::new(),
            pods: Arc::new(NoPods),
            extra: Vec::new(),
            cgroups: HashMap::new(),
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// Uses Kubernetes metadata from `pods` and adds `extra` attributes to every resource.
    pub fn with_context(mut self, pods: Arc<dyn PodLookup>, extra: Vec<(String, String)>) -> Self {
        self.pods = pods;
        self.extra = extra;
        self
    }

    /// Updates the cgroup id -> path table (called after each scan of the selection).
    pub fn set_cgroups(&mut self, cgroups: HashMap<u64, PathBuf>) {
        self.cgroups = cgroups;
    }

    /// Forgets processes that have exited.
    pub fn prune(&mut self) {
        let root = self.proc_root.clone();
        self.by_pid.retain(|pid, _| root.join(pid.to_string()).exists());
        let by_pid = &self.by_pid;
        self.without_pod.retain(|pid, _| by_pid.contains_key(pid));
    }

    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    /// The resource of `pid`, and whether its pod was looked for and not found.
    fn build(&self, pid: u32, cgroup_id: u64) -> (Resource, bool) {
        let proc_dir = self.proc_root.join(pid.to_string());
        let env = fs::read(proc_dir.join("environ")).unwrap_or_default();
        let exe = fs::read_link(proc_dir.join("exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .or_else(|| fs::read_to_string(proc_dir.join("comm")).ok().map(|s| s.trim().to_owned()));
        let cgroup_path = self.cgroups.get(&cgroup_id);
        let cgroup_name = cgroup_path.and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        let path = cgroup_path.map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let container_id = container::container_id(&path);
        let pod_uid = container::pod_uid(&path);
        let pod = container_id
            .as_deref()
            .and_then(|c| self.pods.by_container_id(c))
            .or_else(|| pod_uid.as_deref().and_then(|u| self.pods.by_pod_uid(u)));
        let missing_pod = pod.is_none() && pod_uid.is_some();
        let own = own_resource_attributes(&env);
        let found = Found {
            env_service_name: service_name_from_environ(&env),
            pod: pod.as_deref(),
            container_id: container_id.as_deref(),
            cgroup_name: cgroup_name.as_deref(),
            exe: exe.as_deref(),
        };
        let service_name = found.service_name().unwrap_or_else(|| format!("pid-{pid}"));

        let mut attributes = Attributes::default();
        attributes.push("service.name", service_name.clone());
        let own_namespace = own.iter().find(|(k, _)| k == "service.namespace").map(|(_, v)| v.clone());
        if let Some(ns) = own_namespace.or_else(|| pod.as_ref().map(|p| p.namespace.clone())) {
            attributes.push("service.namespace", ns);
        }
        attributes.push("service.instance.id", format!("{}:{pid}", self.host_name));
        attributes.push("process.pid", i64::from(pid));
        if let Some(exe) = exe {
            attributes.push("process.executable.name", exe);
        }
        attributes.push("host.name", self.host_name.clone());
        if let Some(id) = &container_id {
            attributes.push("container.id", id.clone());
        }
        if let Some(pod) = &pod {
            push_pod_attributes(&mut attributes, pod, container_id.as_deref());
        }
        attributes.push("telemetry.sdk.name", "tapwire");
        attributes.push("telemetry.sdk.version", env!("CARGO_PKG_VERSION"));
        // The process's own declarations, then the agent's, for keys still free.
        for (k, v) in own.iter().chain(&self.extra) {
            if attributes.get(k).is_none() {
                attributes.push(k.clone(), v.clone());
            }
        }
        (Resource { service_name, attributes }, missing_pod)
    }
}

/// What naming looks at, in the order it looks.
struct Found<'a> {
    /// `OTEL_SERVICE_NAME`, else `service.name` of `OTEL_RESOURCE_ATTRIBUTES`, of the process.
    env_service_name: Option<String>,
    pod: Option<&'a PodMeta>,
    container_id: Option<&'a str>,
    cgroup_name: Option<&'a str>,
    exe: Option<&'a str>,
}

impl Found<'_> {
    fn service_name(&self) -> Option<String> {
        let nonempty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        if let Some(name) = &self.env_service_name {
            return Some(name.clone());
        }
        if let Some(pod) = self.pod {
            let from_pod = pod
                .annotations
                .get("resource.opentelemetry.io/service.name")
                .or_else(|| pod.labels.get("app.kubernetes.io/instance"))
                .or_else(|| pod.labels.get("app.kubernetes.io/name"))
                .and_then(|s| nonempty(s))
                .or_else(|| {
                    pod.owner
                        .as_ref()
                        .filter(|o| matches!(o.kind.as_str(), "Deployment" | "StatefulSet" | "DaemonSet" | "CronJob" | "Job"))
                        .and_then(|o| nonempty(&o.name))
                })
                .or_else(|| nonempty(&pod.name))
                .or_else(|| self.container_id.and_then(|id| pod.container(id)).and_then(|c| nonempty(&c.name)));
            if from_pod.is_some() {
                return from_pod;
            }
        }
        self.cgroup_name.and_then(nonempty).or_else(|| self.exe.and_then(nonempty))
    }
}

/// `k8s.*` attributes of a pod (and of the container, when known).
fn push_pod_attributes(a: &mut Attributes, pod: &PodMeta, container_id: Option<&str>) {
    a.push("k8s.namespace.name", pod.namespace.clone());
    a.push("k8s.pod.name", pod.name.clone());
    a.push("k8s.pod.uid", pod.uid.clone());
    if !pod.node_name.is_empty() {
        a.push("k8s.node.name", pod.node_name.clone());
    }
    if let Some(c) = container_id.and_then(|id| pod.container(id)) {
        a.push("k8s.container.name", c.name.clone());
    }
    if let Some(owner) = &pod.owner {
        let key = match owner.kind.as_str() {
            "Deployment" => Some("k8s.deployment.name"),
            "StatefulSet" => Some("k8s.statefulset.name"),
            "DaemonSet" => Some("k8s.daemonset.name"),
            "ReplicaSet" => Some("k8s.replicaset.name"),
            "Job" => Some("k8s.job.name"),
            "CronJob" => Some("k8s.cronjob.name"),
            _ => None,
        };
        if let Some(key) = key {
            a.push(key, owner.name.clone());
        }
    }
}

/// The process's own `OTEL_RESOURCE_ATTRIBUTES` (malformed entries skipped).
pub(crate) fn own_resource_attributes(environ: &[u8]) -> Vec<(String, String)> {
    environ
        .split(|b| *b == 0)
        .filter_map(|v| std::str::from_utf8(v).ok()?.strip_prefix("OTEL_RESOURCE_ATTRIBUTES="))
        .flat_map(|raw| raw.split(',').map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty() && !v.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

impl Default for ProcResources {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceLookup for ProcResources {
    fn resource_for(&mut self, pid: u32, cgroup_id: u64) -> Arc<Resource> {
        let stale = self.without_pod.get(&pid).is_some_and(|at| at.elapsed() >= RETRY_WITHOUT_POD);
        if let Some(r) = self.by_pid.get(&pid).filter(|_| !stale) {
            return r.clone();
        }
        let (resource, missing_pod) = self.build(pid, cgroup_id);
        if missing_pod {
            self.without_pod.insert(pid, Instant::now());
        } else {
            self.without_pod.remove(&pid);
        }
        let r = Arc::new(resource);
        self.by_pid.insert(pid, r.clone());
        r
    }
}

/// OTEL_SERVICE_NAME, else service.name inside OTEL_RESOURCE_ATTRIBUTES, from a NUL-separated
/// /proc/PID/environ.
pub fn service_name_from_environ(environ: &[u8]) -> Option<String> {
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    let get = |key: &str| {
        vars.iter().find_map(|v| {
            let v = std::str::from_utf8(v).ok()?;
            let (k, val) = v.split_once('=')?;
            (k == key).then(|| val.to_owned())
        })
    };
    if let Some(name) = get("OTEL_SERVICE_NAME").filter(|s| !s.trim().is_empty()) {
        return Some(name.trim().to_owned());
    }
    get("OTEL_RESOURCE_ATTRIBUTES")?.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == "service.name" && !v.trim().is_empty()).then(|| v.trim().to_owned())
    })
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_precedence() {
        assert_eq!(service_name_from_environ(b"A=1\0OTEL_SERVICE_NAME=catalog\0OTEL_RESOURCE_ATTRIBUTES=service.name=other\0"), Some("catalog".into()));
        assert_eq!(service_name_from_environ(b"OTEL_RESOURCE_ATTRIBUTES=team=x,service.name=search\0"), Some("search".into()));
        assert_eq!(service_name_from_environ(b"OTEL_SERVICE_NAME=\0PATH=/bin\0"), None);
        assert_eq!(service_name_from_environ(b""), None);
    }

    use std::collections::BTreeMap;

    use crate::discover::k8s::{ContainerMeta, Owner};

    const CID: &str = "4f2a8b7c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809102";

    fn full_pod() -> PodMeta {
        PodMeta {
            namespace: "shop".into(),
            name: "web-7d9f-abcde".into(),
            uid: "0f3c2d1e-5b6a-4c7d-8e9f-0a1b2c3d4e5f".into(),
            labels: BTreeMap::from([
                ("app.kubernetes.io/instance".to_string(), "web-prod".to_string()),
                ("app.kubernetes.io/name".to_string(), "web".to_string()),
            ]),
            annotations: BTreeMap::from([("resource.opentelemetry.io/service.name".to_string(), "storefront".to_string())]),
            owner: Some(Owner { kind: "Deployment".into(), name: "web-deploy".into() }),
            node_name: "node-a".into(),
            containers: vec![ContainerMeta { id: CID.into(), name: "app".into() }],
        }
    }

    #[test]
    fn naming_precedence_first_found_wins() {
        // Remove one source at a time, from the top: each step names the next source.
        let mut pod = full_pod();
        let name = |env: Option<&str>, pod: Option<&PodMeta>, cgroup: Option<&str>| {
            Found { env_service_name: env.map(String::from), pod, container_id: Some(CID), cgroup_name: cgroup, exe: Some("python3.11") }
                .service_name()
        };
        let cg = Some("cri-containerd-4f2a.scope");
        assert_eq!(name(Some("checkout"), Some(&pod), cg).as_deref(), Some("checkout"));
        assert_eq!(name(None, Some(&pod), cg).as_deref(), Some("storefront"));
        pod.annotations.clear();
        assert_eq!(name(None, Some(&pod), cg).as_deref(), Some("web-prod"));
        pod.labels.remove("app.kubernetes.io/instance");
        assert_eq!(name(None, Some(&pod), cg).as_deref(), Some("web"));
        pod.labels.clear();
        assert_eq!(name(None, Some(&pod), cg).as_deref(), Some("web-deploy"));
        for kind in ["StatefulSet", "DaemonSet", "CronJob", "Job"] {
            pod.owner = Some(Owner { kind: kind.into(), name: format!("{kind}-x") });
            assert_eq!(name(None, Some(&pod), cg), Some(format!("{kind}-x")));
        }
        pod.owner = Some(Owner { kind: "ReplicaSet".into(), name: "web-7d9f".into() });
        assert_eq!(name(None, Some(&pod), cg).as_deref(), Some("web-7d9f-abcde"), "a bare ReplicaSet does not name the service");
        pod.name.clear();
        assert_eq!(name(None, Some(&pod), cg).as_deref(), Some("app"));
        assert_eq!(name(None, None, cg).as_deref(), Some("cri-containerd-4f2a.scope"));
        assert_eq!(name(None, None, None).as_deref(), Some("python3.11"));
        // OTEL_SERVICE_NAME before service.name in OTEL_RESOURCE_ATTRIBUTES (both the process's).
        assert_eq!(service_name_from_environ(b"OTEL_RESOURCE_ATTRIBUTES=service.name=b\0OTEL_SERVICE_NAME=a\0"), Some("a".into()));
    }

    struct OnePod(Arc<PodMeta>);
    impl PodLookup for OnePod {
        fn by_container_id(&self, id: &str) -> Option<Arc<PodMeta>> {
            self.0.container(id).map(|_| self.0.clone())
        }
        fn by_pod_uid(&self, uid: &str) -> Option<Arc<PodMeta>> {
            (self.0.uid == uid).then(|| self.0.clone())
        }
    }

    #[test]
    fn kubernetes_and_agent_attributes() {
        let pod = full_pod();
        let extra = vec![("deployment.environment.name".to_string(), "prod".to_string()), ("host.name".to_string(), "ignored".to_string())];
        let mut r = ProcResources::new().with_context(Arc::new(OnePod(Arc::new(pod))), extra);
        let path = format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f3c2d1e_5b6a_4c7d_8e9f_0a1b2c3d4e5f.slice/cri-containerd-{CID}.scope"
        );
        r.set_cgroups(HashMap::from([(7, PathBuf::from(path))]));
        let res = r.resource_for(std::process::id(), 7);
        let s = |k: &str| res.attributes.get(k).map(|v| v.to_string());
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            assert_eq!(res.service_name, "storefront");
        }
        assert_eq!(s("service.namespace").as_deref(), Some("shop"));
        assert_eq!(s("k8s.namespace.name").as_deref(), Some("shop"));
        assert_eq!(s("k8s.pod.name").as_deref(), Some("web-7d9f-abcde"));
        assert_eq!(s("k8s.pod.uid").as_deref(), Some("0f3c2d1e-5b6a-4c7d-8e9f-0a1b2c3d4e5f"));
        assert_eq!(s("k8s.deployment.name").as_deref(), Some("web-deploy"));
        assert_eq!(s("k8s.node.name").as_deref(), Some("node-a"));
        assert_eq!(s("k8s.container.name").as_deref(), Some("app"));
        assert_eq!(s("container.id").as_deref(), Some(CID));
        assert_eq!(s("deployment.environment.name").as_deref(), Some("prod"));
        assert_ne!(s("host.name").as_deref(), Some("ignored"), "the agent's attributes never replace discovered ones");
    }

    #[test]
    fn a_pod_not_known_yet_is_looked_up_again() {
        let mut r = ProcResources::new();
        r.set_cgroups(HashMap::from([(7, PathBuf::from("/sys/fs/cgroup/kubepods/burstable/pod0f3c2d1e-5b6a-4c7d-8e9f-0a1b2c3d4e5f"))]));
        let first = r.resource_for(std::process::id(), 7);
        assert!(r.without_pod.contains_key(&std::process::id()));
        assert!(Arc::ptr_eq(&first, &r.resource_for(std::process::id(), 7)), "cached until the retry delay");
        r.without_pod.insert(std::process::id(), Instant::now() - RETRY_WITHOUT_POD);
        assert!(!Arc::ptr_eq(&first, &r.resource_for(std::process::id(), 7)), "built again after it");
    }

    #[test]
    fn own_process_resource() {
        let mut r = ProcResources::new();
        let mut cg = HashMap::new();
        cg.insert(42, PathBuf::from("/sys/fs/cgroup/unified/my-svc"));
        r.set_cgroups(cg);
        let res = r.resource_for(std::process::id(), 42);
        // The test process has no OTEL_SERVICE_NAME unless the runner sets one.
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            assert_eq!(res.service_name, "my-svc");
        }
        assert_eq!(res.attributes.get("process.pid"), Some(&crate::model::Value::Int(i64::from(std::process::id()))));
        assert!(Arc::ptr_eq(&res, &r.resource_for(std::process::id(), 42)));
    }
}
