//! One step of a drain: evict, through the Eviction API, every pod on the node that may be
//! evicted, and say what is left. PodDisruptionBudgets answer 429; the controller retries
//! with backoff.

use k8s_openapi::api::core::v1::Pod;
use std::sync::Arc;

use kube::api::{Api, DeleteParams, EvictParams};

/// The annotation the kubelet puts on a static pod's mirror.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why a pod on a draining node stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stays {
    /// A static pod's mirror: the kubelet owns it, eviction would be pointless.
    Mirror,
    /// A DaemonSet's pod: the DaemonSet would put it right back.
    DaemonSet,
    /// A replica of the operator that is draining: evicting it would stop the drain half way
    /// (on a one-node cluster for good). It leaves the node when the node goes.
    Operator,
}

/// The uid of a pod's controlling owner (a ReplicaSet for a Deployment's pod).
fn controller_uid(pod: &Pod) -> Option<&str> {
    let owners = pod.metadata.owner_references.iter().flatten();
    owners
        .filter(|owner| owner.controller == Some(true))
        .map(|owner| owner.uid.as_str())
        .next()
}

/// Whether a pod stays on a drained node, and why. `operator_controller` is the controlling
/// owner of this operator's own pod, when that pod is on the node.
pub fn stays(pod: &Pod, operator_controller: Option<&str>) -> Option<Stays> {
    let meta = &pod.metadata;
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
    {
        return Some(Stays::Mirror);
    }
    let by_daemon_set = meta
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.kind == "DaemonSet" && owner.controller == Some(true));
    if by_daemon_set {
        return Some(Stays::DaemonSet);
    }
    let ours = operator_controller.is_some_and(|uid| controller_uid(pod) == Some(uid));
    ours.then_some(Stays::Operator)
}

/// The controlling owner of the pod `namespace/name` (this operator's own), if it is among
/// `pods`.
pub fn operator_controller<'a>(pods: &'a [Arc<Pod>], own_pod: (&str, &str)) -> Option<&'a str> {
    pods.iter()
        .find(|pod| {
            pod.metadata.namespace.as_deref() == Some(own_pod.0)
                && pod.metadata.name.as_deref() == Some(own_pod.1)
        })
        .and_then(|pod| controller_uid(pod))
}

/// What a drain may do beyond the default, as `kubectl drain`'s flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OptIns {
    /// Evict pods no controller manages (`--force`).
    pub force: bool,
    /// Evict pods with `emptyDir` volumes (`--delete-emptydir-data`).
    pub delete_empty_dir_data: bool,
}

/// Why `kubectl drain` would refuse to evict `pod` without the opt-ins it lacks, or None.
/// Finished pods (Succeeded or Failed) lose nothing and are never refused.
pub fn refusal(pod: &Pod, opt_ins: OptIns) -> Option<String> {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if finished {
        return None;
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let controlled = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true));
    if !controlled && !opt_ins.force {
        return Some(format!(
            "{namespace}/{name} is managed by no controller and would be gone for good (set drain.force)"
        ));
    }
    let empty_dir = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .find(|v| v.empty_dir.is_some());
    match empty_dir {
        Some(volume) if !opt_ins.delete_empty_dir_data => Some(format!(
            "{namespace}/{name} has emptyDir volume {:?}, whose data would be lost (set drain.deleteEmptyDirData)",
            volume.name
        )),
        _ => None,
    }
}

/// Where a drain stands after one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// No evictable pod is left on the node.
    Done,
    /// Nothing was evicted: these pods need an opt-in the policy does not give.
    Refused(Vec<String>),
    /// Pods are still there: being deleted, or refused.
    Waiting {
        /// Evictable pods still on the node.
        remaining: usize,
        /// Evictions a disruption budget refused, as `namespace/pod: message`.
        refused: Vec<String>,
    },
}

