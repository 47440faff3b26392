//! Occurrences in a window, from CrashReport counts and timestamps (a report stands for many
//! occurrences of one fault, so counting objects would be wrong).

use std::collections::BTreeMap;

use crds::{CrashReportStatus, RemediationPolicySpec};
use jiff::Timestamp;
use kube::core::{Selector, SelectorExt};

use crate::reports::ReportFacts;

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
    /// Occurrences per time bucket, as (start, count): every one in a bucket happened at
    /// or after its start.
    pub buckets: Vec<(Timestamp, u64)>,
}

impl ReportTimes {
    /// Reads a report's status. Times that do not parse are left out, which can only lower
    /// the counts.
    pub fn of_status(status: &CrashReportStatus) -> ReportTimes {
        let parse = |t: &Option<String>| t.as_deref().and_then(|t| t.parse().ok());
        let mut recent: Vec<Timestamp> = status
            .recent
            .iter()
            .filter_map(|o| parse(&o.time))
            .collect();
        recent.shrink_to_fit();
        let mut buckets: Vec<(Timestamp, u64)> = status
            .buckets
            .iter()
            .filter_map(|b| Some((b.start.parse().ok()?, b.count)))
            .collect();
        buckets.shrink_to_fit();
        ReportTimes {
            count: status.count,
            first_seen: parse(&status.first_seen),
            last_seen: parse(&status.last_seen),
            recent,
            buckets,
        }
    }

    /// Occurrences strictly after `since` that this report proves. Exact when the report
    /// keeps every occurrence in `recent` or all of them are after `since`; otherwise the
    /// larger of the recent ones after `since` and the buckets that start after `since`, a
    /// lower bound (short by at most the bucket that straddles `since`), so that the
    /// operator never acts on a guess.
    pub fn occurrences_after(&self, since: Timestamp) -> u64 {
        let recent = self.recent.iter().filter(|&&t| t > since).count() as u64;
        if self.count <= self.recent.len() as u64 {
            recent
        } else if self.first_seen.is_some_and(|first| first > since) {
            self.count
        } else {
            let bucketed: u64 = self
                .buckets
                .iter()
                .filter(|(start, _)| *start > since)
                .map(|(_, count)| count)
                .sum();
            recent.max(bucketed.min(self.count))
        }
    }

    /// The latest occurrence the report knows of.
    pub fn latest(&self) -> Option<Timestamp> {
        self.recent.iter().copied().chain(self.last_seen).max()
    }
}

/// What is known of the labels of the pod a report names: `Unknown` when the policy
/// needs them and they could not be read (the pod is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodLabels<'a> {
    /// The pod's labels.
    Known(&'a BTreeMap<String, String>),
    /// Not read, or the pod is gone.
    Unknown,
}

