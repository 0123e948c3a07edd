//! Kubernetes metadata of the pods on this node, as the rest of the agent sees it: plain data
//! types and a lookup trait, independent of how the metadata is obtained (the API watcher) or
//! whether there is a cluster at all.

use std::collections::BTreeMap;
use std::sync::Arc;

/// The controller at the top of a pod's ownership chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, `ReplicaSet` (a bare one,
    /// or one whose Deployment is not known), or any other kind named in ownerReferences.
    pub kind: String,
    pub name: String,
}

/// One container of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerMeta {
    /// Container id without its runtime prefix (`containerd://`, `cri-o://`, `docker://`):
    /// the 64 hex digits that appear in the container's cgroup path.
    pub id: String,
    /// Container name from the pod spec.
    pub name: String,
}

/// What the agent knows about one pod of this node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The top owner: a Deployment resolved through its ReplicaSet, a CronJob through its Job,
    /// else the direct controller (StatefulSet, DaemonSet, Job, ...). None for a bare pod.
    pub owner: Option<Owner>,
    pub node_name: String,
    /// Containers with a known id (init and ephemeral containers included); a container that
    /// has not started yet has no id and is not listed.
    pub containers: Vec<ContainerMeta>,
}

impl PodMeta {
    /// The container with this (runtime-stripped) id.
    pub fn container(&self, id: &str) -> Option<&ContainerMeta> {
        self.containers.iter().find(|c| c.id == id)
    }
}

/// Finds pod metadata by the identifiers visible from the node: the container id and the pod
/// uid, both present in cgroup paths. Lookups are cheap (in-memory) and never block on the API.
pub trait PodLookup: Send + Sync {
    /// The pod owning the container with this id (runtime prefix stripped, lower-case hex).
    fn by_container_id(&self, id: &str) -> Option<Arc<PodMeta>>;
    /// The pod with this uid (dashed form, `0f3c...-...`; cgroup paths of the systemd driver use
    /// underscores instead of dashes: convert before calling).
    fn by_pod_uid(&self, uid: &str) -> Option<Arc<PodMeta>>;
}

/// The lookup used outside a cluster: knows no pod.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPods;

impl PodLookup for NoPods {
    fn by_container_id(&self, _id: &str) -> Option<Arc<PodMeta>> {
        None
    }
    fn by_pod_uid(&self, _uid: &str) -> Option<Arc<PodMeta>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_pods_knows_nothing() {
        let lookup: Arc<dyn PodLookup> = Arc::new(NoPods);
        assert_eq!(lookup.by_container_id("abc"), None);
        assert_eq!(lookup.by_pod_uid("0f3c"), None);
    }

    #[test]
    fn container_by_id() {
        let pod = PodMeta {
            containers: vec![
                ContainerMeta {
                    id: "aa".into(),
                    name: "app".into(),
                },
                ContainerMeta {
                    id: "bb".into(),
                    name: "sidecar".into(),
                },
            ],
            ..PodMeta::default()
        };
        assert_eq!(
            pod.container("bb").map(|c| c.name.as_str()),
            Some("sidecar")
        );
        assert_eq!(pod.container("cc"), None);
    }
}
