//! Accounting for records by sequence number (pure): duplicates are dropped, gaps are losses.

/// What to do with a record, judged by its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqVerdict {
    /// A new record; `lost` records before it were overwritten before they could be read.
    New {
        /// How many records are missing between the last one seen and this one.
        lost: u64,
    },
    /// A record at or before the last one seen (already handled before a restart).
    AlreadySeen,
}

/// Tracks the last sequence number handled, starting from an optional persisted cursor.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    last_seq: Option<u64>,
}

impl SeqTracker {
    /// A tracker that has handled everything up to and including `last_seq`, if given.
    pub fn resume_after(last_seq: Option<u64>) -> Self {
        SeqTracker { last_seq }
    }

    /// The last sequence number handled.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Judges the next record read and advances past it when it is new.
    ///
    /// With no previous record (a fresh start) nothing counts as lost: what was overwritten
    /// before the agent first started was never promised.
    pub fn observe(&mut self, seq: u64) -> SeqVerdict {
        match self.last_seq {
            Some(last) if seq <= last => SeqVerdict::AlreadySeen,
            Some(last) => {
                self.last_seq = Some(seq);
                SeqVerdict::New {
                    lost: seq - last - 1,
                }
            }
            None => {
                self.last_seq = Some(seq);
                SeqVerdict::New { lost: 0 }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_records_lose_nothing() {
        let mut tracker = SeqTracker::default();
        assert_eq!(tracker.observe(10), SeqVerdict::New { lost: 0 });
        assert_eq!(tracker.observe(11), SeqVerdict::New { lost: 0 });
        assert_eq!(tracker.last_seq(), Some(11));
    }

    #[test]
    fn a_gap_is_counted_exactly() {
        let mut tracker = SeqTracker::resume_after(Some(100));
        assert_eq!(tracker.observe(442), SeqVerdict::New { lost: 341 });
        assert_eq!(tracker.observe(443), SeqVerdict::New { lost: 0 });
    }

    #[test]
    fn records_up_to_the_cursor_are_skipped() {
        let mut tracker = SeqTracker::resume_after(Some(5));
        assert_eq!(tracker.observe(3), SeqVerdict::AlreadySeen);
        assert_eq!(tracker.observe(5), SeqVerdict::AlreadySeen);
        assert_eq!(tracker.observe(6), SeqVerdict::New { lost: 0 });
        assert_eq!(tracker.observe(6), SeqVerdict::AlreadySeen);
    }
}
