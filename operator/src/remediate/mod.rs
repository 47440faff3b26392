//! The Kubernetes side of a plan: node writes, drains and Events.

pub mod drain;
pub mod node;
