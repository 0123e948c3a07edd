use std::collections::BTreeMap;

use super::*;
use crate::discover::k8s::NoPods;

fn config() -> SelectionConfig {
    SelectionConfig {
        cgroups: vec![],
        exclude_cgroups: vec![],
        namespaces: vec![],
        exclude_namespaces: vec![],
        pod_selectors: vec![],
        exclude_pod_selectors: vec![],
        ports: vec![],
        exclude_ports: vec![],
        executables: vec![],
        exclude_executables: vec![],
        exclude_otlp_exporters: true,
    }
}

fn proc(exe: &str, environ: &[u8]) -> ProcInfo {
    ProcInfo { exe: Some(exe.into()), comm: Some(exe.into()), environ: environ.to_vec(), cmdline: vec![] }
}

fn ports(p: &[u16]) -> impl FnOnce() -> HashSet<u16> {
    let set: HashSet<u16> = p.iter().copied().collect();
    move || set
}

#[test]
fn process_verdicts() {
    let mut c = config();
    assert_eq!(decide(&c, &proc("python3", b""), ports(&[]), 1), Verdict::In);
    assert_eq!(decide(&c, &proc("java", b"OTEL_TRACES_EXPORTER=otlp\0"), ports(&[]), 1), Verdict::Out);
    c.exclude_otlp_exporters = false;
    assert_eq!(decide(&c, &proc("java", b"OTEL_TRACES_EXPORTER=otlp\0"), ports(&[]), 1), Verdict::In);

    c.executables = vec![ExeGlob::parse("python3*").unwrap()];
    c.exclude_executables = vec![ExeGlob::parse("python3.9").unwrap()];
    assert_eq!(decide(&c, &proc("python3.11", b""), ports(&[]), 1), Verdict::In);
    assert_eq!(decide(&c, &proc("python3.9", b""), ports(&[]), 1), Verdict::Out);
    assert_eq!(decide(&c, &proc("nginx", b""), ports(&[]), 1), Verdict::Out);

    c.executables.clear();
    c.ports = vec![8080];
    c.exclude_ports = vec![9000];
    assert_eq!(decide(&c, &proc("nginx", b""), ports(&[8080, 22]), 1), Verdict::In);
    assert_eq!(decide(&c, &proc("nginx", b""), ports(&[]), 1), Verdict::Waiting);
    assert_eq!(decide(&c, &proc("nginx", b""), ports(&[8080, 9000]), 1), Verdict::Out);
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
fn pod_criteria_and_waiting_for_metadata() {
    const UID: &str = "0f3c2d1e-5b6a-4c7d-8e9f-0a1b2c3d4e5f";
    let mount = std::env::temp_dir().join(format!("tapwire-select-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&mount);
    let pod_dir = mount.join(format!("kubepods/burstable/pod{UID}"));
    std::fs::create_dir_all(&pod_dir).unwrap();
    std::fs::create_dir_all(mount.join("kubepods/burstable/pod11111111-2222-3333-4444-555555555555")).unwrap();
    std::fs::create_dir_all(mount.join("system.slice")).unwrap();
    let pod = PodMeta {
        namespace: "shop".into(),
        name: "web-1".into(),
        uid: UID.into(),
        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        ..PodMeta::default()
    };
    let mut c = config();
    c.cgroups = vec![CgroupPattern::parse("/kubepods").unwrap()];
    c.namespaces = vec!["shop".into()];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();

    let s = Selector::new(&c, &mount, Arc::new(OnePod(Arc::new(pod.clone())))).unwrap();
    let selected: Vec<&PathBuf> = s.cgroups().values().collect();
    assert_eq!(selected, vec![&pod_dir]);
    // The other pod's metadata is not known: it waits, it is not selected.
    assert_eq!(s.waiting_for_pods, 1);

    c.namespaces.clear();
    c.exclude_pod_selectors = vec![LabelSelector::parse("app=web").unwrap()];
    let s = Selector::new(&c, &mount, Arc::new(OnePod(Arc::new(pod)))).unwrap();
    // /kubepods and /kubepods/burstable are not pods: kept; the web pod is excluded.
    assert_eq!(s.cgroups().len(), 2, "{:?}", s.cgroups());
    assert!(!s.cgroups().values().any(|p| p == &pod_dir));

    // Without metadata nothing that is a pod is decided.
    let s = Selector::new(&c, &mount, Arc::new(NoPods)).unwrap();
    assert_eq!(s.waiting_for_pods, 2);
    std::fs::remove_dir_all(&mount).unwrap();
}

#[test]
fn kernel_map_diff() {
    let have = HashMap::from([(1u64, 1u32), (2, 1), (3, 2)]);
    let want = HashMap::from([(2u64, 1u32), (3, 1), (4, 1)]);
    let mut d = diff(&have, &want);
    d.sort();
    assert_eq!(d, vec![(1, None), (3, Some(1)), (4, Some(1))]);
}

#[test]
fn a_process_gone_before_its_events_are_read_keeps_them() {
    // Short-lived clients (curl) exit before the agent reads their first events; their cgroup
    // is selected, so they are admitted rather than lost.
    let mount = std::env::temp_dir().join(format!("tapwire-select-gone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&mount);
    std::fs::create_dir_all(mount.join("clients")).unwrap();
    let mut c = config();
    c.cgroups = vec![CgroupPattern::parse("/clients").unwrap()];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _guard = rt.enter();
    let mut s = Selector::new(&c, &mount, Arc::new(NoPods)).unwrap();
    let (&id, _) = s.cgroups().iter().next().expect("the clients cgroup is selected");
    s.proc_root = mount.join("no-proc");
    assert!(s.admits(4_000_000, id));
    std::fs::remove_dir_all(&mount).unwrap();
}
