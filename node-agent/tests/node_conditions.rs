//! The agent's own Node conditions (issue 18, item 1) against the real kube-apiserver: the
//! contract (types, reasons, message format), their semantics with a real thread stuck in
//! `D` across an agent restart, and the chart's admission policy with real bound tokens.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use node_agent::conditions::{
    self, BOOT_ID_ANNOTATION, CONDITION_TYPES, HungThread, NBD_DEVICE_ERROR, PROCESS_HUNG,
};
use serde_json::Value;
use support::stuck::{StuckReader, require_nbd_lab};
use support::{Agent, ControlPlane, KernelTest, start_at_the_end_of_the_log, wait_until};

/// The contract as documented in the README ("Node conditions"): written out here by hand,
/// so that a change to the code that breaks it fails.
#[test]
fn the_condition_contract_is_the_documented_one() {
    assert_eq!(CONDITION_TYPES, ["ProcessHung", "NbdDeviceError"]);
    let thread = |comm: &str, nbd: &[&str]| HungThread {
        pid: 4242,
        tid: 4243,
        comm: comm.into(),
        blocked_seconds: 130,
        wchan: Some("nbd_queue_rq".into()),
        nbd_devices: nbd.iter().map(|d| (*d).to_owned()).collect(),
    };
    let hung = conditions::process_hung(&[thread("qemu-nbd", &[])]);
    assert_eq!(
        (hung.type_, hung.status, hung.reason, hung.message.as_str()),
        (
            "ProcessHung",
            true,
            "QemuNbdHung",
            "qemu-nbd pid 4242 tid 4243: D for 130s, wchan nbd_queue_rq"
        )
    );
    let client = conditions::process_hung(&[thread("dd", &["nbd0", "nbd3"])]);
    assert_eq!(client.reason, "NbdClientHung");
    assert_eq!(
        client.message,
        "dd pid 4242 tid 4243: D for 130s, wchan nbd_queue_rq, holds nbd0,nbd3"
    );
    assert_eq!(
        conditions::process_hung(&[thread("dd", &[])]).reason,
        "WatchedProcessHung"
    );
    let none = conditions::process_hung(&[]);
    assert_eq!((none.status, none.reason), (false, "NoProcessHung"));

    let mut nbd = conditions::NbdErrors::new();
    nbd.note("nbd0", "the server did not answer in time", 5_000_000);
    let set = nbd.condition(7_000_000, Duration::from_secs(600));
    assert_eq!(
        (set.type_, set.status, set.reason, set.message.as_str()),
        (
            "NbdDeviceError",
            true,
            "NbdErrorsLogged",
            "nbd0: 1 errors, last 2s ago: the server did not answer in time"
        )
    );
    let cleared = nbd.condition(700_000_000, Duration::from_secs(600));
    assert_eq!((cleared.status, cleared.reason), (false, "NoNbdErrors"));
    assert_eq!(BOOT_ID_ANNOTATION, "crashwatch.dev/boot-id");
}

fn condition(cluster: &ControlPlane, node: &str, type_: &str) -> Option<Value> {
    let text = cluster.kubectl(&["get", "node", node, "-o", "json"]);
    let node: Value = serde_json::from_str(&text).unwrap();
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn field<'a>(c: &'a Value, name: &str) -> &'a str {
    c[name].as_str().unwrap_or("")
}