/// Whether a report counts against its node for a policy: its kind and identity (process
/// name, binary path, build-id) match, and its process ran on the host, or in a pod the
/// policy opts in (namespace, and labels when `pods.selector` is set: `labels` are the
/// labels of the report's pod). The node selector is applied to Nodes.
pub fn report_matches(
    spec: &RemediationPolicySpec,
    report: &ReportFacts,
    labels: PodLabels<'_>,
) -> bool {
    let selector = &spec.selector;
    let listed = |list: &[String], value: &Option<String>| {
        list.is_empty() || value.as_ref().is_some_and(|v| list.contains(v))
    };
    let place = match (&report.pod, &selector.pods) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pod), Some(pods)) => {
            let labelled = match (&pods.selector, labels) {
                (None, _) => true,
                (Some(_), PodLabels::Unknown) => false,
                (Some(wanted), PodLabels::Known(labels)) => {
                    Selector::try_from(wanted.clone()).is_ok_and(|wanted| wanted.matches(labels))
                }
            };
            (pods.namespaces.is_empty() || pods.namespaces.contains(&pod.namespace)) && labelled
        }
    };
    (selector.kinds.is_empty() || selector.kinds.contains(&report.kind))
        && listed(&selector.process_names, &report.comm)
        && listed(&selector.binary_paths, &report.binary_path)
        && listed(&selector.build_ids, &report.build_id)
        && place
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
            buckets: Vec::new(),
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

    /// The times of a report that saw `all` (seconds from `at(0)`), as the agent writes it.
    fn bucketed(all: &[i64]) -> ReportTimes {
        let mut buckets = Vec::new();
        for &t in all {
            crds::report::add_to_buckets(&mut buckets, at(t));
        }
        let mut report = times(
            all.len() as u64,
            all[0],
            &all[all.len().saturating_sub(5)..],
        );
        report.buckets = buckets
            .iter()
            .map(|b| (b.start.parse().unwrap(), b.count))
            .collect();
        report
    }

    #[test]
    fn a_count_of_ten_is_reached_on_the_tenth_occurrence_of_a_fault_first_seen_days_ago() {
        let mut all = vec![-3 * 86_400];
        for i in 0..9 {
            all.push(i * 60);
        }
        let window_start = |last: i64| at(last + 1 - 1_800);
        assert_eq!(bucketed(&all).occurrences_after(window_start(8 * 60)), 9);
        all.push(9 * 60);
        let tenth = bucketed(&all);
        assert_eq!(tenth.occurrences_after(window_start(9 * 60)), 10);
        assert_eq!(
            tenth.occurrences_after(at(60)),
            8,
            "a later window start holds fewer"
        );
        let mut without_buckets = tenth.clone();
        without_buckets.buckets.clear();
        assert_eq!(
            without_buckets.occurrences_after(window_start(9 * 60)),
            5,
            "the five recent ones are all the status proves without buckets"
        );
    }

    fn facts(comm: &str, pod: Option<(&str, &str)>) -> ReportFacts {
        ReportFacts {
            node_name: "n".into(),
            kind: crds::EventKind::HungTask,
            comm: Some(comm.into()),
            binary_path: Some("/usr/bin/qemu-nbd".into()),
            build_id: Some("ab12".into()),
            pod: pod.map(|(namespace, name)| crate::reports::PodOf {
                namespace: namespace.into(),
                name: name.into(),
            }),
            times: ReportTimes::default(),
        }
    }

    fn spec(selector: serde_json::Value) -> RemediationPolicySpec {
        serde_json::from_value(serde_json::json!({
            "match": selector,
            "threshold": {"count": 1, "window": "1m"},
            "action": "Cordon",
        }))
        .unwrap()
    }

    #[test]
    fn by_default_only_host_processes_count_and_pods_must_be_opted_in() {
        let plain = spec(serde_json::json!({"processNames": ["qemu-nbd"]}));
        assert!(report_matches(
            &plain,
            &facts("qemu-nbd", None),
            PodLabels::Unknown
        ));
        assert!(!report_matches(
            &plain,
            &facts("qemu-nbd", Some(("evil", "p"))),
            PodLabels::Unknown
        ));
        assert!(!report_matches(
            &plain,
            &facts("other", None),
            PodLabels::Unknown
        ));
        let storage = spec(serde_json::json!({
            "processNames": ["qemu-nbd"], "pods": {"namespaces": ["storage"]}
        }));
        assert!(report_matches(
            &storage,
            &facts("qemu-nbd", Some(("storage", "p"))),
            PodLabels::Unknown
        ));
        assert!(!report_matches(
            &storage,
            &facts("qemu-nbd", Some(("evil", "p"))),
            PodLabels::Unknown
        ));
        assert!(report_matches(
            &storage,
            &facts("qemu-nbd", None),
            PodLabels::Unknown
        ));
        let any_pod = spec(serde_json::json!({"pods": {}}));
        assert!(report_matches(
            &any_pod,
            &facts("x", Some(("evil", "p"))),
            PodLabels::Unknown
        ));
    }

    #[test]
    fn binary_paths_and_build_ids_must_match_when_given() {
        let by_path = spec(serde_json::json!({"binaryPaths": ["/usr/bin/qemu-nbd"]}));
        assert!(report_matches(
            &by_path,
            &facts("renamed", None),
            PodLabels::Unknown
        ));
        let other_path = spec(serde_json::json!({"binaryPaths": ["/opt/qemu-nbd"]}));
        assert!(!report_matches(
            &other_path,
            &facts("qemu-nbd", None),
            PodLabels::Unknown
        ));
        let by_id = spec(serde_json::json!({"buildIds": ["ab12"], "processNames": ["qemu-nbd"]}));
        assert!(report_matches(
            &by_id,
            &facts("qemu-nbd", None),
            PodLabels::Unknown
        ));
        let other_id = spec(serde_json::json!({"buildIds": ["cd34"]}));
        assert!(!report_matches(
            &other_id,
            &facts("qemu-nbd", None),
            PodLabels::Unknown
        ));
        let mut unsymbolized = facts("qemu-nbd", None);
        unsymbolized.build_id = None;
        assert!(
            !report_matches(&by_id, &unsymbolized, PodLabels::Unknown),
            "an unknown build-id never matches a list"
        );
    }

    #[test]
    fn a_pod_selector_needs_the_pods_labels() {
        let labelled = spec(serde_json::json!({
            "pods": {"namespaces": ["storage"], "selector": {"matchLabels": {"app": "nbd"}}}
        }));
        let in_pod = facts("qemu-nbd", Some(("storage", "p")));
        let nbd = BTreeMap::from([("app".to_owned(), "nbd".to_owned())]);
        let web = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        assert!(report_matches(&labelled, &in_pod, PodLabels::Known(&nbd)));
        assert!(!report_matches(&labelled, &in_pod, PodLabels::Known(&web)));
        assert!(
            !report_matches(&labelled, &in_pod, PodLabels::Unknown),
            "a gone pod"
        );
        let elsewhere = facts("qemu-nbd", Some(("other", "p")));
        assert!(!report_matches(
            &labelled,
            &elsewhere,
            PodLabels::Known(&nbd)
        ));
        assert!(report_matches(
            &labelled,
            &facts("qemu-nbd", None),
            PodLabels::Unknown
        ));
    }
}
