//! The agent against a real kube-apiserver and etcd (started by `scripts/test.sh`): real
//! crashes on this machine become CrashReports.
//!
//! Needs root and the test control plane; each test takes the kernel lock and works on
//! its own node name, so the tests share the cluster without seeing each other's reports.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Agent, ControlPlane, KernelTest, crash, crash_storm, crashy, reports_of,
    start_at_the_end_of_the_log,
};

/// A node name no other test or run uses.
fn unique_node(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{test}-{}-{nanos}", std::process::id())
}

/// Waits until `node`'s reports satisfy `done`, and returns them.
fn wait_for_reports(
    cluster: &ControlPlane,
    node: &str,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reports = reports_of(cluster, node);
        if done(&reports) {
            return reports;
        }
        if Instant::now() > deadline {
            panic!("waiting for {what}; the reports of {node} are:\n{reports:#?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn count(report: &Value) -> u64 {
    report["status"]["count"].as_u64().unwrap_or(0)
}

/// The report of event kind `kind`.
fn find<'a>(reports: &'a [Value], kind: &str) -> Option<&'a Value> {
    reports.iter().find(|r| r["spec"]["kind"] == kind)
}

/// What every test here starts with: the kernel lock, the cluster with the CRDs installed,
/// a node name of its own, and an agent state dir positioned after the existing log.
struct Setup {
    test: KernelTest,
    cluster: ControlPlane,
    node: String,
}

impl Setup {
    /// None when the test is skipped.
    fn begin(name: &str) -> Option<Setup> {
        let test = KernelTest::begin()?;
        let cluster = ControlPlane::get()?;
        cluster.install_crds();
        start_at_the_end_of_the_log(test.state.path());
        Some(Setup {
            test,
            cluster,
            node: unique_node(name),
        })
    }

    /// Starts the publishing agent for crashy; waits until it is ready, or only alive
    /// when the API server is down.
    fn agent(&self, api_server_up: bool) -> Agent {
        let binary = crashy().to_str().unwrap();
        let (state, node, kubeconfig) =
            (self.test.state.path(), &self.node, &self.cluster.kubeconfig);
        let args = ["--binary", binary];
        if api_server_up {
            Agent::start_publishing(state, node, kubeconfig, &args)
        } else {
            Agent::start_publishing_during_outage(state, node, kubeconfig, &args)
        }
    }
}

#[test]
fn a_real_crash_becomes_one_crash_report_counted_across_repeats_and_restarts() {
    let Some(setup) = Setup::begin("e2e") else {
        return;
    };
    let (cluster, node) = (&setup.cluster, &setup.node);
    let agent = setup.agent(true);

    let first = crash("null");
    let reports = wait_for_reports(cluster, node, "the first crash", |r| r.len() == 1);
    let report = &reports[0];
    let spec = &report["spec"];
    assert_eq!(spec["kind"], "Segfault");
    assert_eq!(spec["comm"], "crashy");
    assert_eq!(spec["pid"], first.pid);
    assert_eq!(
        spec["faultAddress"], "0x100",
        "struct node puts next at 0x100"
    );
    assert_eq!(
        spec["errorBits"],
        serde_json::json!(["user", "read", "not-present"])
    );
    assert_eq!(spec["module"], "crashy");
    assert_eq!(spec["binaryMatches"], true);
    assert_eq!(spec["frames"][0]["function"], "read_null_offset");
    assert!(
        spec["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("read_null_offset ") && l.contains("crashy.c:")),
        "{spec:#}"
    );
    assert_eq!(count(report), 1);
    let name = report["metadata"]["name"].as_str().unwrap().to_owned();

    // A second identical crash: the same object, count 2.
    crash("null");
    let reports = wait_for_reports(cluster, node, "count 2", |r| {
        r.len() == 1 && count(&r[0]) == 2
    });
    assert_eq!(reports[0]["metadata"]["name"], name.as_str());

    // A burst of 12 more: counted exactly, in at most one write per object per interval.
    let writes_before = agent.labelled("crashwatch_reports_published_total", "result", "success");
    let started = Instant::now();
    for _ in 0..12 {
        crash("null");
    }
    wait_for_reports(cluster, node, "count 14", |r| {
        r.len() == 1 && count(&r[0]) == 14
    });
    let writes =
        agent.labelled("crashwatch_reports_published_total", "result", "success") - writes_before;
    let intervals = started.elapsed().as_secs_f64().ceil() + 1.0; // --publish-interval 1
    assert!(
        writes <= intervals,
        "{writes} writes in {intervals} intervals for one object"
    );

    // A restart reads nothing twice and creates nothing new.
    agent.stop();
    let agent = setup.agent(true);
    std::thread::sleep(Duration::from_secs(3));
    let reports = reports_of(cluster, node);
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert_eq!(count(&reports[0]), 14, "no double count after a restart");
    crash("null");
    wait_for_reports(cluster, node, "count 15 after the restart", |r| {
        r.len() == 1 && count(&r[0]) == 15
    });

    // What people see: kubectl's columns and kubectl explain.
    let table = cluster.kubectl(&["get", "crashreports", &name]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "NODE", "PROCESS", "KIND", "LOCATION", "COUNT", "LAST", "SEEN", "AGE"
        ]
    );
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.contains(node.as_str()) && row.contains("crashy") && row.contains("Segfault"),
        "{table}"
    );
    assert!(
        row.contains("read_null_offset") && row.contains(" 15 "),
        "{table}"
    );
    let explained = cluster.kubectl(&["explain", "crashreport.spec"]);
    for field in [
        "faultAddress",
        "frames",
        "explanation",
        "nodeName",
        "binaryMatches",
    ] {
        assert!(explained.contains(field), "{field} missing:\n{explained}");
    }
    assert!(explained.contains("fingerprint"), "{explained}");
    let events = cluster.kubectl(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        &format!("involvedObject.name={node}"),
        "-o",
        "json",
    ]);
    assert!(
        events.contains("read_null_offset"),
        "an Event on the Node names the location:\n{events}"
    );
    drop(agent);
}

