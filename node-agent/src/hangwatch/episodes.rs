//! One event per stuck episode, whoever saw it first (pure).
//!
//! A task stuck once is reported by the kernel again and again (`blocked for more than 2, 3,
//! 4 … seconds`) and seen by the `/proc` scan every second. Both sources are observations of
//! one *episode*: an interval during which the task did not run. An observation says "the
//! task has been blocked since at least `blocked_since` and still was at `seen_at`" (µs on
//! the monotonic clock). A new observation belongs to the episode already known for that
//! thread unless its blocked period starts after the episode was last seen blocked: then the
//! task must have run in between, and a new episode has begun.

use std::collections::HashMap;

/// Episodes not seen for this long are forgotten.
const FORGET_AFTER_USEC: u64 = 10 * 60 * 1_000_000;
/// At most this many threads are tracked; the stalest are forgotten first.
const MAX_TRACKED: usize = 4096;

#[derive(Debug, Clone)]
struct Episode {
    comm: String,
    last_seen_blocked: u64,
    reported: bool,
}

/// The episodes known per thread id.
#[derive(Debug, Default)]
pub struct HangEpisodes {
    by_tid: HashMap<u32, Episode>,
}

/// Whether an observation should become an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpisodeVerdict {
    /// The first report of this episode: emit it.
    Report,
    /// An episode already reported: do not emit again.
    AlreadyReported,
}

impl HangEpisodes {
    /// No episodes known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `tid` (named `comm`) was blocked from `blocked_since` until `seen_at`.
    /// `report` says whether this observation is enough to report the episode (a kernel
    /// report always is; a `/proc` sighting only past the threshold).
    pub fn observe(
        &mut self,
        tid: u32,
        comm: &str,
        blocked_since: u64,
        seen_at: u64,
        report: bool,
    ) -> Option<EpisodeVerdict> {
        self.forget_stale(seen_at);
        let episode = self.by_tid.entry(tid).or_insert_with(|| Episode {
            comm: comm.to_owned(),
            last_seen_blocked: seen_at,
            reported: false,
        });
        let new_episode = episode.comm != comm || blocked_since > episode.last_seen_blocked;
        if new_episode {
            *episode = Episode {
                comm: comm.to_owned(),
                last_seen_blocked: seen_at,
                reported: false,
            };
        }
        episode.last_seen_blocked = episode.last_seen_blocked.max(seen_at);
        if !report {
            return None;
        }
        if episode.reported {
            Some(EpisodeVerdict::AlreadyReported)
        } else {
            episode.reported = true;
            Some(EpisodeVerdict::Report)
        }
    }

    /// How many threads are tracked.
    pub fn len(&self) -> usize {
        self.by_tid.len()
    }

    /// Whether no thread is tracked.
    pub fn is_empty(&self) -> bool {
        self.by_tid.is_empty()
    }

    fn forget_stale(&mut self, now: u64) {
        self.by_tid
            .retain(|_, e| now.saturating_sub(e.last_seen_blocked) < FORGET_AFTER_USEC);
        if self.by_tid.len() >= MAX_TRACKED {
            let mut ages: Vec<u64> = self.by_tid.values().map(|e| e.last_seen_blocked).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() - MAX_TRACKED / 2];
            self.by_tid.retain(|_, e| e.last_seen_blocked >= cutoff);
        }
    }
}

/// The earliest a kernel report says the task may have blocked: the report prints whole
/// seconds, so the true start lies within one second before `seen_at - N`.
pub fn kernel_report_blocked_since(seen_at: u64, blocked_seconds: u64) -> u64 {
    seen_at.saturating_sub(blocked_seconds.saturating_add(1).saturating_mul(1_000_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn repeated_kernel_reports_are_one_episode() {
        let mut e = HangEpisodes::new();
        for (n, at) in [(2, 102), (3, 103), (4, 104)] {
            let since = kernel_report_blocked_since(at * S, n);
            let verdict = e.observe(7, "qemu-nbd", since, at * S, true);
            let expected = if n == 2 {
                EpisodeVerdict::Report
            } else {
                EpisodeVerdict::AlreadyReported
            };
            assert_eq!(verdict, Some(expected), "report at {at}");
        }
    }

    #[test]
    fn proc_scan_then_kernel_report_is_one_episode() {
        let mut e = HangEpisodes::new();
        // The scan sees the task blocked since 100.0 s every second, below the threshold …
        assert_eq!(
            e.observe(7, "qemu-nbd", 100 * S, 100 * S + S / 2, false),
            None
        );
        assert_eq!(
            e.observe(7, "qemu-nbd", 100 * S, 101 * S + S / 2, false),
            None
        );
        // … then the kernel reports it at 102.9 s with "more than 2 seconds".
        let since = kernel_report_blocked_since(102 * S + 9 * S / 10, 2);
        assert_eq!(
            e.observe(7, "qemu-nbd", since, 102 * S + 9 * S / 10, true),
            Some(EpisodeVerdict::Report)
        );
        // The scan passing its threshold later does not report it again.
        assert_eq!(
            e.observe(7, "qemu-nbd", 100 * S, 103 * S, true),
            Some(EpisodeVerdict::AlreadyReported)
        );
    }

    #[test]
    fn a_task_that_ran_in_between_starts_a_new_episode() {
        let mut e = HangEpisodes::new();
        assert_eq!(
            e.observe(7, "qemu-nbd", 100 * S, 105 * S, true),
            Some(EpisodeVerdict::Report)
        );
        // Blocked again since 106 s: after it was last seen blocked (105 s), so it ran.
        assert_eq!(
            e.observe(7, "qemu-nbd", 106 * S, 110 * S, true),
            Some(EpisodeVerdict::Report)
        );
        // A reused tid with another name is another task.
        assert_eq!(
            e.observe(7, "dd", 100 * S, 111 * S, true),
            Some(EpisodeVerdict::Report)
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut e = HangEpisodes::new();
        for tid in 0..10_000u32 {
            e.observe(tid, "t", 0, u64::from(tid), false);
        }
        assert!(e.len() <= MAX_TRACKED, "{}", e.len());
        e.observe(1, "t", 0, FORGET_AFTER_USEC * 3, false);
        assert_eq!(e.len(), 1, "stale episodes are forgotten");
    }
}
