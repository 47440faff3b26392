//! Issue 18 on the real one-node cluster (`scripts/cluster.sh`), through the chart with its
//! admission policies: the agent pod's `ProcessHung` condition on a real hung task, across an
//! agent pod restart; and the escalation up to the point of the reboot order in dry run and
//! pause, with the budget holding back a second node. The agent runs without
//! `agent.allowReboot`, and no order is ever given live: this machine is never rebooted.
//!
//! Needs what `real_node.rs` needs (root, FUSE, qemu-nbd, the node's packages, the tools of
//! `scripts/control-plane-tools.sh`, the images of `scripts/images.sh` in `CRASHWATCH_IMAGES`
//! or built here). Only one node runs per machine: when another test holds the node's lock,
//! this one waits and retries. Under `CI=true` anything missing fails.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::stuck::{StuckReader, require_nbd_lab};
use support::{have, require, wait_until};

const NAMESPACE: &str = "crashwatch";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn script(args: &[&str]) -> Output {
    Command::new(repo().join("scripts").join(args[0]))
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]))
}

/// The real node; `cluster.sh down` when dropped, whatever happened.
struct Node {
    dir: tempfile::TempDir,
    bin: PathBuf,
    name: String,
}

impl Node {
    /// Brings the node up, waiting (up to 30 minutes) while another test holds it.
    fn up(images: &Path) -> Node {
        let bin = PathBuf::from(
            String::from_utf8(script(&["control-plane-tools.sh"]).stdout)
                .unwrap()
                .lines()
                .last()
                .unwrap_or_default(),
        );
        let dir = tempfile::Builder::new()
            .prefix("crashwatch-node18.")
            .tempdir()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let up = script(&["cluster.sh", "up", dir.path().to_str().unwrap()]);
            if up.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&up.stderr).into_owned();
            assert!(
                err.contains("lock") && Instant::now() < deadline,
                "cluster.sh up: {err}"
            );
            eprintln!("the node is in use by another test; retrying in 20 s");
            std::thread::sleep(Duration::from_secs(20));
        }
        let node = Node {
            name: fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
                .to_owned(),
            dir,
            bin,
        };
        let dir = node.dir.path().to_str().unwrap().to_owned();
        let agent = images.join("crashwatch-agent.tar");
        let operator = images.join("crashwatch-operator.tar");
        let loaded = script(&[
            "cluster.sh",
            "load",
            &dir,
            agent.to_str().unwrap(),
            operator.to_str().unwrap(),
        ]);
        assert!(
            loaded.status.success(),
            "cluster.sh load: {}",
            String::from_utf8_lossy(&loaded.stderr)
        );
        node
    }

    fn tool(&self, tool: &str, args: &[&str]) -> String {
        let output = Command::new(self.bin.join(tool))
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.tool("kubectl", &args)).unwrap()
    }

    fn apply(&self, manifest: Value) {
        let file = self.dir.path().join("manifest.json");
        fs::write(&file, manifest.to_string()).unwrap();
        self.tool(
            "kubectl",
            &["apply", "--server-side", "-f", file.to_str().unwrap()],
        );
    }

    fn condition(&self, type_: &str) -> Option<Value> {
        self.json(&["get", "node", &self.name])["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }

    fn wait_condition(&self, type_: &str, status: &str) -> Value {
        wait_until(
            &format!("{type_}={status}"),
            Duration::from_secs(120),
            || self.condition(type_).is_some_and(|c| c["status"] == status),
        );
        self.condition(type_).unwrap()
    }

    /// The name of the one Ready agent pod.
    fn ready_agent(&self) -> String {
        let mut found = None;
        wait_until("one Ready agent pod", Duration::from_secs(180), || {
            let pods = self.json(&[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                "app.kubernetes.io/component=agent",
            ]);
            found = match pods["items"].as_array().map(Vec::as_slice) {
                Some([pod])
                    if pod["metadata"]["deletionTimestamp"].is_null()
                        && pod["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        }) =>
                {
                    pod["metadata"]["name"].as_str().map(str::to_owned)
                }
                _ => None,
            };
            found.is_some()
        });
        found.unwrap()
    }

    fn policy_entry(&self, policy: &str, node: &str) -> (String, String) {
        let policy = self.json(&["get", "remediationpolicy", policy]);
        policy["status"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == node)
            .map(|n| {
                (
                    n["state"].as_str().unwrap_or_default().to_owned(),
                    n["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .unwrap_or_default()
    }

    fn wait_entry(&self, policy: &str, node: &str, state: &str, reason: &str) {
        wait_until(
            &format!("{node}: {state} {reason}"),
            Duration::from_secs(120),
            || {
                let (s, r) = self.policy_entry(policy, node);
                s == state && r.starts_with(reason)
            },
        );
    }

    fn order(&self) -> Option<String> {
        self.json(&["get", "node", &self.name])["metadata"]["annotations"]
            ["crashwatch.dev/reboot-order"]
            .as_str()
            .map(str::to_owned)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let down = script(&["cluster.sh", "down", self.dir.path().to_str().unwrap()]);
        if !down.status.success() {
            eprintln!("cluster.sh down: {}", String::from_utf8_lossy(&down.stderr));
        }
    }
}

fn images() -> PathBuf {
    if let Some(dir) = std::env::var_os("CRASHWATCH_IMAGES") {
        return PathBuf::from(dir);
    }
    let dir = std::env::temp_dir().join(format!("crashwatch-images-{}", std::process::id()));
    let built = script(&["images.sh", dir.to_str().unwrap()]);
    assert!(
        built.status.success(),
        "images.sh: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    dir
}

/// Sends SIGCONT to the qemu-nbd serving `stuck`, found by its socket in its command line.
fn continue_server(stuck: &StuckReader) {
    let socket = stuck.path("nbd.sock");
    let socket = socket.to_str().unwrap();
    let mut found = false;
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-nbd\0") && cmdline.contains(socket) {
            support::stuck::signal(pid, libc::SIGCONT);
            found = true;
        }
    }
    assert!(found, "no qemu-nbd serving {socket}");
}

#[test]
fn conditions_through_a_real_agent_pod_and_the_escalation_up_to_the_order() {
    let _kernel = support::kernel_lock();
    if !(require_nbd_lab()
        && require(
            "needs containerd, runc, ctr and the CNI bridge plugin (scripts/install-test-deps.sh)",
            have("containerd")
                && have("runc")
                && have("ctr")
                && Path::new("/usr/lib/cni/bridge").exists(),
        ))
    {
        return;
    }
    let state_dir_existed = Path::new("/var/lib/crashwatch").exists();
    let images = images();
    let node = Node::up(&images);
    let chart = repo().join("charts/crashwatch");
    node.tool(
        "helm",
        &[
            "install",
            "crashwatch",
            chart.to_str().unwrap(),
            "-n",
            NAMESPACE,
            "--create-namespace",
            "--wait",
            "--set",
            "admissionPolicy.enabled=true,agent.hangThresholdSeconds=2,agent.nodeConditions.heartbeatSeconds=2",
        ],
    );
    let agent = node.ready_agent();

    // 1. Condition semantics through the real agent pod, with its bound token and the
    //    chart's admission policy in force.
    let hung_false = node.wait_condition("ProcessHung", "False");
    assert_eq!(hung_false["reason"], "NoProcessHung");
    let stuck = StuckReader::start();
    let pid = stuck.reader_pid();
    let hung = node.wait_condition("ProcessHung", "True");
    assert_eq!(hung["reason"], "QemuNbdHung", "{hung}");
    assert!(
        hung["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("qemu-nbd pid {pid} tid {pid}: D for ")),
        "{hung}"
    );
    let since = hung["lastTransitionTime"].as_str().unwrap().to_owned();
    // A restart of the agent pod: derived again, neither reset nor re-dated.
    node.tool(
        "kubectl",
        &["delete", "pod", "-n", NAMESPACE, &agent, "--wait=true"],
    );
    let restarted_at = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let new_agent = node.ready_agent();
    assert_ne!(new_agent, agent);
    wait_until(
        "a heartbeat of the new agent pod",
        Duration::from_secs(120),
        || {
            node.condition("ProcessHung").is_some_and(|c| {
                c["lastHeartbeatTime"].as_str().unwrap_or_default() > restarted_at.as_str()
            })
        },
    );
    let after = node.condition("ProcessHung").unwrap();
    assert_eq!(after["status"], "True", "{after}");
    assert_eq!(after["lastTransitionTime"], since.as_str(), "{after}");
    // The server continues: the kernel frees the reader. (The StuckReader itself is dropped
    // after the chart is gone: the restarted agent container holds a copy of its FUSE mount,
    // so nbdfuse cannot exit while that container runs.)
    continue_server(&stuck);
    let cleared = node.wait_condition("ProcessHung", "False");
    assert_eq!(cleared["reason"], "NoProcessHung");
    let ready = node.condition("Ready").unwrap();
    assert_eq!(ready["status"], "True", "the kubelet's Ready is untouched");

    // 2. The escalation up to the order. A pod held by a finalizer stays after its eviction,
    //    as a pod stuck in D does: the drain times out. A second Node (an API object) with a
    //    matching report is held back by the budget.
    let second = format!("{}-second", node.name);
    node.apply(json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop18"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": second,
            "labels": {"crashwatch.dev/escalation-test": "yes"}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "keep", "namespace": "shop18",
            "labels": {"app": "keep"}, "finalizers": ["crashwatch.dev/test-hold"],
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "keep",
                                 "uid": "keep-uid", "controller": true}]},
         "spec": {"nodeName": node.name, "terminationGracePeriodSeconds": 0,
                  "containers": [{"name": "c", "image": "registry.invalid/keep:1",
                                  "imagePullPolicy": "Never"}]}},
    ]}));
    node.tool(
        "kubectl",
        &[
            "label",
            "node",
            &node.name,
            "crashwatch.dev/escalation-test=yes",
            "--overwrite",
        ],
    );
    let report = format!("{second}.hungtask.0000000000000001");
    node.apply(
        json!({"apiVersion": "crashwatch.dev/v1alpha1", "kind": "CrashReport",
        "metadata": {"name": report},
        "spec": {"nodeName": second, "kind": "HungTask", "comm": "qemu-nbd"}}),
    );
    let now = jiff::Timestamp::now();
    let mut buckets = Vec::new();
    crds::report::add_to_buckets(&mut buckets, now);
    let status_file = node.dir.path().join("status.json");
    fs::write(
        &status_file,
        json!({"status": {"count": 1, "firstSeen": now.to_string(), "lastSeen": now.to_string(),
                          "recent": [{"time": now.to_string()}], "buckets": buckets}})
        .to_string(),
    )
    .unwrap();
    node.tool(
        "kubectl",
        &[
            "patch",
            "crashreport",
            &report,
            "--subresource=status",
            "--type=merge",
            "--patch-file",
            status_file.to_str().unwrap(),
        ],
    );
    let policy = "escalation18";
    node.apply(
        json!({"apiVersion": "crashwatch.dev/v1alpha1", "kind": "RemediationPolicy",
        "metadata": {"name": policy},
        "spec": {
            "match": {"processNames": ["qemu-nbd"], "kinds": ["HungTask"],
                      "nodeSelector": {"matchLabels": {"crashwatch.dev/escalation-test": "yes"}}},
            "threshold": {"count": 1, "window": "1h"},
            "action": "Drain",
            "drain": {"timeout": "5s"},
            "safety": {"maxUnavailable": 1, "cooldown": "0s"},
            "escalation": {"reboot": {}},
        }}),
    );
    // The real node goes first (more occurrences, then by name) and is cordoned: the budget
    // holds the second one back. It is checked at once and then removed: a Node without a
    // kubelet turns NotReady after the node monitor's grace period, and would then cost no
    // budget.
    node.wait_entry(policy, &second, "Blocked", "budget:");
    node.tool("kubectl", &["delete", "node", &second]);
    node.tool("kubectl", &["delete", "crashreport", &report]);
    // The hang has cleared (ProcessHung False): the drain times out and nothing is ordered.
    node.wait_entry(policy, &node.name, "Blocked", "timeout:");
    assert_eq!(node.order(), None);
    // Dry run with the hang back: it would reboot, and orders nothing.
    node.tool(
        "kubectl",
        &[
            "patch",
            "remediationpolicy",
            policy,
            "--type=merge",
            "-p",
            r#"{"spec":{"safety":{"dryRun":true}}}"#,
        ],
    );
    let stuck_again = StuckReader::start();
    node.wait_condition("ProcessHung", "True");
    node.wait_entry(policy, &node.name, "WouldAct", "would reboot:");
    assert_eq!(node.order(), None);
    // Paused: held back, nothing ordered.
    node.tool(
        "kubectl",
        &[
            "patch",
            "remediationpolicy",
            policy,
            "--type=merge",
            "-p",
            r#"{"spec":{"safety":{"dryRun":false,"paused":true}}}"#,
        ],
    );
    node.wait_entry(policy, &node.name, "Blocked", "paused");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(node.order(), None, "no order while paused");
    node.tool("kubectl", &["delete", "remediationpolicy", policy]);
    node.tool(
        "kubectl",
        &[
            "patch",
            "pod",
            "keep",
            "-n",
            "shop18",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
    );
    continue_server(&stuck_again);
    node.tool(
        "helm",
        &["uninstall", "crashwatch", "-n", NAMESPACE, "--wait"],
    );
    drop(stuck_again);
    drop(stuck);
    drop(node);
    if !state_dir_existed {
        let _ = fs::remove_dir_all("/var/lib/crashwatch");
    }
}
