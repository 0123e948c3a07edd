//! The watcher against a scripted API server on 127.0.0.1 serving the responses under
//! `agent/testdata/k8s/` (lists, watch streams with BOOKMARK/ADDED/MODIFIED/DELETED events, a
//! 410 Expired, ReplicaSets and Jobs), with the requests it received recorded.

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

use super::*;

const NODE: &str = "worker-1";

fn testdata(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/k8s").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// How a scripted watch response ends.
#[derive(Clone)]
enum End {
    /// Stay open (until the test ends).
    Hang,
    /// Close the connection without ending the chunked body, as a restarting API server does,
    /// once the test notifies.
    DropOn(Arc<Notify>),
}

#[derive(Clone)]
enum Reply {
    /// Status code and JSON body.
    Json(u16, String),
    /// A watch stream: 200, one JSON event per line.
    Watch(String, End),
}

fn status(code: u16, reason: &str, message: &str) -> Reply {
    Reply::Json(
        code,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason, "code": code})
        .to_string(),
    )
}

/// One request the server received.
#[derive(Debug, Clone)]
struct Request {
    at: Instant,
    path: String,
    query: BTreeMap<String, String>,
}

impl Request {
    fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
    fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Script {
    lists: VecDeque<Reply>,
    watches: VecDeque<Reply>,
    /// Owner GETs answered 503 before the recorded object is served.
    failing_owner_gets: usize,
    log: Vec<Request>,
}

struct FakeApi {
    url: String,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    async fn start(script: Script) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(script));
        let shared = script.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((conn, _)) = listener.accept().await else { return };
                connections.spawn(serve(conn, shared.clone()));
            }
        });
        FakeApi { url, script, task }
    }

    fn log(&self) -> Vec<Request> {
        self.script.lock().unwrap().log.clone()
    }

    fn pod_requests(&self) -> Vec<Request> {
        self.log().into_iter().filter(|r| r.path == "/api/v1/pods").collect()
    }

    fn owner_paths(&self) -> Vec<String> {
        let mut paths: Vec<_> = self.log().into_iter().filter(|r| r.path != "/api/v1/pods").map(|r| r.path).collect();
        paths.sort();
        paths
    }
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// The recorded object for an owner GET, reduced to what the API server returns for
/// `Accept: application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1`.
fn owner_object(path: &str, partial: bool) -> Option<String> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let file = match parts.as_slice() {
        ["apis", "apps", "v1", "namespaces", _, "replicasets", name] => format!("replicaset-{name}.json"),
        ["apis", "batch", "v1", "namespaces", _, "jobs", name] => format!("job-{name}.json"),
        _ => return None,
    };
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/k8s").join(&file);
    let text = std::fs::read_to_string(full).ok()?;
    if !partial {
        return Some(text);
    }
    let object: serde_json::Value = serde_json::from_str(&text).unwrap();
    Some(serde_json::json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]}).to_string())
}

