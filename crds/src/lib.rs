//! crashwatch API types.
//!
//! [`CrashEvent`] is the contract shared by `crashwatch-agent explain --json`, the standalone
//! agent's JSON Lines output and (later) the `CrashReport` custom resource's spec.

#![warn(missing_docs)]

pub mod event;

pub use event::{Address, CrashEvent, DetectedBy, EventKind, Frame, PointerAccess};