/// A real reader stuck in `D` on a stopped qemu-nbd (through nbdfuse): the agent sets
/// `ProcessHung` True with its pid and wchan, keeps it True with the same transition time
/// across a SIGKILL restart while the heartbeat moves, and sets it False when the reader is
/// freed. The kubelet's `Ready` condition, written by another manager, is left alone.
#[test]
fn a_stuck_reader_sets_process_hung_which_survives_a_restart_and_clears_when_freed() {
    let Some(test) = KernelTest::begin() else {
        return;
    };
    if !require_nbd_lab() {
        return;
    }
    let Some(cluster) = ControlPlane::get() else {
        return;
    };
    cluster.install_crds();
    start_at_the_end_of_the_log(test.state.path());
    let node = format!("cond-{}", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.json");
    std::fs::write(
        &file,
        format!(r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}"}}}}"#),
    )
    .unwrap();
    cluster.kubectl(&["create", "-f", file.to_str().unwrap()]);
    // The kubelet's Ready, as another field manager.
    let ready = dir.path().join("ready.json");
    std::fs::write(
        &ready,
        format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}"}},"status":{{"conditions":[
              {{"type":"Ready","status":"True","reason":"KubeletReady","message":"kubelet is posting ready status",
                "lastHeartbeatTime":"2026-11-30T10:00:00Z","lastTransitionTime":"2026-11-30T10:00:00Z"}}]}}}}"#
        ),
    )
    .unwrap();
    cluster.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=kubelet",
        "--subresource=status",
        "-f",
        ready.to_str().unwrap(),
    ]);

    let args = &["--hang-threshold", "2", "--condition-heartbeat", "1"];
    let state = test.state.path();
    let agent = Agent::start_publishing(state, &node, &cluster.kubeconfig, args);
    wait_until(
        "ProcessHung False at start",
        Duration::from_secs(30),
        || condition(&cluster, &node, PROCESS_HUNG).is_some_and(|c| c["status"] == "False"),
    );
    let nbd = condition(&cluster, &node, NBD_DEVICE_ERROR).expect("NbdDeviceError written");
    assert_eq!(field(&nbd, "reason"), "NoNbdErrors", "{nbd}");

    let stuck = StuckReader::start();
    let pid = stuck.reader_pid();
    wait_until("ProcessHung True", Duration::from_secs(60), || {
        condition(&cluster, &node, PROCESS_HUNG).is_some_and(|c| c["status"] == "True")
    });
    let hung = condition(&cluster, &node, PROCESS_HUNG).unwrap();
    assert_eq!(field(&hung, "reason"), "QemuNbdHung", "{hung}");
    let message = field(&hung, "message");
    assert!(
        message.starts_with(&format!("qemu-nbd pid {pid} tid {pid}: D for ")),
        "{message}"
    );
    assert!(message.contains(", wchan "), "{message}");
    // kill -9 does not free it.
    support::stuck::signal(pid, libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(1));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(stat.rsplit_once(") ").unwrap().1.starts_with('D'), "{stat}");
    let since = field(&hung, "lastTransitionTime").to_owned();
    let beat = field(&hung, "lastHeartbeatTime").to_owned();
    wait_until("the heartbeat to move", Duration::from_secs(15), || {
        condition(&cluster, &node, PROCESS_HUNG)
            .is_some_and(|c| field(&c, "lastHeartbeatTime") > beat.as_str())
    });

    // A restart (SIGKILL, as an OOM kill or a node-pressure eviction): derived again from
    // /proc, neither reset to False nor re-dated.
    agent.kill();
    let restarted_at = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    std::thread::sleep(Duration::from_secs(2));
    let agent = Agent::start_publishing(state, &node, &cluster.kubeconfig, args);
    wait_until(
        "a heartbeat from the restarted agent",
        Duration::from_secs(30),
        || {
            condition(&cluster, &node, PROCESS_HUNG)
                .is_some_and(|c| field(&c, "lastHeartbeatTime") > restarted_at.as_str())
        },
    );
    let after = condition(&cluster, &node, PROCESS_HUNG).unwrap();
    assert_eq!(field(&after, "status"), "True", "{after}");
    assert_eq!(field(&after, "lastTransitionTime"), since, "{after}");
    let transitions = agent.labelled(
        "crashwatch_node_condition_transitions_total",
        "type",
        "ProcessHung",
    );
    assert_eq!(
        transitions, 0.0,
        "the restarted agent wrote no transition of ProcessHung"
    );

    // Freed by its kernel (the server continues): False.
    drop(stuck);
    wait_until("ProcessHung False again", Duration::from_secs(30), || {
        condition(&cluster, &node, PROCESS_HUNG).is_some_and(|c| c["status"] == "False")
    });
    let cleared = condition(&cluster, &node, PROCESS_HUNG).unwrap();
    assert_eq!(field(&cleared, "reason"), "NoProcessHung");
    assert!(field(&cleared, "lastTransitionTime") >= restarted_at.as_str());
    assert_eq!(
        agent.labelled(
            "crashwatch_node_condition_transitions_total",
            "status",
            "False"
        ),
        1.0
    );

    let ready = condition(&cluster, &node, "Ready").expect("Ready kept");
    assert_eq!(
        (field(&ready, "status"), field(&ready, "reason")),
        ("True", "KubeletReady")
    );
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let annotation = cluster.kubectl(&[
        "get",
        "node",
        &node,
        "-o",
        "jsonpath={.metadata.annotations.crashwatch\\.dev/boot-id}",
    ]);
    assert_eq!(annotation, boot_id.trim());
    agent.stop();
    cluster.kubectl(&["delete", "node", &node]);
}

