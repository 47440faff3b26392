//! crashwatch API types.
//!
//! [`CrashEvent`] is the contract shared by `crashwatch-agent explain --json`, the standalone
//! agent's JSON Lines output and the [`CrashReport`] custom resource's spec.
//! [`RemediationPolicy`] is what the operator acts on.

#![warn(missing_docs)]

pub mod bounds;
pub mod event;
pub mod limits;
pub mod node;
pub mod policy;
pub mod report;

pub use event::{
    Address, ContainerRef, CrashEvent, DetectedBy, EventKind, Frame, PodRef, PointerAccess,
};
pub use policy::{RemediationPolicy, RemediationPolicySpec, RemediationPolicyStatus};
pub use report::{Bucket, CrashReport, CrashReportSpec, CrashReportStatus, Occurrence};

/// Every CRD of the API, as YAML documents separated by `---`: what `crashwatch-operator
/// crds` prints and what `crds/crds.yaml` and the chart hold.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crds = [CrashReport::crd(), RemediationPolicy::crd()];
    crds.iter()
        .map(|crd| serde_saphyr::to_string(crd).expect("CRDs serialize"))
        .collect::<Vec<_>>()
        .join("---\n")
}
