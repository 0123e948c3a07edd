//! Container ids and pod uids from cgroup paths, for the shapes container runtimes and the
//! kubelet create:
//!
//! | runtime / driver | path |
//! |---|---|
//! | containerd or docker, cgroupfs | `/kubepods/burstable/pod<uid>/<id>` |
//! | containerd, systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | cri-o, systemd | `.../kubepods-pod<uid_>.slice/crio-<id>.scope` (`crio-conmon-<id>.scope` is the monitor, not the container) |
//! | docker, systemd | `/system.slice/docker-<id>.scope` |
//! | docker, cgroupfs | `/docker/<id>` |
//! | podman | `/machine.slice/libpod-<id>.scope/container` |
//!
//! `<id>` is 64 hex digits; `<uid_>` is the pod uid with `_` for `-` (systemd unit names).

/// Runtime prefixes of scope names, longest first.
const PREFIXES: &[&str] = &["cri-containerd-", "containerd-", "crio-", "docker-", "libpod-"];

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The id of the container whose cgroup `path` is (or is inside of): the component nearest the
/// leaf that names one.
pub fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|component| {
        if is_id(component) {
            return Some(component.to_owned());
        }
        let stem = component.strip_suffix(".scope").unwrap_or(component);
        if stem.starts_with("crio-conmon-") {
            return None;
        }
        PREFIXES.iter().find_map(|p| stem.strip_prefix(p)).filter(|id| is_id(id)).map(str::to_owned)
    })
}

/// The pod uid (dashed form) from a kubelet cgroup path.
pub fn pod_uid(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|component| {
        let stem = component.strip_suffix(".slice").unwrap_or(component);
        let at = stem.rfind("pod")?;
        // `pod<uid>` alone (cgroupfs) or `kubepods[-qos]-pod<uid_>` (systemd).
        if at != 0 && !stem[..at].ends_with('-') {
            return None;
        }
        let uid = stem[at + 3..].replace('_', "-");
        is_uid(&uid).then_some(uid)
    })
}

fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f2a8b7c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809102";
    const UID: &str = "0f3c2d1e-5b6a-4c7d-8e9f-0a1b2c3d4e5f";

    #[test]
    fn real_path_shapes() {
        let uid_ = UID.replace('-', "_");
        let cases = [
            (format!("/kubepods/burstable/pod{UID}/{ID}"), Some(ID), Some(UID)),
            (format!("/kubepods/pod{UID}/{ID}"), Some(ID), Some(UID)),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                Some(ID),
                Some(UID),
            ),
            (format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"), Some(ID), Some(UID)),
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-conmon-{ID}.scope"), None, Some(UID)),
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/docker-{ID}.scope"), Some(ID), Some(UID)),
            (format!("/system.slice/docker-{ID}.scope"), Some(ID), None),
            (format!("/docker/{ID}"), Some(ID), None),
            (format!("/machine.slice/libpod-{ID}.scope/container"), Some(ID), None),
            (format!("/kubepods/burstable/pod{UID}"), None, Some(UID)),
            ("/system.slice/nginx.service".to_owned(), None, None),
            ("/user.slice/user-0.slice/session-3.scope".to_owned(), None, None),
            (format!("/tapwire-e2e-pod{UID}x"), None, None),
            (format!("/notapod{UID}"), None, None),
        ];
        for (path, id, uid) in cases {
            assert_eq!(container_id(&path).as_deref(), id, "{path}");
            assert_eq!(pod_uid(&path).as_deref(), uid, "{path}");
        }
    }
}
