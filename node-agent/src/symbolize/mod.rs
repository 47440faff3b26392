//! Stage 3 of the pipeline: from a module and an address to function, file and line.
//!
//! Symbolization is not built yet; this is the seam the pipeline calls, so that adding it
//! changes no caller.

use crds::CrashEvent;

/// Fills in what can be learned about an event from binaries and debug information.
pub trait Symbolize {
    /// Adds `binaryPath`, `buildId`, `frames`, `instruction` … to the event where it can.
    fn symbolize(&self, event: &mut CrashEvent);
}

/// A symbolizer that adds nothing (`--no-symbolize`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSymbolizer;

impl Symbolize for NoSymbolizer {
    fn symbolize(&self, _event: &mut CrashEvent) {}
}
