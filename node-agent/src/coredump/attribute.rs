//! Which pod and container a process ran in: the pod uid and container id from its cgroup
//! path (the kubelet's layout, cgroupfs or systemd driver, v1 or v2), and the names from the
//! container runtime's bundle (`config.json` annotations, written by containerd's CRI plugin
//! and by CRI-O). Pure parsing; the callers read the files.

use std::path::{Path, PathBuf};

use crds::{ContainerRef, PodRef};

/// The pod uid and container id found in a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupIds {
    /// The pod's uid, with dashes.
    pub pod_uid: String,
    /// The container id (64 hex digits), when the path goes down to the container.
    pub container_id: Option<String>,
}

/// The ids in one cgroup path, such as `/kubepods/besteffort/pod<uid>/<id>` (cgroupfs) or
/// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`
/// (systemd). None outside a pod.
pub fn ids_in_path(path: &str) -> Option<CgroupIds> {
    let mut parts = path.split('/').skip_while(|p| !p.starts_with("kubepods"));
    let mut pod_uid = None;
    let mut container_id = None;
    for part in parts.by_ref() {
        if pod_uid.is_none() {
            pod_uid = pod_uid_in(part);
        } else {
            container_id = container_id_in(part);
            break;
        }
    }
    Some(CgroupIds {
        pod_uid: pod_uid?,
        container_id,
    })
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_in(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    let at = part.rfind("pod")?;
    let uid = part[at + 3..].replace('_', "-");
    let valid = uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    valid.then_some(uid)
}

/// `<id>` (cgroupfs) or `<runtime>-<id>.scope` (systemd), the id being 64 hex digits.
fn container_id_in(part: &str) -> Option<String> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    let id = part.rsplit('-').next()?;
    let valid = id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit());
    valid.then(|| id.to_ascii_lowercase())
}

/// The ids in the contents of `/proc/PID/cgroup`: the first line naming a pod.
pub fn ids_in_proc_cgroup(text: &str) -> Option<CgroupIds> {
    text.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find_map(ids_in_path)
}

/// The pod and container a runtime's bundle `config.json` names, through the annotations
/// of containerd's CRI plugin (`io.kubernetes.cri.*`) or CRI-O (`io.kubernetes.*`).
pub fn refs_in_bundle(config: &serde_json::Value, ids: &CgroupIds) -> (PodRef, ContainerRef) {
    let annotations = &config["annotations"];
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| annotations[*k].as_str())
            .map(str::to_owned)
    };
    let pod = PodRef {
        namespace: get(&[
            "io.kubernetes.cri.sandbox-namespace",
            "io.kubernetes.pod.namespace",
        ])
        .unwrap_or_default(),
        name: get(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"])
            .unwrap_or_default(),
        uid: get(&["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"])
            .or_else(|| Some(ids.pod_uid.clone())),
    };
    let container = ContainerRef {
        name: get(&[
            "io.kubernetes.cri.container-name",
            "io.kubernetes.container.name",
        ]),
        id: ids
            .container_id
            .as_ref()
            .map(|id| format!("containerd://{id}")),
        image: get(&[
            "io.kubernetes.cri.image-name",
            "io.kubernetes.cri-o.ImageName",
        ]),
    };
    (pod, container)
}

/// Where a container's bundle lies under a runtime state dir: containerd's
/// `STATE/io.containerd.runtime.v2.task/k8s.io/ID/config.json`.
pub fn bundle_config(runtime_state: &Path, container_id: &str) -> PathBuf {
    runtime_state
        .join("io.containerd.runtime.v2.task/k8s.io")
        .join(container_id)
        .join("config.json")
}

/// The pod and container of the process whose `/proc/PID/cgroup` reads `cgroup`, with names
/// from the bundle under `runtime_state` when it is readable; None for a host process.
pub fn attribute(cgroup: &str, runtime_state: &Path) -> Option<(PodRef, ContainerRef)> {
    let ids = ids_in_proc_cgroup(cgroup)?;
    let config = ids
        .container_id
        .as_deref()
        .map(|id| bundle_config(runtime_state, id))
        .and_then(|path| std::fs::read(path).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(serde_json::Value::Null);
    Some(refs_in_bundle(&config, &ids))
}

/// Fills in the names of a pod and container known by ids only, from the bundle.
pub fn name_from_bundle(pod: &mut PodRef, container: &mut ContainerRef, runtime_state: &Path) {
    let Some(id) = container
        .id
        .as_deref()
        .and_then(|id| id.rsplit("://").next())
        .map(str::to_owned)
    else {
        return;
    };
    let Some(config) = std::fs::read(bundle_config(runtime_state, &id))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
    else {
        return;
    };
    let ids = CgroupIds {
        pod_uid: pod.uid.clone().unwrap_or_default(),
        container_id: Some(id),
    };
    (*pod, *container) = refs_in_bundle(&config, &ids);
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "863a656b-ce85-4ab3-a7fd-71ebe3d3a5df";
    const ID: &str = "ca1d417e0814bae39a16aaccd7a65b99e61d28c3ad16730d6e99eb44a9b4b708";

    #[test]
    fn cgroupfs_paths_of_v1_and_v2_name_the_pod_and_container() {
        // As read on this machine's real node (cgroup v1, kubelet --cgroup-driver=cgroupfs).
        let text = format!(
            "9:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n4:memory:/kubepods/besteffort/pod{UID}/{ID}\n0::/kubepods/besteffort/pod{UID}/{ID}\n"
        );
        let ids = ids_in_proc_cgroup(&text).unwrap();
        assert_eq!(ids.pod_uid, UID);
        assert_eq!(ids.container_id.as_deref(), Some(ID));
        let burstable = ids_in_path(&format!("/kubepods/burstable/pod{UID}")).unwrap();
        assert_eq!(burstable.container_id, None);
    }

    #[test]
    fn systemd_slices_name_the_pod_and_container() {
        let uid_ = UID.replace('-', "_");
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
        );
        let ids = ids_in_path(&path).unwrap();
        assert_eq!(ids.pod_uid, UID);
        assert_eq!(ids.container_id.as_deref(), Some(ID));
    }

    #[test]
    fn host_processes_have_no_pod() {
        assert_eq!(ids_in_proc_cgroup("0::/system.slice/ssh.service\n"), None);
        assert_eq!(ids_in_proc_cgroup("4:memory:/\n"), None);
        assert_eq!(ids_in_path("/kubepods/besteffort/podnot-a-uid/x"), None);
    }

    #[test]
    fn containerd_annotations_give_the_names() {
        let config = serde_json::json!({"annotations": {
            "io.kubernetes.cri.container-name": "sl",
            "io.kubernetes.cri.image-name": "crashwatch.test/busybox:1",
            "io.kubernetes.cri.sandbox-name": "sl",
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.sandbox-uid": UID,
        }});
        let ids = CgroupIds {
            pod_uid: UID.into(),
            container_id: Some(ID.into()),
        };
        let (pod, container) = refs_in_bundle(&config, &ids);
        assert_eq!(pod.namespace, "default");
        assert_eq!(pod.name, "sl");
        assert_eq!(pod.uid.as_deref(), Some(UID));
        assert_eq!(container.name.as_deref(), Some("sl"));
        assert_eq!(
            container.image.as_deref(),
            Some("crashwatch.test/busybox:1")
        );
        assert_eq!(container.id, Some(format!("containerd://{ID}")));
    }
}
