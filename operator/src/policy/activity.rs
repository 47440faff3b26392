//! Occurrences in a window, from CrashReport counts and timestamps (a report stands for many
//! occurrences of one fault, so counting objects would be wrong).

use crds::{CrashReport, RemediationPolicySpec};
use jiff::Timestamp;

/// What a report says about when its fingerprint occurred.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportTimes {
    /// Occurrences in all.
    pub count: u64,
    /// The first occurrence.
    pub first_seen: Option<Timestamp>,
    /// The last occurrence.
    pub last_seen: Option<Timestamp>,
    /// The times of the most recent occurrences (at most `crds::RECENT_OCCURRENCES`).
    pub recent: Vec<Timestamp>,
}

impl ReportTimes {
    /// Reads a report's status. Times that do not parse are left out, which can only lower
    /// the counts.
    pub fn of(report: &CrashReport) -> ReportTimes {
        let Some(status) = &report.status else {
            return ReportTimes::default();
        };
        let parse = |t: &Option<String>| t.as_deref().and_then(|t| t.parse().ok());
        ReportTimes {
            count: status.count,
            first_seen: parse(&status.first_seen),
            last_seen: parse(&status.last_seen),
            recent: status
                .recent
                .iter()
                .filter_map(|o| parse(&o.time))
                .collect(),
        }
    }

    /// Occurrences strictly after `since` that this report proves. Exact when the report
    /// keeps every occurrence in `recent` or all of them are after `since`; otherwise the
    /// recent ones after `since`, a lower bound, so that the operator never acts on a guess.
    pub fn occurrences_after(&self, since: Timestamp) -> u64 {
        let recent = self.recent.iter().filter(|&&t| t > since).count() as u64;
        if self.count <= self.recent.len() as u64 {
            recent
        } else if self.first_seen.is_some_and(|first| first > since) {
            self.count
        } else {
            recent
        }
    }

    /// The latest occurrence the report knows of.
    pub fn latest(&self) -> Option<Timestamp> {
        self.recent.iter().copied().chain(self.last_seen).max()
    }
}

/// Whether a report counts against its node for a policy (process name and kind; the node
/// selector is applied to Nodes).
pub fn report_matches(spec: &RemediationPolicySpec, report: &CrashReport) -> bool {
    let selector = &spec.selector;
    let event = &report.spec.event;
    (selector.kinds.is_empty() || selector.kinds.contains(&event.kind))
        && (selector.process_names.is_empty()
            || event
                .comm
                .as_ref()
                .is_some_and(|comm| selector.process_names.contains(comm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn times(count: u64, first: i64, recent: &[i64]) -> ReportTimes {
        ReportTimes {
            count,
            first_seen: Some(at(first)),
            last_seen: recent.last().map(|&t| at(t)),
            recent: recent.iter().map(|&t| at(t)).collect(),
        }
    }

    #[test]
    fn a_report_holding_every_occurrence_is_counted_exactly() {
        let report = times(3, 10, &[10, 20, 30]);
        assert_eq!(report.occurrences_after(at(0)), 3);
        assert_eq!(report.occurrences_after(at(15)), 2);
        assert_eq!(report.occurrences_after(at(30)), 0);
    }

    #[test]
    fn a_busy_report_counts_all_when_it_began_inside_the_window() {
        let report = times(40, 5, &[60, 70, 80, 90, 100]);
        assert_eq!(report.occurrences_after(at(0)), 40);
    }

    #[test]
    fn a_busy_report_that_began_before_the_window_proves_only_its_recent_occurrences() {
        let report = times(40, -500, &[60, 70, 80, 90, 100]);
        assert_eq!(report.occurrences_after(at(0)), 5);
        assert_eq!(report.occurrences_after(at(75)), 3);
    }

    #[test]
    fn a_report_without_status_has_no_occurrences_yet() {
        assert_eq!(ReportTimes::default().occurrences_after(at(0)), 0);
        assert_eq!(ReportTimes::default().latest(), None);
    }
}