/// Evicts what can be evicted of `pods` (those on `node`, from its watch), with
/// `grace_period_seconds` if the policy sets one (the pods' own otherwise). `own_pod` is this
/// operator's pod (namespace, name): its replicas stay. As `kubectl drain`, it evicts nothing
/// while a pod needs an opt-in the policy lacks. `eviction_client` must not retry 429s by
/// itself (kube's default client does, for many minutes).
pub async fn step(
    pods: &[Arc<Pod>],
    own_pod: (&str, &str),
    eviction_client: &kube::Client,
    node: &str,
    grace_period_seconds: Option<i64>,
    opt_ins: OptIns,
) -> kube::Result<Progress> {
    let operator = operator_controller(pods, own_pod);
    let refused: Vec<String> = pods
        .iter()
        .filter(|p| stays(p, operator).is_none() && p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| refusal(p, opt_ins))
        .collect();
    if !refused.is_empty() {
        return Ok(Progress::Refused(refused));
    }
    let mut remaining = 0;
    let mut refused = Vec::new();
    for pod in pods {
        if stays(pod, operator).is_some() {
            continue;
        }
        remaining += 1;
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let params = EvictParams {
            delete_options: Some(DeleteParams {
                grace_period_seconds: grace_period_seconds.map(|s| s as u32),
                ..DeleteParams::default()
            }),
            ..EvictParams::default()
        };
        let api: Api<Pod> = Api::namespaced(eviction_client.clone(), namespace);
        tracing::debug!(%node, pod = %format!("{namespace}/{name}"), "evicting");
        match api.evict(name, &params).await {
            Ok(_) => tracing::info!(%node, pod = %format!("{namespace}/{name}"), "evicted"),
            Err(kube::Error::Api(status)) if status.code == 429 => {
                refused.push(format!("{namespace}/{name}: {}", status.message));
            }
            Err(kube::Error::Api(status)) if status.code == 404 => remaining -= 1,
            Err(error) => return Err(error),
        }
    }
    Ok(if remaining == 0 {
        Progress::Done
    } else {
        Progress::Waiting { remaining, refused }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(metadata: serde_json::Value) -> Pod {
        serde_json::from_value(json!({ "metadata": metadata })).unwrap()
    }

    #[test]
    fn daemon_set_and_mirror_pods_stay_and_the_rest_go() {
        let daemon = pod(json!({"name": "agent", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "u", "controller": true
        }]}));
        let mirror = pod(json!({"name": "etcd", "annotations": {MIRROR_ANNOTATION: "abc"}}));
        let replica = pod(json!({"name": "web", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "u", "controller": true
        }]}));
        let adopted = pod(json!({"name": "odd", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "u", "controller": false
        }]}));
        assert_eq!(stays(&daemon, None), Some(Stays::DaemonSet));
        assert_eq!(stays(&mirror, None), Some(Stays::Mirror));
        assert_eq!(stays(&replica, None), None);
        assert_eq!(
            stays(&adopted, None),
            None,
            "only the controlling owner counts"
        );
        assert_eq!(stays(&pod(json!({"name": "bare"})), None), None);
    }

    #[test]
    fn the_replicas_of_the_draining_operator_stay_when_its_own_pod_is_on_the_node() {
        let replica = |name: &str, owner_uid: &str| {
            Arc::new(pod(
                json!({"name": name, "namespace": "crashwatch", "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": owner_uid,
                    "controller": true
                }]}),
            ))
        };
        let pods = [
            replica("operator-a", "rs-operator"),
            replica("operator-b", "rs-operator"),
            replica("web-1", "rs-web"),
        ];
        let ours = operator_controller(&pods, ("crashwatch", "operator-a"));
        assert_eq!(ours, Some("rs-operator"));
        let staying: Vec<_> = pods.iter().map(|p| stays(p, ours)).collect();
        assert_eq!(
            staying,
            [Some(Stays::Operator), Some(Stays::Operator), None]
        );
        // Elsewhere (its pod is not on the node), the operator evicts its other replicas.
        let elsewhere = operator_controller(&pods, ("crashwatch", "operator-z"));
        assert_eq!(elsewhere, None);
        assert_eq!(stays(&pods[1], elsewhere), None);
    }

    #[test]
    fn bare_pods_and_empty_dir_data_need_their_opt_ins_as_kubectl_drain() {
        let owned = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "u", "controller": true}]);
        let replica = pod(json!({"name": "web", "namespace": "ns", "ownerReferences": owned}));
        let bare = pod(json!({"name": "bare", "namespace": "ns"}));
        let mut scratch: Pod = serde_json::from_value(json!({
            "metadata": {"name": "cache", "namespace": "ns", "ownerReferences": owned},
            "spec": {"containers": [], "volumes": [{"name": "tmp", "emptyDir": {}}]},
        }))
        .unwrap();
        let none = OptIns::default();
        assert_eq!(refusal(&replica, none), None);
        let why = refusal(&bare, none).unwrap();
        assert!(
            why.contains("ns/bare") && why.contains("drain.force"),
            "{why}"
        );
        assert_eq!(
            refusal(
                &bare,
                OptIns {
                    force: true,
                    ..none
                }
            ),
            None
        );
        let why = refusal(&scratch, none).unwrap();
        assert!(
            why.contains("\"tmp\"") && why.contains("drain.deleteEmptyDirData"),
            "{why}"
        );
        assert!(
            refusal(
                &scratch,
                OptIns {
                    force: true,
                    ..none
                }
            )
            .is_some()
        );
        assert_eq!(
            refusal(
                &scratch,
                OptIns {
                    delete_empty_dir_data: true,
                    ..none
                }
            ),
            None
        );
        scratch.status = Some(serde_json::from_value(json!({"phase": "Succeeded"})).unwrap());
        assert_eq!(
            refusal(&scratch, none),
            None,
            "a finished pod loses nothing"
        );
    }
}
