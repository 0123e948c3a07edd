//! Watches the pods of this node (field selector `spec.nodeName=NODE`) into the [`PodStore`].
//!
//! kube-runtime's watcher does the list-then-watch protocol: it lists, watches from the list's
//! resourceVersion with bookmarks, resumes from the last seen version when the connection drops,
//! and lists again when the API server answers 410 Gone (the version was compacted, e.g. after
//! an API server restart). This loop turns its events into store updates, resolves owners,
//! counts and logs failures, and sleeps with an exponential backoff after each one. It runs in
//! its own task: capture never waits for it.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::watcher::{self, Event},
};

use super::{
    backoff::{Backoff, BackoffConfig},
    convert::{direct_owner, pod_meta},
    owners::OwnerResolver,
    store::{PodStore, StoredPod},
};
use crate::{export::ratelimit::LogLimiter, telemetry::Counters};

/// Tunables of the watch loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchTuning {
    pub backoff: BackoffConfig,
    /// Timeout of one owner lookup (GET of a ReplicaSet or Job).
    pub request_timeout: Duration,
    /// How long a failed owner lookup is not retried; pods waiting for one are retried this
    /// often.
    pub owner_retry: Duration,
    /// Bound of the pod store.
    pub max_pods: usize,
}

impl Default for WatchTuning {
    fn default() -> Self {
        WatchTuning {
            backoff: BackoffConfig::default(),
            request_timeout: Duration::from_secs(10),
            owner_retry: Duration::from_secs(30),
            max_pods: 2000,
        }
    }
}

/// What to do after a watcher error.
#[derive(Debug, PartialEq, Eq)]
enum AfterError {
    /// The watcher recovers by itself (re-watch or re-list) after the backoff.
    Backoff,
    /// The resourceVersion expired: the watcher lists again, no need to wait.
    Relist,
    /// The watcher would retry a watch from a version the server refuses for good (410 on the
    /// watch request itself): start a new watcher, which lists again.
    Restart,
}

pub struct PodWatcher {
    client: Client,
    node_name: String,
    store: Arc<PodStore>,
    owners: OwnerResolver,
    counters: Arc<Counters>,
    tuning: WatchTuning,
    log: LogLimiter,
}

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 410)
}

impl PodWatcher {
    pub fn new(client: Client, node_name: String, store: Arc<PodStore>, counters: Arc<Counters>, tuning: WatchTuning) -> PodWatcher {
        let owners = OwnerResolver::new(client.clone(), tuning.request_timeout, tuning.owner_retry, counters.clone());
        PodWatcher {
            client,
            node_name,
            store,
            owners,
            counters,
            tuning,
            log: LogLimiter::new(Duration::from_secs(30)),
        }
    }

    /// Runs until the task is aborted.
    pub async fn run(mut self) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut config = watcher::Config::default()
            .fields(&format!("spec.nodeName={}", self.node_name))
            // resourceVersion=0: served from the API server's watch cache, cheap when every
            // node lists at once (as the kubelet and client-go informers do).
            .any_semantic();
        // One node's pods fit in one page; with a page limit the API server would bypass its
        // cache (and kube drops resourceVersion=0).
        config.page_size = None;
        let mut backoff = Backoff::new(self.tuning.backoff);
        let mut retry = tokio::time::interval(self.tuning.owner_retry);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut stream = std::pin::pin!(watcher::watcher(api.clone(), config.clone()));
            // Pods of a list in progress; the store keeps serving the previous state until the
            // list completes.
            let mut listing: Vec<StoredPod> = Vec::new();
            loop {
                tokio::select! {
                    item = stream.next() => match item {
                        Some(Ok(event)) => self.on_event(event, &mut listing).await,
                        Some(Err(e)) => match self.on_error(&e) {
                            AfterError::Relist => {}
                            AfterError::Backoff => tokio::time::sleep(backoff.next_delay()).await,
                            AfterError::Restart => break,
                        },
                        None => break,
                    },
                    _ = retry.tick() => self.retry_pending_owners().await,
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn stored(&mut self, pod: &Pod) -> Option<StoredPod> {
        let Some(mut meta) = pod_meta(pod) else {
            Counters::inc(&self.counters.k8s_pods_dropped);
            if let Some(held_back) = self.log.check("no uid") {
                tracing::warn!(name = ?pod.metadata.name, held_back, "ignoring a pod without uid");
            }
            return None;
        };
        let direct = direct_owner(&pod.metadata);
        let resolved = self.owners.resolve(&meta.namespace, direct.as_ref()).await;
        meta.owner = resolved.owner;
        Some(StoredPod { meta: Arc::new(meta), direct_owner: direct, owner_pending: resolved.pending })
    }

    async fn on_event(&mut self, event: Event<Pod>, listing: &mut Vec<StoredPod>) {
        match event {
            Event::Init => listing.clear(),
            Event::InitApply(pod) => {
                if let Some(p) = self.stored(&pod).await {
                    listing.push(p);
                }
            }
            Event::InitDone => {
                Counters::inc(&self.counters.k8s_relists);
                let dropped = self.store.replace_all(std::mem::take(listing));
                Counters::add(&self.counters.k8s_pods_dropped, dropped as u64);
                self.owners.retain(&self.store.direct_owner_uids());
                tracing::info!(node = %self.node_name, pods = self.store.len(), dropped, owners_cached = self.owners.cached(), "listed the pods of this node");
            }
            Event::Apply(pod) => {
                if let Some(p) = self.stored(&pod).await
                    && self.store.upsert(p).is_err()
                {
                    Counters::inc(&self.counters.k8s_pods_dropped);
                    if let Some(held_back) = self.log.check("full") {
                        tracing::warn!(max = self.tuning.max_pods, held_back, "pod store full: a pod is left without Kubernetes metadata");
                    }
                }
            }
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    self.store.remove(uid);
                    self.owners.retain(&self.store.direct_owner_uids());
                }
            }
        }
    }

    fn on_error(&mut self, e: &watcher::Error) -> AfterError {
        use watcher::Error as E;
        let (counter, after) = match e {
            E::WatchError(status) if status.code == 410 => (None, AfterError::Relist),
            E::WatchStartFailed(inner) if is_gone(inner) => (None, AfterError::Restart),
            E::InitialListFailed(_) | E::NoResourceVersion => (Some(&self.counters.k8s_list_failures), AfterError::Backoff),
            E::WatchStartFailed(_) | E::WatchError(_) | E::WatchFailed(_) => (Some(&self.counters.k8s_watch_failures), AfterError::Backoff),
        };
        match counter {
            Some(c) => {
                Counters::inc(c);
                if let Some(held_back) = self.log.check("api") {
                    tracing::warn!(error = %e, held_back, "Kubernetes API: pod metadata may be stale until the watch recovers");
                }
            }
            None => tracing::info!(error = %e, "pod watch expired: listing the pods again"),
        }
        after
    }

    async fn retry_pending_owners(&mut self) {
        for mut pod in self.store.pending_owners() {
            let resolved = self.owners.resolve(&pod.meta.namespace, pod.direct_owner.as_ref()).await;
            if resolved.pending {
                continue;
            }
            let mut meta = (*pod.meta).clone();
            meta.owner = resolved.owner;
            pod.meta = Arc::new(meta);
            pod.owner_pending = false;
            // Events and retries run in this one task: the pod is still stored as it was read.
            let _ = self.store.upsert(pod);
        }
    }
}
