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

use serde::{Deserialize, Serialize};

/// Episodes not seen for this long are forgotten.
const FORGET_AFTER_USEC: u64 = 10 * 60 * 1_000_000;
/// At most this many threads are tracked; the stalest are forgotten first.
const MAX_TRACKED: usize = 4096;

#[derive(Debug, Clone)]
struct Episode {
    comm: String,
    last_seen_blocked: u64,
    reported: bool,
    /// The kernel log sequence number of the report that reported it, when one did.
    report_seq: Option<u64>,
}

/// A reported episode as kept across agent restarts (same boot: the times are on the
/// monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedEpisode {
    /// The thread id.
    pub tid: u32,
    /// The thread's name.
    pub comm: String,
    /// When it was last seen blocked (µs, monotonic).
    pub last_seen_blocked: u64,
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
            report_seq: None,
        });
        let new_episode = episode.comm != comm || blocked_since > episode.last_seen_blocked;
        if new_episode {
            *episode = Episode {
                comm: comm.to_owned(),
                last_seen_blocked: seen_at,
                reported: false,
                report_seq: None,
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

    /// Records that the episode of `tid` was reported by the kernel log record `seq`.
    pub fn reported_by_record(&mut self, tid: u32, seq: u64) {
        if let Some(episode) = self.by_tid.get_mut(&tid) {
            episode.report_seq = Some(seq);
        }
    }

    /// The reported episodes whose report is delivered: those reported by the `/proc` scan
    /// (the caller saves only when all of those are delivered), and those reported by a
    /// kernel record at or before `delivered_through` (later ones are read again after a
    /// restart, and must then be reported again).
    pub fn delivered(&self, delivered_through: Option<u64>) -> Vec<SavedEpisode> {
        let mut saved: Vec<SavedEpisode> = self
            .by_tid
            .iter()
            .filter(|(_, e)| e.reported)
            .filter(|(_, e)| match e.report_seq {
                None => true,
                Some(seq) => delivered_through.is_some_and(|through| seq <= through),
            })
            .map(|(&tid, e)| SavedEpisode {
                tid,
                comm: e.comm.clone(),
                last_seen_blocked: e.last_seen_blocked,
            })
            .collect();
        saved.sort_by_key(|e| e.tid);
        saved
    }

    /// Takes back episodes reported before a restart, so that a thread still stuck in one
    /// is not reported again.
    pub fn restore(&mut self, saved: Vec<SavedEpisode>) {
        for episode in saved {
            self.by_tid.entry(episode.tid).or_insert(Episode {
                comm: episode.comm,
                last_seen_blocked: episode.last_seen_blocked,
                reported: true,
                report_seq: None,
            });
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
    fn an_episode_reported_before_a_restart_is_not_reported_again_after_it() {
        let mut before = HangEpisodes::new();
        // The scan reports thread 7 (blocked since 100 s); the kernel reports thread 8 in
        // record 500 and thread 9 in record 900, which is not delivered yet.
        assert_eq!(
            before.observe(7, "qemu-nbd", 100 * S, 103 * S, true),
            Some(EpisodeVerdict::Report)
        );
        for (tid, seq) in [(8, 500), (9, 900)] {
            let since = kernel_report_blocked_since(104 * S, 2);
            assert_eq!(
                before.observe(tid, "qemu-nbd", since, 104 * S, true),
                Some(EpisodeVerdict::Report)
            );
            before.reported_by_record(tid, seq);
        }
        let saved = before.delivered(Some(899));
        assert_eq!(
            saved.iter().map(|e| e.tid).collect::<Vec<_>>(),
            [7, 8],
            "record 900 is read again after the restart: its episode is not saved"
        );

        let mut after = HangEpisodes::new();
        after.restore(saved);
        // Still stuck in the same episode: seen by the scan, and reported by the kernel.
        assert_eq!(
            after.observe(7, "qemu-nbd", 100 * S, 110 * S, true),
            Some(EpisodeVerdict::AlreadyReported)
        );
        let since = kernel_report_blocked_since(110 * S, 8);
        assert_eq!(
            after.observe(8, "qemu-nbd", since, 110 * S, true),
            Some(EpisodeVerdict::AlreadyReported)
        );
        // The undelivered one is reported when its record is read again.
        let since = kernel_report_blocked_since(104 * S, 2);
        assert_eq!(
            after.observe(9, "qemu-nbd", since, 104 * S, true),
            Some(EpisodeVerdict::Report)
        );
        // Thread 7 ran after the restart and is stuck again: a new episode.
        assert_eq!(
            after.observe(7, "qemu-nbd", 111 * S, 115 * S, true),
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
