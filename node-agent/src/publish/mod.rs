//! Stage 5 of the pipeline: where finished events go: JSON Lines on stdout (standalone), or
//! CrashReports on the API server.

pub mod kubernetes;
pub mod outbox;

use std::io::{self, Write};

use crds::CrashEvent;

/// A destination for finished events.
pub trait Publish {
    /// Publishes one event; an error means it was not delivered.
    fn publish(&mut self, event: &CrashEvent) -> io::Result<()>;

    /// The smallest kernel log sequence number accepted but not yet delivered: the kmsg
    /// cursor stays before it, so a restart reads it again. None when all is delivered.
    fn oldest_undelivered_seq(&self) -> Option<u64> {
        None
    }

    /// Whether an event without a kernel log sequence number (a hang found by the `/proc`
    /// scan) was accepted but is not delivered yet.
    fn has_undelivered_without_seq(&self) -> bool {
        false
    }
}

/// Writes each event as one JSON line (JSON Lines) and flushes, so a reader sees it at once.
pub struct JsonLines<W: Write> {
    out: W,
}

impl<W: Write> JsonLines<W> {
    /// Writes to `out`.
    pub fn new(out: W) -> Self {
        JsonLines { out }
    }
}

impl<W: Write> Publish for JsonLines<W> {
    fn publish(&mut self, event: &CrashEvent) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, event)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}
