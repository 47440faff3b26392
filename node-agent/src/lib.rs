//! crashwatch's node agent.
//!
//! The pipeline, one module per stage:
//! [`kmsg`] (read the kernel log) → [`recognise`] (lines to events) → [`symbolize`]
//! (addresses to source) → [`explain`] (plain words) → [`publish`] (stdout, metrics,
//! CrashReports). [`hangwatch`] adds hangs the kernel did not report, [`coredump`] adds the
//! core handler's view of each crash (the pod, the whole stack), and [`daemon`] runs it all;
//! [`pipeline`] is the part shared by `run` and `explain`.

#![warn(missing_docs)]

pub mod conditions;
pub mod coredump;
pub mod daemon;
pub mod explain;
pub mod hangwatch;
pub mod kmsg;
pub mod metrics;
pub mod pipeline;
pub mod publish;
pub mod recognise;
pub mod symbolize;