async fn serve(mut conn: TcpStream, script: Arc<Mutex<Script>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let partial = head.lines().any(|l| l.to_ascii_lowercase().starts_with("accept:") && l.contains("as=PartialObjectMetadata"));
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query: BTreeMap<String, String> = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect();
    let request = Request { at: Instant::now(), path: path.to_owned(), query };
    let reply = {
        let mut s = script.lock().unwrap();
        s.log.push(request.clone());
        if request.path == "/api/v1/pods" {
            if request.q("fieldSelector") != Some(&format!("spec.nodeName={NODE}")) {
                status(400, "BadRequest", "the test API serves only this node's pods")
            } else if request.is_watch() {
                s.watches.pop_front().unwrap_or(Reply::Watch(String::new(), End::Hang))
            } else {
                s.lists.pop_front().unwrap_or_else(|| status(503, "ServiceUnavailable", "no list scripted"))
            }
        } else if s.failing_owner_gets > 0 {
            s.failing_owner_gets -= 1;
            status(503, "ServiceUnavailable", "etcdserver: request timed out")
        } else {
            match owner_object(&request.path, partial) {
                Some(body) => Reply::Json(200, body),
                None => status(404, "NotFound", "not found"),
            }
        }
    };
    match reply {
        Reply::Json(code, body) => {
            let head = format!(
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
        Reply::Watch(lines, end) => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if conn.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for line in lines.lines() {
                let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
                if conn.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = conn.flush().await;
            match end {
                End::Hang => std::future::pending::<()>().await,
                End::DropOn(signal) => {
                    signal.notified().await;
                    // Dropping the socket mid-body: the client sees the stream break off.
                    drop(conn);
                }
            }
        }
    }
}

fn tuning() -> WatchTuning {
    WatchTuning {
        backoff: BackoffConfig {
            initial: Duration::from_millis(40),
            max: Duration::from_millis(100),
            reset_after: Duration::from_secs(60),
        },
        request_timeout: Duration::from_secs(5),
        owner_retry: Duration::from_millis(150),
        max_pods: 100,
    }
}

fn options(url: &str) -> K8sOptions {
    K8sOptions {
        mode: K8sMode::Auto,
        node_name: Some(NODE.to_owned()),
        kubeconfig: None,
        api_url: Some(url.to_owned()),
        tuning: tuning(),
    }
}

/// Polls `cond` every 10 ms for at most 10 s.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ids() -> serde_json::Value {
    serde_json::json!({
        "web": format!("{}0f3c9d21", "a".repeat(56)), "web_init": "9e".repeat(32), "db": "7c".repeat(32),
        "db2": "6b".repeat(32), "report": "d4".repeat(32), "exporter": "1f".repeat(32),
        "checkout": "3a".repeat(32), "api": "5e".repeat(32), "cache": "8d".repeat(32),
    })
}

fn id(name: &str) -> String {
    ids()[name].as_str().unwrap().to_owned()
}

fn owner(kind: &str, name: &str) -> Option<Owner> {
    Some(Owner { kind: kind.into(), name: name.into() })
}

fn names(lookup: &PodStore) -> Vec<String> {
    lookup.snapshot().iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect()
}

/// Pod name and owner per pod, sorted by namespace/name.
fn owners_of(lookup: &PodStore) -> Vec<(String, Option<Owner>)> {
    lookup.snapshot().iter().map(|p| (p.name.clone(), p.owner.clone())).collect()
}

fn web_pod() -> PodMeta {
    PodMeta {
        namespace: "shop".into(),
        name: "web-7d4b9c8f6d-x2x9k".into(),
        uid: "0b6f3f0e-6d7a-4c1e-9a57-2f5d1c9e8a41".into(),
        labels: [
            ("app.kubernetes.io/instance", "web-prod"),
            ("app.kubernetes.io/name", "web"),
            ("pod-template-hash", "7d4b9c8f6d"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        annotations: [
            ("kubectl.kubernetes.io/restartedAt", "2026-11-20T08:13:58Z"),
            ("resource.opentelemetry.io/service.name", "storefront"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        owner: owner("Deployment", "web"),
        node_name: NODE.into(),
        containers: vec![
            ContainerMeta { id: id("web_init"), name: "migrate".into() },
            ContainerMeta { id: id("web"), name: "web".into() },
        ],
    }
}

#[test]
fn recorded_objects_are_consistent() {
    // The ReplicaSet's owner is the recorded Deployment, and the web pod's owner that
    // ReplicaSet: the chain the watcher follows.
    let deployment: serde_json::Value = serde_json::from_str(&testdata("deployment-web.json")).unwrap();
    let rs: serde_json::Value = serde_json::from_str(&testdata("replicaset-web-7d4b9c8f6d.json")).unwrap();
    let list: serde_json::Value = serde_json::from_str(&testdata("pods-list-1.json")).unwrap();
    let rs_owner = &rs["metadata"]["ownerReferences"][0];
    assert_eq!(rs_owner["uid"], deployment["metadata"]["uid"]);
    assert_eq!(rs_owner["name"], deployment["metadata"]["name"]);
    let web = &list["items"][0];
    assert_eq!(web["metadata"]["ownerReferences"][0]["uid"], rs["metadata"]["uid"]);
    // Every watch line is one event of a known type.
    for line in testdata("pods-watch-1.jsonl").lines().chain(testdata("pods-watch-expired.jsonl").lines()) {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"].contains(&event["type"].as_str().unwrap()), "{line}");
    }
}

/// The whole life of a watch: list, watch events, the server drops the watch, the resumed
/// watch gets 410 Expired, list again.
#[tokio::test]
async fn list_watch_drop_expire_relist() {
    let drop_watch = Arc::new(Notify::new());
    let api = FakeApi::start(Script {
        lists: [Reply::Json(200, testdata("pods-list-1.json")), Reply::Json(200, testdata("pods-list-2.json"))].into(),
        watches: [
            Reply::Watch(testdata("pods-watch-1.jsonl"), End::DropOn(drop_watch.clone())),
            Reply::Watch(testdata("pods-watch-expired.jsonl"), End::Hang),
        ]
        .into(),
        ..Script::default()
    })
    .await;
    let counters = Arc::new(Counters::default());
    let store = start_store(&options(&api.url), counters.clone()).await.unwrap().expect("watching");

    // The list and every event of the first watch applied: db-0 deleted, api added then
    // running, checkout now running.
    wait_for("the first watch's events", || store.by_container_id(&id("api")).is_some() && store.by_pod_uid("f3a1c2d4-5b6e-4f70-8a91-b2c3d4e5f607").is_none()).await;
    assert_eq!(store.by_container_id(&id("web")).as_deref(), Some(&web_pod()));
    assert_eq!(store.by_container_id(&id("web_init")).as_deref(), Some(&web_pod()), "init containers too");
    assert_eq!(store.by_pod_uid(&web_pod().uid).as_deref(), Some(&web_pod()));
    assert_eq!(store.by_container_id(&id("db")), None, "deleted pod's container");
    assert_eq!(
        owners_of(&store),
        vec![
            ("report-29012345-7xk2p".to_owned(), owner("CronJob", "report")),
            ("node-exporter-4qj7n".to_owned(), owner("DaemonSet", "node-exporter")),
            ("api-5f6d8c7b9-lm4tz".to_owned(), owner("Deployment", "api")),
            ("checkout-6c9f7b5d48-q8v2n".to_owned(), owner("Deployment", "checkout")),
            ("web-7d4b9c8f6d-x2x9k".to_owned(), owner("Deployment", "web")),
        ]
    );
    let checkout = store.by_container_id(&id("checkout")).expect("checkout's container id from MODIFIED");
    assert_eq!(checkout.containers, vec![ContainerMeta { id: id("checkout"), name: "checkout".into() }]);
    assert_eq!(Counters::get(&counters.k8s_relists), 1);

    // The API server goes away mid-watch; the resumed watch is told its version expired.
    drop_watch.notify_one();
    wait_for("the second list", || Counters::get(&counters.k8s_relists) == 2).await;
    assert_eq!(
        names(&store),
        [
            "monitoring/node-exporter-4qj7n",
            "shop/api-5f6d8c7b9-lm4tz",
            "shop/cache-0",
            "shop/checkout-6c9f7b5d48-q8v2n",
            "shop/db-0",
            "shop/web-7d4b9c8f6d-x2x9k",
        ]
    );
    assert_eq!(store.by_container_id(&id("report")), None, "pod gone while the watch was down");
    let db = store.by_container_id(&id("db2")).expect("db-0 recreated");
    assert_eq!((db.uid.as_str(), db.owner.clone()), ("2c8e4a6b-1d3f-4a5c-9e7b-0f1a2b3c4d5e", owner("StatefulSet", "db")));
    assert_eq!(store.by_container_id(&id("cache")).map(|p| p.owner.clone()), Some(None), "a bare pod has no owner");
    assert_eq!(store.by_container_id(&id("web")).as_deref(), Some(&web_pod()));

    // Requests: list, watch from the list's version, watch resumed from the last bookmark,
    // list, watch from the new list's version; all with this node's field selector.
    wait_for("the third watch", || api.pod_requests().len() == 5).await;
    let pods = api.pod_requests();
    let shape: Vec<(bool, Option<&str>)> = pods.iter().map(|r| (r.is_watch(), r.q("resourceVersion"))).collect();
    assert_eq!(shape, [(false, Some("0")), (true, Some("48211")), (true, Some("48260")), (false, Some("0")), (true, Some("51900"))]);
    for r in &pods {
        assert_eq!(r.q("fieldSelector"), Some("spec.nodeName=worker-1"));
        assert_eq!(r.q("limit"), None, "one page, from the watch cache");
        if !r.is_watch() {
            assert_eq!(r.q("resourceVersionMatch"), Some("NotOlderThan"));
        }
        if r.is_watch() {
            assert_eq!(r.q("allowWatchBookmarks"), Some("true"));
        }
    }
    // Each owner fetched once (cached across the re-list), metadata only.
    assert_eq!(
        api.owner_paths(),
        [
            "/apis/apps/v1/namespaces/shop/replicasets/api-5f6d8c7b9",
            "/apis/apps/v1/namespaces/shop/replicasets/checkout-6c9f7b5d48",
            "/apis/apps/v1/namespaces/shop/replicasets/web-7d4b9c8f6d",
            "/apis/batch/v1/namespaces/batch/jobs/report-29012345",
        ]
    );
    // A watch that breaks off is resumed from its last version, like one that reaches its
    // timeout: not a failure.
    assert_eq!(Counters::get(&counters.k8s_watch_failures), 0);
    assert_eq!(Counters::get(&counters.k8s_list_failures), 0);
    assert_eq!(Counters::get(&counters.k8s_owner_failures), 0);
    assert_eq!(Counters::get(&counters.k8s_pods_dropped), 0);
}

/// A 410 on the watch request itself (not as a watch event) also leads to a new list.
#[tokio::test]
async fn gone_on_watch_start_lists_again() {
    let api = FakeApi::start(Script {
        lists: [Reply::Json(200, testdata("pods-list-1.json")), Reply::Json(200, testdata("pods-list-2.json"))].into(),
        watches: [status(410, "Expired", "too old resource version: 48211 (51877)")].into(),
        ..Script::default()
    })
    .await;
    let counters = Arc::new(Counters::default());
    let store = start_store(&options(&api.url), counters.clone()).await.unwrap().expect("watching");
    wait_for("the second list", || Counters::get(&counters.k8s_relists) == 2).await;
    assert_eq!(store.len(), 6);
    assert_eq!(store.by_container_id(&id("report")), None);
    wait_for("the watch after the second list", || api.pod_requests().len() == 4).await;
    let requests = api.pod_requests();
    let shape: Vec<(bool, Option<&str>)> = requests.iter().map(|r| (r.is_watch(), r.q("resourceVersion"))).collect();
    assert_eq!(shape, [(false, Some("0")), (true, Some("48211")), (false, Some("0")), (true, Some("51900"))]);
    assert_eq!(Counters::get(&counters.k8s_watch_failures), 0);
}

/// The API server refuses the first lists: start() does not wait, the failures are counted,
/// the retries back off (growing gaps, capped), and the pods appear once it answers.
#[tokio::test]
async fn unavailable_api_backs_off_without_blocking() {
    let failing = 4;
    let mut lists: VecDeque<Reply> = (0..failing).map(|_| status(503, "ServiceUnavailable", "apiserver is shutting down")).collect();
    lists.push_back(Reply::Json(200, testdata("pods-list-1.json")));
    let api = FakeApi::start(Script { lists, ..Script::default() }).await;
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let lookup = start(&options(&api.url), counters.clone()).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500), "start waited {:?}", started.elapsed());
    assert_eq!(lookup.by_container_id(&id("web")), None, "nothing known yet");

    wait_for("the pods after the API recovered", || lookup.by_container_id(&id("web")).is_some()).await;
    assert_eq!(lookup.by_container_id(&id("web")).as_deref(), Some(&web_pod()));
    assert_eq!(Counters::get(&counters.k8s_list_failures), failing as u64);
    assert_eq!(Counters::get(&counters.k8s_relists), 1);

    let lists: Vec<Instant> = api.pod_requests().iter().filter(|r| !r.is_watch()).map(|r| r.at).collect();
    assert_eq!(lists.len(), failing + 1);
    let gaps: Vec<Duration> = lists.windows(2).map(|w| w[1] - w[0]).collect();
    // Base delays 40, 80, 100 (cap), 100 ms, each scaled by a factor in [0.5, 1]: every gap
    // is at least the previous one's lower bound and at most the cap plus scheduling slack.
    let slack = Duration::from_millis(30);
    let bounds = [(20, 40), (40, 80), (50, 100), (50, 100)];
    for (gap, (lo, hi)) in gaps.iter().zip(bounds) {
        assert!(*gap >= Duration::from_millis(lo) && *gap <= Duration::from_millis(hi) + slack, "gaps {gaps:?}");
    }
}

/// Nothing listens: start() returns at once and the failed attempts are counted.
#[tokio::test]
async fn unreachable_api_does_not_block() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let lookup = start(&options(&format!("http://127.0.0.1:{port}")), counters.clone()).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    wait_for("three failed lists", || Counters::get(&counters.k8s_list_failures) >= 3).await;
    assert_eq!(lookup.by_pod_uid(&web_pod().uid), None);
    assert_eq!(Counters::get(&counters.k8s_relists), 0);
}

/// An owner lookup that fails leaves the direct owner (the ReplicaSet) in place, counted, and is
/// retried until the Deployment is known.
#[tokio::test]
async fn failed_owner_lookup_is_retried() {
    let api = FakeApi::start(Script {
        lists: [Reply::Json(200, testdata("pods-list-1.json"))].into(),
        failing_owner_gets: 1,
        ..Script::default()
    })
    .await;
    let counters = Arc::new(Counters::default());
    let store = start_store(&options(&api.url), counters.clone()).await.unwrap().expect("watching");
    wait_for("the first list", || Counters::get(&counters.k8s_relists) == 1).await;
    // The first owner GET of the list (web's ReplicaSet) failed.
    assert_eq!(Counters::get(&counters.k8s_owner_failures), 1);
    let web = store.by_container_id(&id("web")).unwrap();
    assert_eq!(web.owner, owner("ReplicaSet", "web-7d4b9c8f6d"));
    wait_for("the retried owner", || store.by_container_id(&id("web")).is_some_and(|p| p.owner == owner("Deployment", "web"))).await;
    assert_eq!(store.by_container_id(&id("web")).as_deref(), Some(&web_pod()));
    let rs_gets = api.owner_paths().iter().filter(|p| p.ends_with("/replicasets/web-7d4b9c8f6d")).count();
    assert_eq!(rs_gets, 2);
    assert_eq!(Counters::get(&counters.k8s_owner_failures), 1);
}

#[tokio::test]
async fn off_or_outside_a_cluster_watches_nothing() {
    let counters = Arc::new(Counters::default());
    let off = K8sOptions { mode: K8sMode::Off, ..options("http://127.0.0.1:1") };
    assert!(start_store(&off, counters.clone()).await.unwrap().is_none());
    let no_node = K8sOptions { node_name: None, ..options("http://127.0.0.1:1") };
    assert!(matches!(start_store(&no_node, counters.clone()).await, Err(K8sError::NoNodeName)));
    let bad_url = options("http://[::1");
    let err = start_store(&bad_url, counters).await.expect_err("bad URL");
    assert!(err.to_string().contains("invalid API server URL \"http://[::1\""), "{err}");
}

#[test]
fn options_from_the_environment() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned());
    let o = K8sOptions::from_vars(vars(&[("NODE_NAME", "worker-1"), ("TAPWIRE_K8S_API_URL", "http://127.0.0.1:8001")])).unwrap();
    assert_eq!((o.mode, o.node_name.as_deref(), o.api_url.as_deref(), o.kubeconfig), (K8sMode::Auto, Some("worker-1"), Some("http://127.0.0.1:8001"), None));
    let o = K8sOptions::from_vars(vars(&[("TAPWIRE_K8S", "off"), ("TAPWIRE_K8S_KUBECONFIG", "/etc/kube.conf")])).unwrap();
    assert_eq!((o.mode, o.kubeconfig), (K8sMode::Off, Some(PathBuf::from("/etc/kube.conf"))));
    let err = K8sOptions::from_vars(vars(&[("TAPWIRE_K8S", "yes")])).unwrap_err();
    assert_eq!(err.to_string(), "TAPWIRE_K8S=\"yes\" is not valid: expected auto, on or off");
}
