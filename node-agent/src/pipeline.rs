//! What happens to every recognised item, in `run` and `explain` alike: hang episodes are
//! deduplicated, events are symbolized and explained, and counters are kept.

use crds::{CrashEvent, EventKind};

use crate::explain;
use crate::hangwatch::episodes::kernel_report_blocked_since;
use crate::hangwatch::{EpisodeVerdict, HangEpisodes};
use crate::kmsg::inflight::InFlightFile;
use crate::metrics::AgentMetrics;
use crate::recognise::{Found, Recognised};
use crate::symbolize::{Symbolize, SymbolizeError};

/// A finished event, and why it could not be symbolized when it could not.
pub struct Finished {
    /// The symbolized, explained event.
    pub event: CrashEvent,
    /// Why symbolization failed; the caller decides whether to log or show it.
    pub not_symbolized: Option<SymbolizeError>,
}

/// Turns recognised items into finished events.
pub struct Pipeline<S> {
    symbolizer: S,
    /// The hang episodes seen so far, shared with the `/proc` watcher.
    pub episodes: HangEpisodes,
    in_flight: Option<InFlightFile>,
}

impl<S: Symbolize> Pipeline<S> {
    /// Waits for what the symbolizer does in the background (a process about to exit).
    pub fn wait_for_background_work(&self) {
        self.symbolizer.wait_for_background_work();
    }

    /// A pipeline that symbolizes with `symbolizer`.
    pub fn new(symbolizer: S) -> Self {
        Pipeline {
            symbolizer,
            episodes: HangEpisodes::new(),
            in_flight: None,
        }
    }

    /// Notes each kernel log record in `file` while its event is symbolized, and does not
    /// symbolize again the record a previous run did not finish (see [`InFlightFile`]).
    pub fn note_symbolization_in(&mut self, file: InFlightFile) {
        self.in_flight = Some(file);
    }

    /// Handles one recognised item; returns the event to publish, if any.
    pub fn handle(&mut self, item: Recognised, metrics: Option<&AgentMetrics>) -> Option<Finished> {
        match item {
            Recognised::Event(found) => {
                let Found {
                    event,
                    monotonic_usec,
                } = *found;
                if event.kind == EventKind::HungTask
                    && !self.is_new_hang_episode(&event, monotonic_usec)
                {
                    return None;
                }
                Some(self.finish(event, metrics))
            }
            Recognised::CrashesSuppressed(count) => {
                if let Some(m) = metrics {
                    m.crashes_suppressed.inc_by(count);
                }
                tracing::warn!(count, "the kernel's rate limit dropped crash reports");
                None
            }
            Recognised::HungTaskReportsSuppressed => {
                if let Some(m) = metrics {
                    m.hung_task_reports_suppressed.inc();
                }
                tracing::warn!(
                    "the kernel stopped printing hung-task reports (kernel.hung_task_warnings); the /proc watcher still runs"
                );
                None
            }
            Recognised::Untrusted => {
                if let Some(m) = metrics {
                    m.kmsg_records_untrusted.inc();
                }
                None
            }
        }
    }

    /// Symbolizes, explains and counts an event that is to be published.
    pub fn finish(&mut self, mut event: CrashEvent, metrics: Option<&AgentMetrics>) -> Finished {
        let started = std::time::Instant::now();
        // Only events from the kernel log that name a module are symbolized for real.
        let note = self
            .in_flight
            .as_ref()
            .zip(event.kmsg_seq)
            .filter(|_| event.module.is_some());
        let not_symbolized = match note {
            Some((file, seq)) if file.was_interrupted(seq) => {
                // Its headers still name the binary, so the report keeps its fingerprint.
                if let Err(err) = self.symbolizer.identify(&mut event) {
                    tracing::debug!(%err, "the binary of an interrupted record is not known");
                }
                Some(SymbolizeError::Interrupted)
            }
            _ => {
                if let Some((file, seq)) = note
                    && let Err(err) = file.begin(seq)
                {
                    tracing::warn!(%err, "cannot note the record being symbolized");
                }
                // A panic in a parser must not take the agent down with the events it holds.
                let symbolizer = &self.symbolizer;
                let symbolized = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut copy = event.clone();
                    let result = symbolizer.symbolize(&mut copy);
                    (copy, result)
                }));
                if let Some((file, _)) = note
                    && let Err(err) = file.end()
                {
                    tracing::warn!(%err, "cannot remove the note of the record symbolized");
                }
                match symbolized {
                    Ok((symbolized, result)) => {
                        event = symbolized;
                        result.err()
                    }
                    Err(_) => Some(SymbolizeError::Panicked),
                }
            }
        };
        if let Some(m) = metrics {
            m.symbolization_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Some(err) = &not_symbolized {
                m.symbolization_failures
                    .with_label_values(&[err.reason()])
                    .inc();
            }
        }
        Finished {
            event: explain_and_count(event, metrics),
            not_symbolized,
        }
    }

    /// Explains and counts an event the core handler has symbolized already.
    pub fn finish_symbolized(
        &mut self,
        event: CrashEvent,
        metrics: Option<&AgentMetrics>,
    ) -> Finished {
        Finished {
            event: explain_and_count(event, metrics),
            not_symbolized: None,
        }
    }

    fn is_new_hang_episode(&mut self, event: &CrashEvent, monotonic_usec: Option<u64>) -> bool {
        let (Some(tid), Some(comm)) = (event.pid, event.comm.as_deref()) else {
            return true;
        };
        let seconds = event.blocked_seconds.unwrap_or(0);
        // Without timestamps (a pasted bare line), reports of one thread are one episode.
        let seen_at = monotonic_usec.unwrap_or(seconds.saturating_mul(1_000_000));
        let since = kernel_report_blocked_since(seen_at, seconds);
        let new =
            self.episodes.observe(tid, comm, since, seen_at, true) == Some(EpisodeVerdict::Report);
        if new && let Some(seq) = event.kmsg_seq {
            self.episodes.reported_by_record(tid, seq);
        }
        new
    }
}

