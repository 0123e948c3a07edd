//! The in-memory pod store behind [`PodLookup`]: the watcher writes, capture and naming read.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
};

use super::{
    convert::DirectOwner,
    meta::{PodLookup, PodMeta},
};

/// One pod as stored: its metadata and what the watcher needs to finish resolving its owner.
#[derive(Debug, Clone)]
pub struct StoredPod {
    pub meta: Arc<PodMeta>,
    /// The controller named in the pod's own ownerReferences.
    pub direct_owner: Option<DirectOwner>,
    /// True while `meta.owner` is only the direct owner because the lookup of the next owner up
    /// (a ReplicaSet's Deployment, a Job's CronJob) failed; the watcher retries these.
    pub owner_pending: bool,
}

#[derive(Debug, Default)]
struct Inner {
    pods: HashMap<String, StoredPod>,
    by_container: HashMap<String, Arc<PodMeta>>,
}

impl Inner {
    fn unindex(&mut self, uid: &str) -> Option<StoredPod> {
        let old = self.pods.remove(uid)?;
        for c in &old.meta.containers {
            // Only remove the entry if it still points at this pod (ids never move between
            // pods, but be exact).
            if self.by_container.get(&c.id).is_some_and(|p| p.uid == uid) {
                self.by_container.remove(&c.id);
            }
        }
        Some(old)
    }

    fn index(&mut self, pod: StoredPod) {
        for c in &pod.meta.containers {
            self.by_container.insert(c.id.clone(), pod.meta.clone());
        }
        self.pods.insert(pod.meta.uid.clone(), pod);
    }
}

/// Pods of this node by uid and by container id. Bounded: at most `max_pods` pods (a node runs
/// at most a few hundred; the bound guards against a misconfigured selector).
#[derive(Debug)]
pub struct PodStore {
    inner: RwLock<Inner>,
    max_pods: usize,
}

/// The store refused a pod because it holds `max_pods` already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreFull;

impl PodStore {
    pub fn new(max_pods: usize) -> PodStore {
        PodStore { inner: RwLock::new(Inner::default()), max_pods }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A poisoned lock only means a writer panicked mid-update; the maps are still usable.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or replaces a pod.
    pub fn upsert(&self, pod: StoredPod) -> Result<(), StoreFull> {
        let mut inner = self.write();
        let existed = inner.unindex(&pod.meta.uid).is_some();
        if !existed && inner.pods.len() >= self.max_pods {
            return Err(StoreFull);
        }
        inner.index(pod);
        Ok(())
    }

    /// Removes a pod; true if it was known.
    pub fn remove(&self, uid: &str) -> bool {
        self.write().unindex(uid).is_some()
    }

    /// Replaces the whole content with the result of a full list (pods deleted while the watch
    /// was down disappear). Returns how many pods did not fit.
    pub fn replace_all(&self, pods: impl IntoIterator<Item = StoredPod>) -> usize {
        let mut fresh = Inner::default();
        let mut dropped = 0;
        for pod in pods {
            if fresh.pods.len() >= self.max_pods && !fresh.pods.contains_key(&pod.meta.uid) {
                dropped += 1;
                continue;
            }
            fresh.unindex(&pod.meta.uid);
            fresh.index(pod);
        }
        *self.write() = fresh;
        dropped
    }

    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pods whose owner resolution is unfinished.
    pub fn pending_owners(&self) -> Vec<StoredPod> {
        self.read().pods.values().filter(|p| p.owner_pending).cloned().collect()
    }

    /// The uids of the direct owners of the stored pods (to prune the owner cache).
    pub fn direct_owner_uids(&self) -> HashSet<String> {
        self.read().pods.values().filter_map(|p| p.direct_owner.as_ref().map(|o| o.uid.clone())).collect()
    }

    /// Every stored pod, sorted by namespace and name (for tests and diagnostics).
    pub fn snapshot(&self) -> Vec<Arc<PodMeta>> {
        let mut all: Vec<_> = self.read().pods.values().map(|p| p.meta.clone()).collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }
}

impl PodLookup for PodStore {
    fn by_container_id(&self, id: &str) -> Option<Arc<PodMeta>> {
        self.read().by_container.get(id).cloned()
    }

    fn by_pod_uid(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.read().pods.get(uid).map(|p| p.meta.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::k8s::meta::ContainerMeta;

    fn pod(uid: &str, name: &str, ids: &[&str]) -> StoredPod {
        StoredPod {
            meta: Arc::new(PodMeta {
                namespace: "shop".into(),
                name: name.into(),
                uid: uid.into(),
                containers: ids.iter().map(|id| ContainerMeta { id: (*id).into(), name: "app".into() }).collect(),
                ..PodMeta::default()
            }),
            direct_owner: None,
            owner_pending: false,
        }
    }

    #[test]
    fn lookups_follow_updates_and_deletes() {
        let store = PodStore::new(10);
        store.upsert(pod("u1", "web-1", &[])).unwrap();
        assert_eq!(store.by_pod_uid("u1").map(|p| p.name.clone()).as_deref(), Some("web-1"));
        assert_eq!(store.by_container_id("aa"), None);
        // The container started: its id appears.
        store.upsert(pod("u1", "web-1", &["aa"])).unwrap();
        assert_eq!(store.by_container_id("aa").map(|p| p.uid.clone()).as_deref(), Some("u1"));
        // Restarted: the new id replaces the old one.
        store.upsert(pod("u1", "web-1", &["bb"])).unwrap();
        assert_eq!(store.by_container_id("aa"), None);
        assert_eq!(store.by_container_id("bb").map(|p| p.uid.clone()).as_deref(), Some("u1"));
        assert!(store.remove("u1"));
        assert!(!store.remove("u1"));
        assert_eq!(store.by_container_id("bb"), None);
        assert!(store.is_empty());
    }

    #[test]
    fn replace_all_forgets_pods_missing_from_the_list() {
        let store = PodStore::new(10);
        store.upsert(pod("u1", "a", &["aa"])).unwrap();
        store.upsert(pod("u2", "b", &["bb"])).unwrap();
        assert_eq!(store.replace_all([pod("u2", "b", &["bb"]), pod("u3", "c", &["cc"])]), 0);
        let names: Vec<_> = store.snapshot().iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(store.by_container_id("aa"), None);
        assert_eq!(store.by_container_id("cc").map(|p| p.uid.clone()).as_deref(), Some("u3"));
    }

    #[test]
    fn bounded() {
        let store = PodStore::new(2);
        store.upsert(pod("u1", "a", &[])).unwrap();
        store.upsert(pod("u2", "b", &[])).unwrap();
        assert_eq!(store.upsert(pod("u3", "c", &[])), Err(StoreFull));
        // Updating a known pod still works when full.
        store.upsert(pod("u2", "b2", &[])).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.replace_all([pod("u1", "a", &[]), pod("u2", "b", &[]), pod("u3", "c", &[])]), 1);
        assert_eq!(store.len(), 2);
    }
}
