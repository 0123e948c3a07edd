//! The top owner of a pod: a ReplicaSet's Deployment, a Job's CronJob, else the pod's own
//! controller.
//!
//! ReplicaSets and Jobs are fetched on demand (metadata only) and cached by uid, rather than
//! watched: a node's pods reference a handful of them, while a cluster-wide watch from every
//! node would stream every ReplicaSet of the cluster (ten old ones per Deployment by default) to
//! every agent. A controller reference does not change in practice, so an entry stays valid as
//! long as some pod of this node references it; entries nobody references are pruned.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::ReplicaSet, batch::v1::Job};
use kube::{Api, Client};

use super::{
    convert::{DirectOwner, direct_owner},
    meta::Owner,
};
use crate::{export::ratelimit::LogLimiter, telemetry::Counters};

/// Bound of the cache; past it, the cache starts over (entries are cheap to fetch again).
const MAX_CACHED: usize = 4096;

#[derive(Debug, Clone)]
enum Cached {
    /// The intermediate's own controller (None: it has none, or it no longer exists).
    Known(Option<Owner>),
    /// The lookup failed; not retried before `retry_at`.
    Failed { retry_at: Instant },
}

/// The result of a resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub owner: Option<Owner>,
    /// True when `owner` is only the direct owner because a lookup failed: retry later.
    pub pending: bool,
}

/// Which intermediate objects are followed one step up.
fn intermediate(owner: &DirectOwner) -> Option<Intermediate> {
    match (owner.group(), owner.kind.as_str()) {
        ("apps", "ReplicaSet") => Some(Intermediate::ReplicaSet),
        ("batch", "Job") => Some(Intermediate::Job),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
enum Intermediate {
    ReplicaSet,
    Job,
}

pub struct OwnerResolver {
    client: Client,
    cache: HashMap<String, Cached>,
    request_timeout: Duration,
    retry_after: Duration,
    counters: Arc<Counters>,
    log: LogLimiter,
}

impl OwnerResolver {
    pub fn new(client: Client, request_timeout: Duration, retry_after: Duration, counters: Arc<Counters>) -> OwnerResolver {
        OwnerResolver {
            client,
            cache: HashMap::new(),
            request_timeout,
            retry_after,
            counters,
            log: LogLimiter::new(Duration::from_secs(60)),
        }
    }

    /// The top owner of a pod in `namespace` whose controller is `direct`.
    pub async fn resolve(&mut self, namespace: &str, direct: Option<&DirectOwner>) -> Resolved {
        let Some(direct) = direct else {
            return Resolved { owner: None, pending: false };
        };
        let itself = Owner { kind: direct.kind.clone(), name: direct.name.clone() };
        let Some(kind) = intermediate(direct) else {
            return Resolved { owner: Some(itself), pending: false };
        };
        let now = Instant::now();
        match self.cache.get(&direct.uid) {
            Some(Cached::Known(up)) => {
                return Resolved { owner: Some(up.clone().unwrap_or(itself)), pending: false };
            }
            Some(Cached::Failed { retry_at }) if now < *retry_at => {
                return Resolved { owner: Some(itself), pending: true };
            }
            _ => {}
        }
        let fetched = self.fetch(kind, namespace, direct).await;
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        match fetched {
            Ok(up) => {
                self.cache.insert(direct.uid.clone(), Cached::Known(up.clone()));
                Resolved { owner: Some(up.unwrap_or(itself)), pending: false }
            }
            Err(reason) => {
                Counters::inc(&self.counters.k8s_owner_failures);
                if let Some(held_back) = self.log.check("owner") {
                    tracing::warn!(
                        kind = %direct.kind, namespace, name = %direct.name, %reason, held_back,
                        "cannot read the owner of a pod: naming it after the {} for now", direct.kind
                    );
                }
                self.cache.insert(direct.uid.clone(), Cached::Failed { retry_at: now + self.retry_after });
                Resolved { owner: Some(itself), pending: true }
            }
        }
    }

    /// The controller of the intermediate object. Ok(None) when it has none or no longer exists
    /// (404) or was replaced by another object of the same name (uid differs).
    async fn fetch(&self, kind: Intermediate, namespace: &str, direct: &DirectOwner) -> Result<Option<Owner>, String> {
        let request = async {
            match kind {
                Intermediate::ReplicaSet => Api::<ReplicaSet>::namespaced(self.client.clone(), namespace).get_metadata(&direct.name).await.map(|o| o.metadata),
                Intermediate::Job => Api::<Job>::namespaced(self.client.clone(), namespace).get_metadata(&direct.name).await.map(|o| o.metadata),
            }
        };
        match tokio::time::timeout(self.request_timeout, request).await {
            Err(_) => Err(format!("no answer within {:?}", self.request_timeout)),
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => Ok(None),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(meta)) if meta.uid.as_deref() != Some(direct.uid.as_str()) => Ok(None),
            Ok(Ok(meta)) => Ok(direct_owner(&meta).map(|o| Owner { kind: o.kind, name: o.name })),
        }
    }

    /// Forgets the entries no stored pod references.
    pub fn retain(&mut self, referenced: &HashSet<String>) {
        self.cache.retain(|uid, _| referenced.contains(uid));
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}
