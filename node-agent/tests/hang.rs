//! Real hung tasks: qemu-nbd serves a disk on a unix socket, nbdfuse turns it into a FUSE
//! file, qemu-nbd is stopped, and an O_DIRECT reader of that file (a copy of dd named
//! `qemu-nbd`, the process the agent watches by default) sleeps uninterruptibly and cannot
//! be killed until qemu-nbd continues. See the kernel fault lab, recipe 1.
//!
//! Needs root, FUSE, qemu-nbd and nbdfuse. Every test restores the hung-task sysctls and
//! continues qemu-nbd before tearing anything down, also when it fails.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use crds::{DetectedBy, EventKind};
use support::stuck::{StuckReader, require_nbd_lab};
use support::{Agent, ControlPlane, Sysctl, kernel_lock, reports_of, wait_until};

/// The common start of a hang test: the kernel lock, the requirements, and hung-task
/// detection after 2 s, checked every second, with `warnings` reports printed; restored when
/// dropped. A test's `StuckReader` is declared later, so it is continued before this goes.
struct HangTest {
    state: tempfile::TempDir,
    _sysctls: [Sysctl; 3],
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl HangTest {
    fn begin(warnings: &str) -> Option<HangTest> {
        let lock = kernel_lock();
        if !require_nbd_lab() {
            return None;
        }
        Some(HangTest {
            state: tempfile::tempdir().unwrap(),
            _sysctls: [
                Sysctl::set("kernel/hung_task_timeout_secs", "2"),
                Sysctl::set("kernel/hung_task_check_interval_secs", "1"),
                Sysctl::set("kernel/hung_task_warnings", warnings),
            ],
            _lock: lock,
        })
    }
}

#[test]
fn a_hung_qemu_nbd_reported_by_the_kernel_is_one_event() {
    let Some(test) = HangTest::begin("-1") else {
        return;
    };
    let state = &test.state;
    // A long threshold keeps the /proc watcher out of this test: the kernel must report it.
    let mut agent = Agent::start(state.path(), &["--hang-threshold", "600"]);
    let stuck = StuckReader::start();
    let pid = stuck.reader_pid();
    let event = agent.wait_for("a HungTask from the kernel", Duration::from_secs(20), |e| {
        e.kind == EventKind::HungTask && e.pid == Some(pid)
    });
    assert_eq!(event.comm.as_deref(), Some("qemu-nbd"));
    assert_eq!(event.detected_by, Some(DetectedBy::KernelReport));
    assert!(event.blocked_seconds.unwrap() >= 2, "{event:?}");
    assert!(
        event
            .kernel_stack
            .iter()
            .any(|f| f.starts_with("fuse_direct_IO")),
        "stack: {:?}",
        event.kernel_stack
    );
    assert!(
        event
            .raw
            .iter()
            .any(|l| l.starts_with("INFO: task qemu-nbd:")),
        "{:?}",
        event.raw
    );
    // The kernel repeats the report every second; it is still one stuck episode.
    agent.drain_for(Duration::from_secs(3));
    assert_eq!(hung_task_events(&agent, pid), 1, "one episode, one event");
    drop(stuck);
    // The ring may still hold reports of earlier episodes; the counter must agree with
    // exactly the events printed.
    let printed = agent
        .seen
        .iter()
        .filter(|e| e.kind == EventKind::HungTask && e.comm.as_deref() == Some("qemu-nbd"))
        .count();
    let counted = agent.process_counter("crashwatch_hung_tasks_total", "qemu-nbd");
    assert_eq!(counted, printed as f64);
}

/// How many HungTask events the agent printed for thread `pid`.
fn hung_task_events(agent: &Agent, pid: u32) -> usize {
    agent
        .seen
        .iter()
        .filter(|e| e.kind == EventKind::HungTask && e.pid == Some(pid))
        .count()
}

#[test]
fn with_kernel_reports_off_the_proc_watcher_reports_the_hang_once() {
    // hung_task_warnings=0: the kernel detects but prints nothing.
    let Some(test) = HangTest::begin("0") else {
        return;
    };
    let state = &test.state;
    let mut agent = Agent::start(
        state.path(),
        &["--hang-threshold", "2", "--hang-scan-interval", "0.5"],
    );
    let stuck = StuckReader::start();
    let pid = stuck.reader_pid();
    let started = Instant::now();
    let event = agent.wait_for(
        "a HungTask from the /proc watcher",
        Duration::from_secs(20),
        |e| e.kind == EventKind::HungTask && e.pid == Some(pid),
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "reported before the threshold: {:?}",
        started.elapsed()
    );
    assert_eq!(event.detected_by, Some(DetectedBy::ProcScan));
    assert_eq!(event.comm.as_deref(), Some("qemu-nbd"));
    assert!(event.blocked_seconds.unwrap() >= 2, "{event:?}");
    assert_eq!(event.wchan.as_deref(), Some("fuse_direct_IO"), "{event:?}");
    assert!(
        event
            .kernel_stack
            .iter()
            .any(|f| f.starts_with("fuse_direct_IO")),
        "{event:?}"
    );
    agent.drain_for(Duration::from_secs(3));
    assert_eq!(hung_task_events(&agent, pid), 1, "one episode, one event");
}

/// The whole chain on this machine: a real hung qemu-nbd, reported by the kernel, read by
/// the real agent, published as CrashReports to the test cluster, and the real operator
/// cordoning the Node named after this machine once the policy's threshold (2 hangs) is
/// reached.
#[test]
fn two_real_qemu_nbd_hangs_cordon_this_machines_node_within_5_seconds_of_the_second() {
    let Some(test) = HangTest::begin("-1") else {
        return;
    };
    let Some(cluster) = ControlPlane::get() else {
        return;
    };
    cluster.install_crds();
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_lowercase();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let run = format!("e2e-{nanos:x}");
    // A fresh Node object and no earlier reports of it.
    cluster.kubectl(&["delete", "node", &node, "--ignore-not-found"]);
    for report in reports_of(&cluster, &node) {
        let name = report["metadata"]["name"].as_str().unwrap();
        cluster.kubectl(&["delete", "crashreport", name]);
    }
    let objects = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node",
         "metadata": {"name": node, "labels": {"crashwatch.dev/test": run}}},
        {"apiVersion": "crashwatch.dev/v1alpha1", "kind": "RemediationPolicy",
         "metadata": {"name": run},
         "spec": {
            "match": {"processNames": ["qemu-nbd"], "kinds": ["HungTask"],
                      "nodeSelector": {"matchLabels": {"crashwatch.dev/test": run}}},
            "threshold": {"count": 2, "window": "10m"},
            "action": "Cordon",
            "safety": {"cooldown": "0s"}}},
    ]});
    let file = test.state.path().join("objects.json");
    std::fs::write(&file, objects.to_string()).unwrap();
    cluster.kubectl(&["create", "-f", file.to_str().unwrap()]);
    let cordoned = || {
        cluster.kubectl(&["get", "node", &node, "-o", "jsonpath={.spec.unschedulable}"]) == "true"
    };

    let operator_log = std::fs::File::create(test.state.path().join("operator.log")).unwrap();
    let mut operator = std::process::Command::new(testkit::workspace_binary("crashwatch-operator"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .args(["run", "--metrics-addr", "127.0.0.1:0", "--lease-name", &run])
        .stdout(Stdio::null())
        .stderr(operator_log)
        .spawn()
        .expect("start crashwatch-operator");
    let hang_reports = || -> u64 {
        reports_of(&cluster, &node)
            .iter()
            .filter(|r| r["spec"]["kind"] == "HungTask")
            .map(|r| r["status"]["count"].as_u64().unwrap_or(0))
            .sum()
    };
    support::start_at_the_end_of_the_log(test.state.path());
    let agent = Agent::start_publishing(
        test.state.path(),
        &node,
        &cluster.kubeconfig,
        &["--hang-threshold", "600"],
    );

    let first = StuckReader::start();
    wait_until(
        "the first hang's CrashReport",
        Duration::from_secs(30),
        || hang_reports() == 1,
    );
    drop(first);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!cordoned(), "one hang is below the threshold");

    let second = StuckReader::start();
    let blocked = Instant::now();
    wait_until("the cordon", Duration::from_secs(30), cordoned);
    let to_cordon = blocked.elapsed();
    drop(second);
    let detectable_after = Duration::from_secs(2); // hung_task_timeout_secs
    eprintln!(
        "hang-to-cordon: {to_cordon:?} after the reader blocked, {:?} after the kernel could first report it",
        to_cordon.saturating_sub(detectable_after)
    );
    assert_eq!(hang_reports(), 2);
    assert!(
        to_cordon <= detectable_after + Duration::from_secs(1) + Duration::from_secs(5),
        "hang-to-cordon took {to_cordon:?}: more than 5 s after the kernel's check (every 1 s) could report it"
    );
    let _ = operator.kill();
    let _ = operator.wait();
    drop(agent);
    cluster.kubectl(&["delete", "remediationpolicy", &run]);
}

