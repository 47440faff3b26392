//! Which CrashReports to delete: those not seen for the retention time, and on each node
//! the oldest beyond the cap. Pure.

use std::collections::HashMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// How long reports live and how many a node keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// A report is deleted this long after its last occurrence.
    pub ttl: Duration,
    /// The most reports a node keeps; the least recently seen go first.
    pub per_node: usize,
}

/// A report as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its node.
    pub node: &'a str,
    /// Its last occurrence; None before its first status write (never expired, and kept
    /// before every report with a time).
    pub last_seen: Option<Timestamp>,
}

/// Why a report goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// Not seen for the retention time.
    Expired,
    /// Its node holds more reports than the cap, and it is among the least recently seen.
    OverCap,
}

impl Why {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Why::Expired => "expired",
            Why::OverCap => "over_cap",
        }
    }
}

/// The reports to delete, and why, in the order of `reports` per reason.
pub fn to_delete<'a>(
    reports: &[Held<'a>],
    now: Timestamp,
    rules: Retention,
) -> Vec<(&'a str, Why)> {
    let ttl = SignedDuration::try_from(rules.ttl).unwrap_or(SignedDuration::MAX);
    let cutoff = now.saturating_sub(ttl).unwrap_or(Timestamp::MIN);
    let mut out = Vec::new();
    let mut by_node: HashMap<&str, Vec<&Held<'a>>> = HashMap::new();
    for report in reports {
        if report.last_seen.is_some_and(|t| t < cutoff) {
            out.push((report.name, Why::Expired));
        } else {
            by_node.entry(report.node).or_default().push(report);
        }
    }
    let mut nodes: Vec<_> = by_node.into_iter().collect();
    nodes.sort_by_key(|(node, _)| *node);
    for (_, mut held) in nodes {
        if held.len() <= rules.per_node {
            continue;
        }
        // Oldest first; reports without a time yet count as the newest.
        held.sort_by_key(|r| (r.last_seen.is_none(), r.last_seen, r.name));
        let excess = held.len() - rules.per_node;
        out.extend(held[..excess].iter().map(|r| (r.name, Why::OverCap)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    #[test]
    fn reports_expire_the_retention_time_after_their_last_occurrence() {
        let day = 86_400;
        let reports = [
            Held {
                name: "old",
                node: "a",
                last_seen: Some(at(-8 * day)),
            },
            Held {
                name: "edge",
                node: "a",
                last_seen: Some(at(-7 * day + 1)),
            },
            Held {
                name: "new",
                node: "a",
                last_seen: Some(at(-60)),
            },
            Held {
                name: "unwritten",
                node: "a",
                last_seen: None,
            },
        ];
        let rules = Retention {
            ttl: Duration::from_secs(7 * day as u64),
            per_node: 10,
        };
        assert_eq!(
            to_delete(&reports, at(0), rules),
            vec![("old", Why::Expired)]
        );
    }

    #[test]
    fn each_node_keeps_at_most_the_cap_dropping_the_least_recently_seen() {
        let reports = [
            Held {
                name: "a1",
                node: "a",
                last_seen: Some(at(-10)),
            },
            Held {
                name: "a2",
                node: "a",
                last_seen: Some(at(-30)),
            },
            Held {
                name: "a3",
                node: "a",
                last_seen: None,
            },
            Held {
                name: "a4",
                node: "a",
                last_seen: Some(at(-20)),
            },
            Held {
                name: "b1",
                node: "b",
                last_seen: Some(at(-99)),
            },
            Held {
                name: "b2",
                node: "b",
                last_seen: Some(at(-98)),
            },
        ];
        let rules = Retention {
            ttl: Duration::from_secs(3_600),
            per_node: 2,
        };
        let mut deleted = to_delete(&reports, at(0), rules);
        deleted.sort();
        assert_eq!(deleted, vec![("a2", Why::OverCap), ("a4", Why::OverCap)]);
    }
}
