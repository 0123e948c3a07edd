//! From API objects (k8s-openapi types) to [`PodMeta`]: container ids, labels, the direct
//! controller. Pure functions; owner resolution through the API is in `owners`.

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};

use super::meta::{ContainerMeta, PodMeta};

/// Annotations not kept in memory: large and of no use for naming (kubectl's copy of the whole
/// applied manifest can be hundreds of kilobytes).
const DROPPED_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

/// The controller named in an object's ownerReferences, as far as the object itself tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectOwner {
    /// `apps/v1`, `batch/v1`, ...
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
}

impl DirectOwner {
    /// The API group of `api_version` (`""` for the core group).
    pub fn group(&self) -> &str {
        self.api_version.rsplit_once('/').map_or("", |(group, _)| group)
    }
}

/// The ownerReference marked `controller: true`; failing that, the only ownerReference when
/// there is exactly one (objects written by hand sometimes omit the flag).
pub fn direct_owner(meta: &ObjectMeta) -> Option<DirectOwner> {
    let refs = meta.owner_references.as_deref().unwrap_or_default();
    let chosen = refs
        .iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| if refs.len() == 1 { refs.first() } else { None })?;
    Some(DirectOwner {
        api_version: chosen.api_version.clone(),
        kind: chosen.kind.clone(),
        name: chosen.name.clone(),
        uid: chosen.uid.clone(),
    })
}

/// A container id as the kubelet reports it (`containerd://<hex>`, `cri-o://<hex>`,
/// `docker://<hex>`) reduced to the lower-case hex id that appears in cgroup paths. None for an
/// empty id or one with no hex digits (a container that has not started).
pub fn strip_container_id(raw: &str) -> Option<String> {
    let id = raw.rsplit_once("://").map_or(raw, |(_, id)| id).trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(id.to_ascii_lowercase())
}

/// The metadata of a pod, owner left empty (resolved separately). None when the object has no
/// uid (the API server always sets one; a pod without it cannot be tracked).
pub fn pod_meta(pod: &Pod) -> Option<PodMeta> {
    let m = &pod.metadata;
    let uid = m.uid.clone().filter(|u| !u.is_empty())?;
    let mut annotations = m.annotations.clone().unwrap_or_default();
    for key in DROPPED_ANNOTATIONS {
        annotations.remove(*key);
    }
    let mut containers = Vec::new();
    if let Some(status) = &pod.status {
        let lists = [
            status.init_container_statuses.as_deref(),
            status.container_statuses.as_deref(),
            status.ephemeral_container_statuses.as_deref(),
        ];
        for s in lists.into_iter().flatten().flatten() {
            if let Some(id) = s.container_id.as_deref().and_then(strip_container_id) {
                containers.push(ContainerMeta { id, name: s.name.clone() });
            }
        }
    }
    Some(PodMeta {
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        uid,
        labels: m.labels.clone().unwrap_or_default(),
        annotations,
        owner: None,
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        containers,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    #[test]
    fn container_ids_lose_their_runtime_prefix() {
        let hex = "3f1a5b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a";
        assert_eq!(strip_container_id(&format!("containerd://{hex}")).as_deref(), Some(hex));
        assert_eq!(strip_container_id(&format!("cri-o://{hex}")).as_deref(), Some(hex));
        assert_eq!(strip_container_id(&format!("docker://{hex}")).as_deref(), Some(hex));
        assert_eq!(strip_container_id(hex).as_deref(), Some(hex));
        assert_eq!(strip_container_id("containerd://ABCDEF").as_deref(), Some("abcdef"));
        assert_eq!(strip_container_id(""), None);
        assert_eq!(strip_container_id("containerd://"), None);
        assert_eq!(strip_container_id("containerd://not-hex"), None);
    }

    fn owner_ref(kind: &str, name: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            controller,
            block_owner_deletion: None,
        }
    }

    #[test]
    fn the_controller_reference_wins() {
        let meta = ObjectMeta {
            owner_references: Some(vec![
                owner_ref("ConfigMap", "other", None),
                owner_ref("ReplicaSet", "web-7d4b9c8f6d", Some(true)),
            ]),
            ..ObjectMeta::default()
        };
        let owner = direct_owner(&meta).unwrap();
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()), ("ReplicaSet", "web-7d4b9c8f6d", "uid-web-7d4b9c8f6d"));
        assert_eq!(owner.group(), "apps");

        let single = ObjectMeta { owner_references: Some(vec![owner_ref("StatefulSet", "db", None)]), ..ObjectMeta::default() };
        assert_eq!(direct_owner(&single).map(|o| o.name), Some("db".to_owned()));

        let ambiguous = ObjectMeta {
            owner_references: Some(vec![owner_ref("A", "a", None), owner_ref("B", "b", Some(false))]),
            ..ObjectMeta::default()
        };
        assert_eq!(direct_owner(&ambiguous), None);
        assert_eq!(direct_owner(&ObjectMeta::default()), None);
        let core = DirectOwner { api_version: "v1".into(), kind: "Node".into(), name: "n".into(), uid: "u".into() };
        assert_eq!(core.group(), "");
    }
}