#[test]
fn crashes_during_an_api_server_outage_are_all_published_when_it_returns() {
    let Some(setup) = Setup::begin("outage") else {
        return;
    };
    let (cluster, node) = (&setup.cluster, &setup.node);
    let agent = setup.agent(true);
    crash("null");
    wait_for_reports(cluster, node, "the crash before the outage", |r| {
        r.len() == 1
    });

    let outage = cluster.api_server_outage();
    for _ in 0..3 {
        crash("null");
    }
    for _ in 0..2 {
        crash("div");
    }
    // The agent holds them and says it is not ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.counter("crashwatch_reports_pending") < 5.0 || agent.is_ready() {
        assert!(
            Instant::now() < deadline,
            "pending {} ready {}:\n{}",
            agent.counter("crashwatch_reports_pending"),
            agent.is_ready(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // An agent restart during the outage loses nothing either: the cursor waited.
    agent.stop();
    let mut agent = setup.agent(false);

    drop(outage); // starts kube-apiserver again
    let reports = wait_for_reports(cluster, node, "everything after the outage", |r| {
        find(r, "Segfault").map(count) == Some(4) && find(r, "DivideError").map(count) == Some(2)
    });
    assert_eq!(reports.len(), 2, "{reports:#?}");
    assert_eq!(agent.counter("crashwatch_reports_pending"), 0.0);
    assert_eq!(
        agent.labelled("crashwatch_reports_published_total", "result", "dropped"),
        0.0
    );
    agent.wait_ready();
}

#[test]
fn sigkill_at_random_points_during_a_storm_neither_repeats_nor_loses_a_report() {
    let Some(setup) = Setup::begin("sigkill") else {
        return;
    };
    let (cluster, node) = (&setup.cluster, &setup.node);
    let mut agent = setup.agent(true);
    let crashes = 300;
    // Three kill points, spread at random over the storm (seeded from the clock; printed so
    // that a failure can be replayed by reading the log).
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut kill_points: Vec<usize> = (0..3)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % crashes as u64) as usize
        })
        .collect();
    kill_points.sort();
    eprintln!("killing the agent after crashes {kill_points:?}");
    for i in 0..crashes {
        crash_storm(1);
        for _ in kill_points.iter().filter(|&&k| k == i) {
            agent.kill();
            agent = setup.agent(true);
        }
    }
    let reports = wait_for_reports(cluster, node, "every crash counted", |r| {
        r.iter().map(count).sum::<u64>() >= crashes as u64
    });
    std::thread::sleep(Duration::from_secs(3));
    let settled = reports_of(cluster, node);
    assert_eq!(
        settled.len(),
        1,
        "one fingerprint, one report: {reports:#?}"
    );
    assert_eq!(
        count(&settled[0]),
        crashes as u64,
        "no duplicate and no missing occurrence"
    );
    drop(agent);
}

#[test]
fn a_storm_of_2000_real_crashes_is_counted_exactly_in_a_bounded_number_of_api_writes() {
    let Some(setup) = Setup::begin("storm") else {
        return;
    };
    let (cluster, node) = (&setup.cluster, &setup.node);
    let agent = setup.agent(true);
    let crashes = 2000;
    let started = Instant::now();
    crash_storm(crashes);
    let reports = wait_for_reports(cluster, node, "the whole storm counted", |r| {
        r.iter().map(count).sum::<u64>() >= crashes
    });
    let elapsed = started.elapsed();
    assert_eq!(reports.len(), 1, "one fingerprint, one object");
    assert_eq!(count(&reports[0]), crashes);
    // One write (and one Event) per object per publish interval (1 s here), whatever the rate.
    let writes = agent.labelled("crashwatch_reports_published_total", "result", "success");
    let intervals = elapsed.as_secs_f64().ceil() + 1.0;
    eprintln!("storm: {crashes} crashes published in {writes} writes over {elapsed:?}");
    assert!(
        writes <= intervals,
        "{writes} writes in {intervals} intervals"
    );
    assert_eq!(agent.counter("crashwatch_kmsg_records_lost_total"), 0.0);
}

/// Crash-to-CrashReport latency, printed for BENCHMARKS.md (`scripts/bench-remediation.sh`
/// collects it): from a real crash to its occurrence being readable from the API server.
/// The only bound asserted is a generous one: a crash is published within its interval.
#[test]
fn crash_to_crash_report_latency() {
    let Some(setup) = Setup::begin("latency") else {
        return;
    };
    let (cluster, node) = (&setup.cluster, &setup.node);
    let _agent = setup.agent(true);
    let mut latencies = Vec::new();
    for expected in 1..=10u64 {
        let crashed = Instant::now();
        crash("null");
        loop {
            let reports = reports_of(cluster, node);
            if reports.first().map(count) == Some(expected) {
                break;
            }
            assert!(
                crashed.elapsed() < Duration::from_secs(10),
                "occurrence {expected} not published"
            );
        }
        latencies.push(crashed.elapsed());
        // Land the next crash at a different point of the publish interval.
        std::thread::sleep(Duration::from_millis(137 * expected));
    }
    latencies.sort();
    eprintln!(
        "crash-to-CrashReport: min {:?}, median {:?}, max {:?} (publish interval 1 s, kubectl polling)",
        latencies[0], latencies[5], latencies[9]
    );
    assert!(latencies[9] < Duration::from_secs(5), "{latencies:?}");
}
