//! crashwatch-operator: turns repeated crashes and hangs on a node into a safe, explainable
//! remediation.
//!
//! The flow is `policy` (pure: what to do) → `remediate` (the Kubernetes writes) under the
//! `controller`, which only the `leader` runs.

pub mod controller;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod remediate;
pub mod reports;