/// Names the faulting instruction when symbolization did not, writes the explanation, and
/// counts the event.
fn explain_and_count(mut event: CrashEvent, metrics: Option<&AgentMetrics>) -> CrashEvent {
    if event.instruction.is_none() {
        event.instruction = explain::faulting_instruction(&event)
            .map(|i| i.text)
            .or_else(|| explain::arm64::faulting_instruction(&event));
    }
    let text = explain::explanation(&event);
    if !text.is_empty() {
        event.explanation = Some(text);
    }
    if let Some(m) = metrics {
        let process = event.comm.as_deref().unwrap_or("");
        if event.kind == EventKind::HungTask {
            m.count_hung_task(process);
        } else {
            m.count_crash(
                event.kind.as_str(),
                process,
                event.module.as_deref().unwrap_or(""),
            );
        }
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolize::Symbolize;

    /// A symbolizer that panics half-way, as a parser bug on a hostile file would.
    struct Panicking;

    impl Symbolize for Panicking {
        fn symbolize(&self, event: &mut CrashEvent) -> Result<(), SymbolizeError> {
            event.binary_path = Some("/half/done".into());
            panic!("a parser bug");
        }
    }

    /// A symbolizer that records, for each call, whether the note file existed meanwhile.
    struct Watching(std::path::PathBuf, std::cell::RefCell<Vec<bool>>);

    impl Symbolize for Watching {
        fn symbolize(&self, event: &mut CrashEvent) -> Result<(), SymbolizeError> {
            self.1.borrow_mut().push(self.0.exists());
            event.binary_path = Some("/bin/x".into());
            Ok(())
        }
    }

    #[test]
    fn a_record_whose_symbolization_did_not_finish_is_not_symbolized_again() {
        let dir = tempfile::tempdir().unwrap();
        let note = dir.path().join("symbolizing.json");
        let event = |seq| {
            let mut event = CrashEvent::new(EventKind::Segfault);
            event.module = Some("x".into());
            event.kmsg_seq = Some(seq);
            event
        };
        // A run that is "killed" while symbolizing record 41: the note stays behind.
        InFlightFile::open(dir.path(), "boot").begin(41).unwrap();

        let mut pipeline = Pipeline::new(Watching(note.clone(), Default::default()));
        pipeline.note_symbolization_in(InFlightFile::open(dir.path(), "boot"));
        let finished = pipeline.finish(event(41), None);
        assert!(matches!(
            finished.not_symbolized,
            Some(SymbolizeError::Interrupted)
        ));
        assert_eq!(finished.event.binary_path, None);
        assert_eq!(finished.not_symbolized.unwrap().reason(), "interrupted");
        // The next records are symbolized, each with the note present meanwhile, and
        // nothing is left behind.
        for seq in [42, 43] {
            let finished = pipeline.finish(event(seq), None);
            assert!(finished.not_symbolized.is_none());
            assert_eq!(finished.event.binary_path.as_deref(), Some("/bin/x"));
        }
        assert_eq!(*pipeline.symbolizer.1.borrow(), [true, true]);
        assert!(!note.exists());
    }

    #[test]
    fn a_panicking_symbolizer_leaves_the_event_intact_and_says_so() {
        let mut pipeline = Pipeline::new(Panicking);
        let mut event = CrashEvent::new(EventKind::Segfault);
        event.comm = Some("qemu-nbd".into());
        let finished = pipeline.finish(event, None);
        assert!(matches!(
            finished.not_symbolized,
            Some(SymbolizeError::Panicked)
        ));
        assert_eq!(finished.event.comm.as_deref(), Some("qemu-nbd"));
        assert_eq!(
            finished.event.binary_path, None,
            "nothing half-done is kept"
        );
    }
}
