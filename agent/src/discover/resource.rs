//! Service identity of a watched process, from its own environment and its cgroup.

use std::{
    collections::HashMap,
    fs,
    path::PathBuf,
    sync::Arc,
};

use super::ResourceLookup;
use crate::model::{Attributes, Resource};

/// Looks processes up in /proc and caches one resource per pid.
pub struct ProcResources {
    host_name: String,
    by_pid: HashMap<u32, Arc<Resource>>,
    /// Known cgroup ids and their paths (from the latest scan of the selection).
    cgroups: HashMap<u64, PathBuf>,
    proc_root: PathBuf,
}

impl ProcResources {
    pub fn new() -> Self {
        let host_name = nix::unistd::gethostname().map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned());
        ProcResources { host_name, by_pid: HashMap::new(), cgroups: HashMap::new(), proc_root: PathBuf::from("/proc") }
    }

    /// Updates the cgroup id -> path table (called after each scan of the selection).
    pub fn set_cgroups(&mut self, cgroups: HashMap<u64, PathBuf>) {
        self.cgroups = cgroups;
    }

    /// Forgets processes that have exited.
    pub fn prune(&mut self) {
        let root = self.proc_root.clone();
        self.by_pid.retain(|pid, _| root.join(pid.to_string()).exists());
    }

    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    fn build(&self, pid: u32, cgroup_id: u64) -> Resource {
        let proc_dir = self.proc_root.join(pid.to_string());
        let env = fs::read(proc_dir.join("environ")).unwrap_or_default();
        let exe = fs::read_link(proc_dir.join("exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .or_else(|| fs::read_to_string(proc_dir.join("comm")).ok().map(|s| s.trim().to_owned()));
        let cgroup_name = self.cgroups.get(&cgroup_id).and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        let service_name = service_name_from_environ(&env)
            .or(cgroup_name)
            .or_else(|| exe.clone())
            .unwrap_or_else(|| format!("pid-{pid}"));
        let mut attributes = Attributes::default();
        attributes.push("service.name", service_name.clone());
        attributes.push("service.instance.id", format!("{}:{pid}", self.host_name));
        attributes.push("process.pid", i64::from(pid));
        if let Some(exe) = exe {
            attributes.push("process.executable.name", exe);
        }
        attributes.push("host.name", self.host_name.clone());
        attributes.push("telemetry.sdk.name", "tapwire");
        attributes.push("telemetry.sdk.version", env!("CARGO_PKG_VERSION"));
        Resource { service_name, attributes }
    }
}

impl Default for ProcResources {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceLookup for ProcResources {
    fn resource_for(&mut self, pid: u32, cgroup_id: u64) -> Arc<Resource> {
        if let Some(r) = self.by_pid.get(&pid) {
            return r.clone();
        }
        let r = Arc::new(self.build(pid, cgroup_id));
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
