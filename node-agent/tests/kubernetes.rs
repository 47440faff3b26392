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
            "NAME",
            "NODE",
            "NAMESPACE",
            "POD",
            "PROCESS",
            "KIND",
            "LOCATION",
            "COUNT",
            "LAST",
            "SEEN",
            "AGE"
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

/// Crash-to-CrashReport latency at default settings (`--publish-interval 2`), printed for
/// BENCHMARKS.md (`scripts/bench-remediation.sh` collects it): from a real crash of a new
/// fingerprint to its CrashReport, with count 1, arriving on a watch of the API server. The
/// first occurrence of a fingerprint is written at once, so p99 must be at most 1 s.
#[test]
fn crash_to_crash_report_latency() {
    let Some(setup) = Setup::begin("latency") else {
        return;
    };
    let (cluster, node) = (&setup.cluster, &setup.node);
    const CRASHES: usize = 30;
    // 30 builds of crashy, each with a build-id of its own: 30 fingerprints.
    let bin = setup.test.state.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let salt = std::process::id();
    let names: Vec<String> = (0..CRASHES).map(|i| format!("lat-{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        let build_id = format!("-Wl,--build-id=0x{salt:08x}{i:08x}");
        support::compile_crashy(&bin.join(name), &[&build_id]);
    }
    let seen = watch_reports(cluster, node);
    let _agent = Agent::start_publishing(
        setup.test.state.path(),
        node,
        &cluster.kubeconfig,
        &[
            "--search-path",
            bin.to_str().unwrap(),
            "--publish-interval",
            "2",
        ],
    );
    let mut latencies = Vec::new();
    for (i, name) in names.iter().enumerate() {
        support::run_to_crash(&bin.join(name), "null");
        let crashed = Instant::now();
        loop {
            let (comm, count, at) = seen
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no CrashReport for {name} within 10 s"));
            if comm == *name && count >= 1 {
                latencies.push(at.saturating_duration_since(crashed));
                break;
            }
        }
        // Land the next crash at a different point of the publish interval.
        std::thread::sleep(Duration::from_millis(67 * (i as u64 % 7)));
    }
    latencies.sort();
    let percentile = |p: usize| latencies[(latencies.len() * p).div_ceil(100) - 1];
    eprintln!(
        "crash-to-CrashReport: p50 {:?}, p99 {:?}, max {:?} over {CRASHES} new fingerprints (default --publish-interval 2, watch)",
        percentile(50),
        percentile(99),
        latencies[CRASHES - 1]
    );
    assert!(percentile(99) <= Duration::from_secs(1), "{latencies:?}");
}

/// A `kubectl get --watch` of `node`'s CrashReports: each change as (comm, count, when it
/// arrived). The watch ends when this is dropped.
struct ReportWatch {
    child: std::process::Child,
    changes: std::sync::mpsc::Receiver<(String, u64, Instant)>,
}

impl ReportWatch {
    fn recv_timeout(
        &self,
        timeout: Duration,
    ) -> Result<(String, u64, Instant), std::sync::mpsc::RecvTimeoutError> {
        self.changes.recv_timeout(timeout)
    }
}

impl Drop for ReportWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a [`ReportWatch`].
fn watch_reports(cluster: &ControlPlane, node: &str) -> ReportWatch {
    use std::io::BufRead;
    let mut child = std::process::Command::new(cluster.bin.join("kubectl"))
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args([
            "get",
            "crashreports",
            "--watch",
            "-o",
            r#"jsonpath={.spec.nodeName} {.spec.comm} {.status.count}{"\n"}"#,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kubectl get --watch");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let node = node.to_owned();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() == 3 && fields[0] == node {
                let count = fields[2].parse().unwrap_or(0);
                if tx.send((fields[1].to_owned(), count, at)).is_err() {
                    break;
                }
            }
        }
    });
    ReportWatch { child, changes: rx }
}

/// A CrashReport the API server refuses for good (a ValidatingAdmissionPolicy denies its
/// process name) is dropped and counted; it does not hold up the report behind it, and the
/// kmsg cursor is not pinned on it.
#[test]
fn a_report_refused_by_admission_does_not_delay_the_others() {
    let Some(setup) = Setup::begin("refused") else {
        return;
    };
    let (cluster, node) = (&setup.cluster, &setup.node);
    let marker = format!("refuse{}", std::process::id() % 100_000);
    let policy = Policy::deny_comm(cluster, &marker, setup.test.state.path());
    let refused_binary = setup.test.state.path().join(&marker);
    std::fs::copy(crashy(), &refused_binary).unwrap();
    let agent = Agent::start_publishing(
        setup.test.state.path(),
        node,
        &cluster.kubeconfig,
        &[
            "--binary",
            crashy().to_str().unwrap(),
            "--binary",
            refused_binary.to_str().unwrap(),
        ],
    );
    // The refused report (DivideError) sorts before the other (Segfault) in the outbox.
    support::run_to_crash(&refused_binary, "div");
    crash("null");
    let crashed = Instant::now();
    let reports = wait_for_reports(cluster, node, "the crash behind the refused one", |r| {
        find(r, "Segfault").map(count) == Some(1)
    });
    let latency = crashed.elapsed();
    assert!(
        latency < Duration::from_secs(3),
        "published {latency:?} after the crash:\n{}",
        agent.log()
    );
    assert!(find(&reports, "DivideError").is_none(), "{reports:#?}");
    assert_eq!(
        agent.labelled("crashwatch_reports_published_total", "result", "rejected"),
        1.0,
        "{}",
        agent.log()
    );
    // Nothing waits any more: the refused occurrence does not pin the cursor.
    support::wait_until("an empty outbox", Duration::from_secs(5), || {
        agent.counter("crashwatch_reports_pending") == 0.0
    });
    let segfault_seq = reports[0]["status"]["lastKmsgSeq"].as_u64().unwrap();
    support::wait_until(
        "the cursor past both crashes",
        Duration::from_secs(5),
        || {
            let cursor: Value = serde_json::from_str(
                &std::fs::read_to_string(setup.test.state.path().join("kmsg-cursor.json")).unwrap(),
            )
            .unwrap();
            cursor["lastSeq"].as_u64().unwrap() >= segfault_seq
        },
    );
    drop(agent);
    drop(policy);
}