/// A rollout during a hang: the agent that reported a `/proc`-found hang is restarted while
/// the thread is still stuck, and the CrashReport's count stays 1.
#[test]
fn an_agent_restarted_during_an_ongoing_hang_counts_it_once() {
    // hung_task_warnings=0: the kernel prints nothing, only the /proc watcher reports.
    let Some(test) = HangTest::begin("0") else {
        return;
    };
    let Some(cluster) = ControlPlane::get() else {
        return;
    };
    cluster.install_crds();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let node = format!("hang-restart-{}-{nanos}", std::process::id());
    let args = ["--hang-threshold", "2", "--hang-scan-interval", "0.5"];
    support::start_at_the_end_of_the_log(test.state.path());
    let agent = Agent::start_publishing(test.state.path(), &node, &cluster.kubeconfig, &args);
    let stuck = StuckReader::start();
    let pid = stuck.reader_pid();
    let hang_counts = || -> Vec<u64> {
        reports_of(&cluster, &node)
            .iter()
            .filter(|r| r["spec"]["kind"] == "HungTask" && r["spec"]["pid"] == pid)
            .map(|r| r["status"]["count"].as_u64().unwrap_or(0))
            .collect()
    };
    wait_until("the hang's CrashReport", Duration::from_secs(30), || {
        hang_counts() == [1]
    });
    let report = reports_of(&cluster, &node);
    assert_eq!(report[0]["spec"]["detectedBy"], "procScan", "{report:#?}");

    // A rollout: the agent stops and a new one starts while the reader is still stuck.
    agent.stop();
    let agent = Agent::start_publishing(test.state.path(), &node, &cluster.kubeconfig, &args);
    // The new agent scans every 0.5 s and the threshold has long passed: had it counted
    // the episode again, it would have written within a few scans.
    std::thread::sleep(Duration::from_secs(5));
    let log = agent.log();
    assert_eq!(
        hang_counts(),
        [1],
        "one stuck episode, one occurrence:\n{log}"
    );
    assert_eq!(
        agent.process_counter("crashwatch_hung_tasks_total", "qemu-nbd"),
        0.0,
        "the new agent reported nothing:\n{log}"
    );
    drop(stuck);
    drop(agent);
}