fn chart() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/crashwatch")
}

/// kubectl with `token` instead of the admin's credentials.
fn as_token(cluster: &ControlPlane, token: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(cluster.bin.join("kubectl"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .arg("--token")
        .arg(token)
        .args(args)
        .output()
        .expect("kubectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A server-side apply of `status` (and `annotations`) on `node`'s status as `token`.
fn apply_status(
    cluster: &ControlPlane,
    token: &str,
    node: &str,
    annotations: &str,
    status: &str,
) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apply.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}","annotations":{{{annotations}}}}},"status":{status}}}"#
        ),
    )
    .unwrap();
    as_token(
        cluster,
        token,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=crashwatch-agent-conditions",
            "--subresource=status",
            "-f",
            file.to_str().unwrap(),
        ],
    )
}

fn condition_json(type_: &str, status: &str, reason: &str) -> String {
    format!(
        r#"{{"type":"{type_}","status":"{status}","reason":"{reason}","message":"m",
            "lastHeartbeatTime":"2026-11-30T20:00:00Z","lastTransitionTime":"2026-11-30T20:00:00Z"}}"#
    )
}

/// With the chart's admission policy and real bound tokens for the agents of nodes A and B:
/// A may apply its own condition types and boot id on A's status; every write to B, to
/// another condition type (Ready), to a reason outside the contract, to another status
/// field, label or annotation is refused with a clear message.
#[test]
fn the_admission_policy_lets_the_agent_write_only_its_own_conditions_on_its_own_node() {
    let Some(cluster) = ControlPlane::get() else {
        return;
    };
    cluster.install_crds();
    let suffix = std::process::id();
    let namespace = format!("cw-cond-{suffix}");
    let release = format!("cc{suffix}");
    cluster.kubectl(&["create", "namespace", &namespace]);
    let helm = Command::new(cluster.bin.join("helm"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .args(["install", &release])
        .arg(chart())
        .args(["-n", &namespace, "--set", "admissionPolicy.enabled=true"])
        .output()
        .unwrap();
    assert!(
        helm.status.success(),
        "{}",
        String::from_utf8_lossy(&helm.stderr)
    );
    let account = format!("{release}-crashwatch-agent");
    let (node_a, node_b) = (format!("cond-a-{suffix}"), format!("cond-b-{suffix}"));
    let dir = tempfile::tempdir().unwrap();
    for node in [&node_a, &node_b] {
        let file = dir.path().join(format!("{node}.json"));
        std::fs::write(
            &file,
            format!(
                r#"{{"apiVersion":"v1","kind":"List","items":[
                  {{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}","labels":{{"zone":"z1"}},"annotations":{{"keep":"me"}}}}}},
                  {{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"agent-{node}","namespace":"{namespace}"}},
                    "spec":{{"nodeName":"{node}","serviceAccountName":"{account}","terminationGracePeriodSeconds":0,
                             "containers":[{{"name":"agent","image":"agent"}}]}}}}]}}"#
            ),
        )
        .unwrap();
        cluster.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    }
    let token = cluster
        .kubectl(&[
            "create",
            "token",
            &account,
            "-n",
            &namespace,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &format!("agent-{node_a}"),
        ])
        .trim()
        .to_owned();
    // The kubelet's Ready on A, by another manager.
    let ready = dir.path().join("ready.json");
    std::fs::write(
        &ready,
        format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node_a}"}},"status":{{"conditions":[{}]}}}}"#,
            condition_json("Ready", "True", "KubeletReady")
        ),
    )
    .unwrap();
    cluster.kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=kubelet",
        "--subresource=status",
        "-f",
        ready.to_str().unwrap(),
    ]);

    let own = format!(
        r#"{{"conditions":[{},{}]}}"#,
        condition_json("ProcessHung", "True", "QemuNbdHung"),
        condition_json("NbdDeviceError", "False", "NoNbdErrors")
    );
    let boot = r#""crashwatch.dev/boot-id":"b1""#;
    let (allowed, text) = apply_status(&cluster, &token, &node_a, boot, &own);
    assert!(allowed, "A's own conditions on A: {text}");
    let written = condition(&cluster, &node_a, "ProcessHung").unwrap();
    assert_eq!(field(&written, "reason"), "QemuNbdHung");
    let ready = condition(&cluster, &node_a, "Ready").unwrap();
    assert_eq!(field(&ready, "reason"), "KubeletReady", "Ready kept");

    let refused = |what: &str, (allowed, text): (bool, String), expected: &str| {
        assert!(!allowed, "{what} was allowed: {text}");
        assert!(text.contains(expected), "{what}: {text}");
    };
    refused(
        "A's conditions on B",
        apply_status(&cluster, &token, &node_b, boot, &own),
        &format!("may not write the status of Node \"{node_b}\""),
    );
    refused(
        "A's Ready",
        apply_status(
            &cluster,
            &token,
            &node_a,
            "",
            &format!(
                r#"{{"conditions":[{}]}}"#,
                condition_json("Ready", "False", "KubeletNotReady")
            ),
        ),
        "may write only the conditions ProcessHung, NbdDeviceError",
    );
    refused(
        "a reason outside the contract",
        apply_status(
            &cluster,
            &token,
            &node_a,
            "",
            &format!(
                r#"{{"conditions":[{}]}}"#,
                condition_json("ProcessHung", "True", "AllFine")
            ),
        ),
        "may use only the reasons",
    );
    refused(
        "another status field",
        apply_status(
            &cluster,
            &token,
            &node_a,
            "",
            r#"{"capacity":{"cpu":"1000"}}"#,
        ),
        "may change no status field but its own conditions",
    );
    refused(
        "another annotation",
        apply_status(&cluster, &token, &node_a, r#""keep":"changed""#, r#"{}"#),
        "may change no label or annotation but crashwatch.dev/boot-id",
    );
    refused(
        "the operator's reboot order",
        apply_status(
            &cluster,
            &token,
            &node_a,
            r#""crashwatch.dev/reboot-order":"{}""#,
            r#"{}"#,
        ),
        "may change no label or annotation but crashwatch.dev/boot-id",
    );
    let labels = cluster.kubectl(&[
        "get",
        "node",
        &node_a,
        "-o",
        "jsonpath={.metadata.labels.zone}",
    ]);
    assert_eq!(labels, "z1");

    let _ = Command::new(cluster.bin.join("helm"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .args(["uninstall", &release, "-n", &namespace])
        .output();
    for node in [&node_a, &node_b] {
        cluster.kubectl(&["delete", "node", node]);
    }
    cluster.kubectl(&["delete", "namespace", &namespace, "--wait=false"]);
}