/// A ValidatingAdmissionPolicy (and its binding) created by a test; deleted when dropped.
struct Policy<'a> {
    cluster: &'a ControlPlane,
    name: String,
}

impl<'a> Policy<'a> {
    /// Denies every CrashReport write whose spec.comm is `comm`; waits until it is enforced.
    fn deny_comm(cluster: &'a ControlPlane, comm: &str, dir: &std::path::Path) -> Policy<'a> {
        let name = format!("deny-{comm}");
        let rule = serde_json::json!({
            "apiGroups": ["crashwatch.dev"], "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["crashreports", "crashreports/status"],
        });
        let objects = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "admissionregistration.k8s.io/v1",
             "kind": "ValidatingAdmissionPolicy",
             "metadata": {"name": name},
             "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [rule]},
                "validations": [{
                    "expression": format!("!has(object.spec.comm) || object.spec.comm != '{comm}'"),
                    "message": "refused by the test",
                }]}},
            {"apiVersion": "admissionregistration.k8s.io/v1",
             "kind": "ValidatingAdmissionPolicyBinding",
             "metadata": {"name": name},
             "spec": {"policyName": name, "validationActions": ["Deny"]}},
        ]});
        let file = dir.join("policy.json");
        std::fs::write(&file, objects.to_string()).unwrap();
        cluster.kubectl(&["apply", "-f", file.to_str().unwrap()]);
        let policy = Policy {
            cluster,
            name: name.clone(),
        };
        // Enforced once a server-side dry run of such a report is refused.
        let probe = serde_json::json!({
            "apiVersion": "crashwatch.dev/v1alpha1", "kind": "CrashReport",
            "metadata": {"name": format!("{name}-probe")},
            "spec": {"nodeName": "probe", "kind": "Segfault", "comm": comm},
        });
        let probe_file = dir.join("probe.json");
        std::fs::write(&probe_file, probe.to_string()).unwrap();
        support::wait_until("the admission policy", Duration::from_secs(30), || {
            let out = std::process::Command::new(cluster.bin.join("kubectl"))
                .arg("--kubeconfig")
                .arg(&cluster.kubeconfig)
                .args([
                    "create",
                    "--dry-run=server",
                    "-f",
                    probe_file.to_str().unwrap(),
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stderr).contains("refused by the test")
        });
        policy
    }
}

impl Drop for Policy<'_> {
    fn drop(&mut self) {
        for kind in [
            "validatingadmissionpolicybinding",
            "validatingadmissionpolicy",
        ] {
            let _ = std::process::Command::new(self.cluster.bin.join("kubectl"))
                .arg("--kubeconfig")
                .arg(&self.cluster.kubeconfig)
                .args(["delete", kind, &self.name, "--ignore-not-found"])
                .output();
        }
    }
}

/// An agent started within 30 s of boot (its monotonic clock reads a few seconds: a time
/// namespace makes it so) becomes ready and publishes: no `Instant` arithmetic in the agent
/// assumes the clock has run for a while.
#[test]
fn an_agent_started_seconds_after_boot_publishes() {
    let Some(setup) = Setup::begin("early") else {
        return;
    };
    if !support::require("needs unshare (util-linux)", support::have("unshare")) {
        return;
    }
    let (cluster, node) = (&setup.cluster, &setup.node);
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The namespace's clocks read about 3 s when the agent starts.
    let offset = format!("-{}", (uptime as u64).saturating_sub(3));
    let wrapper = [
        "unshare",
        "--time",
        "--fork",
        "--kill-child",
        "--monotonic",
        &offset,
        "--boottime",
        &offset,
        "--",
    ];
    let binary = crashy().to_str().unwrap();
    let agent = Agent::start_publishing_wrapped(
        setup.test.state.path(),
        node,
        &cluster.kubeconfig,
        &["--binary", binary],
        &wrapper,
    );
    crash("null");
    wait_for_reports(cluster, node, "the crash", |r| {
        find(r, "Segfault").map(count) == Some(1)
    });
    drop(agent);
}
