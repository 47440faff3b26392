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

/// Where a drain stands after one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// No evictable pod is left on the node.
    Done,
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
/// operator's pod (namespace, name): its replicas stay. `eviction_client` must not retry 429s
/// by itself (kube's default client does, for many minutes).
pub async fn step(
    pods: &[Arc<Pod>],
    own_pod: (&str, &str),
    eviction_client: &kube::Client,
    node: &str,
    grace_period_seconds: Option<i64>,
) -> kube::Result<Progress> {
    let mut remaining = 0;
    let mut refused = Vec::new();
    let operator = operator_controller(pods, own_pod);
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
}
