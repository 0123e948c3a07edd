//! Kubernetes metadata: the pods of this node and their owners, from the API server.
//!
//! [`start`] decides whether to watch (in a cluster, or when an API server is configured),
//! spawns the watcher and returns the [`PodLookup`] the rest of the agent reads. It never waits
//! for the API server: an unreachable one only means lookups find nothing until it answers.

mod backoff;
mod convert;
pub mod meta;
mod owners;
mod store;
mod watch;

#[cfg(test)]
mod tests;

use std::{path::PathBuf, sync::Arc};

pub use backoff::BackoffConfig;
pub use convert::strip_container_id;
pub use meta::{ContainerMeta, NoPods, Owner, PodLookup, PodMeta};
pub use store::PodStore;
pub use watch::WatchTuning;

use crate::telemetry::Counters;

/// Whether to watch the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum K8sMode {
    /// When running in a pod (`KUBERNETES_SERVICE_HOST` set) or when a kubeconfig or API URL
    /// is configured.
    #[default]
    Auto,
    /// Always; a missing node name or API configuration is an error.
    On,
    /// Never.
    Off,
}

/// How to reach the API server and which node this is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sOptions {
    pub mode: K8sMode,
    /// Node whose pods are watched (the DaemonSet sets `NODE_NAME` from `spec.nodeName`).
    pub node_name: Option<String>,
    /// A kubeconfig file to use instead of the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// An API server URL to use as-is, without credentials (tests, `kubectl proxy`).
    pub api_url: Option<String>,
    /// Backoff and bounds of the watcher.
    pub tuning: WatchTuning,
}

impl K8sOptions {
    /// From the environment: `TAPWIRE_K8S` (`auto`, `on`, `off`), `NODE_NAME`,
    /// `TAPWIRE_K8S_KUBECONFIG`, `TAPWIRE_K8S_API_URL`.
    pub fn from_env() -> Result<K8sOptions, K8sError> {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<K8sOptions, K8sError> {
        let mode = match var("TAPWIRE_K8S").as_deref().map(str::trim) {
            None | Some("auto") => K8sMode::Auto,
            Some("on") => K8sMode::On,
            Some("off") => K8sMode::Off,
            Some(other) => {
                return Err(K8sError::BadValue {
                    key: "TAPWIRE_K8S",
                    value: other.to_owned(),
                    expected: "auto, on or off",
                });
            }
        };
        Ok(K8sOptions {
            mode,
            node_name: var("NODE_NAME"),
            kubeconfig: var("TAPWIRE_K8S_KUBECONFIG").map(PathBuf::from),
            api_url: var("TAPWIRE_K8S_API_URL"),
            tuning: WatchTuning::default(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("{key}={value:?} is not valid: expected {expected}")]
    BadValue { key: &'static str, value: String, expected: &'static str },
    #[error("Kubernetes metadata needs the node name: set NODE_NAME (from the downward API, spec.nodeName)")]
    NoNodeName,
    #[error("Kubernetes metadata is on but no API server is configured: not in a pod and no kubeconfig or API URL given")]
    NoApi,
    #[error("cannot read the kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("invalid API server URL {url:?}")]
    ApiUrl {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("cannot use the in-cluster service account")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot create the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// Where the API configuration comes from, once decided.
enum Source {
    Url(String),
    Kubeconfig(PathBuf),
    InCluster,
}

fn in_a_pod() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty())
}

/// Starts watching the pods of this node when in a cluster (or configured to), and returns the
/// lookup over them; [`NoPods`] when not watching. Must be called inside a tokio runtime. Errors
/// are configuration errors only (an explicit option that cannot work); in `Auto` mode, being in
/// a pod without a usable service account or node name is logged and gives [`NoPods`]. An API
/// server that does not answer is not an error: the watcher retries in the background.
pub async fn start(options: &K8sOptions, counters: Arc<Counters>) -> Result<Arc<dyn PodLookup>, K8sError> {
    Ok(match start_store(options, counters).await? {
        Some(store) => store,
        None => Arc::new(NoPods),
    })
}

/// [`start`], returning the store itself (None when not watching).
pub async fn start_store(options: &K8sOptions, counters: Arc<Counters>) -> Result<Option<Arc<PodStore>>, K8sError> {
    let explicit = options.api_url.is_some() || options.kubeconfig.is_some();
    let source = match (&options.api_url, &options.kubeconfig) {
        (Some(url), _) => Source::Url(url.clone()),
        (None, Some(path)) => Source::Kubeconfig(path.clone()),
        (None, None) => Source::InCluster,
    };
    let auto = match options.mode {
        K8sMode::Off => return Ok(None),
        K8sMode::Auto if !explicit && !in_a_pod() => {
            tracing::debug!("not in a Kubernetes pod: no Kubernetes metadata");
            return Ok(None);
        }
        K8sMode::On if !explicit && !in_a_pod() => return Err(K8sError::NoApi),
        K8sMode::Auto => true,
        K8sMode::On => false,
    };
    match connect(options, source).await {
        Ok((client, node_name)) => {
            let store = Arc::new(PodStore::new(options.tuning.max_pods));
            tracing::info!(node = %node_name, "watching the pods of this node for Kubernetes metadata");
            let watcher = watch::PodWatcher::new(client, node_name, store.clone(), counters, options.tuning);
            tokio::spawn(watcher.run());
            Ok(Some(store))
        }
        // In a pod without what the watcher needs: capture still runs, unnamed by Kubernetes.
        Err(e) if auto && !explicit => {
            tracing::warn!(error = %crate::capture::check::error_chain(&e), "no Kubernetes metadata");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn connect(options: &K8sOptions, source: Source) -> Result<(kube::Client, String), K8sError> {
    let node_name = options.node_name.clone().ok_or(K8sError::NoNodeName)?;
    let config = match source {
        Source::Url(url) => {
            let uri = url.parse::<http::Uri>().map_err(|source| K8sError::ApiUrl { url, source })?;
            kube::Config::new(uri)
        }
        Source::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(&path).map_err(|source| K8sError::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| K8sError::Kubeconfig { path, source })?
        }
        Source::InCluster => kube::Config::incluster().map_err(K8sError::InCluster)?,
    };
    // No hidden retries inside the client: the watcher retries with its own backoff and counts
    // every failure.
    let mut config = config;
    config.default_retry = false;
    let client = kube::Client::try_from(config).map_err(K8sError::Client)?;
    Ok((client, node_name))
}
