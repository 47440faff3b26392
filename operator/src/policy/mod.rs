//! Pure policy logic: durations, occurrences in a window, the per-node ledger, and the plan
//! that decides what one reconcile does. No I/O here.

pub mod activity;
pub mod duration;
pub mod ledger;
pub mod plan;
pub mod retention;
pub mod status;
