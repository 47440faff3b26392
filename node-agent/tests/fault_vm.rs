//! The seed's failure on the real nbd driver, end to end (issue 18): in the fault VM
//! (scripts/fault-vm.sh, Debian's 6.1 kernel under TCG), a real `qemu-nbd` serves
//! `/dev/nbd0` to a reader; the test stops the server, the reader hangs in `D` and survives
//! `kill -9`; our release agent, running inside the VM and reaching the test control plane
//! through QEMU user networking, sets `ProcessHung` and clears it when the kernel frees the
//! reader. Then the real operator escalates (drain timed out, hang still there) and orders a
//! reboot; the agent carries it out through sysrq, the test sees QMP's `guest-reset`, the VM
//! boots again, and the ledger records the reboot with the new boot id.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use serde_json::Value;
use support::{ControlPlane, have, release_binary, require, stage_release_agent, wait_until};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fault VM, running `scripts/fault-vm.sh run`; dropping it ends the script, which
/// kills qemu by its own PID.
struct Vm {
    script: Child,
    out: PathBuf,
}

impl Vm {
    fn start(out: &Path, share: &Path, scenario: &str) -> Vm {
        let script = Command::new(repo().join("scripts/fault-vm.sh"))
            .args(["run"])
            .arg(out)
            .arg(share)
            .arg(scenario)
            .env("TIMEOUT", "1200")
            .stdin(Stdio::null())
            .spawn()
            .expect("scripts/fault-vm.sh");
        Vm {
            script,
            out: out.to_owned(),
        }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.out.join("console.log")).unwrap_or_default())
            .into_owned()
    }

    /// QMP's events, once its socket is up.
    fn qmp_events(&self) -> Receiver<Value> {
        let socket = self.out.join("qmp.sock");
        wait_until("the QMP socket", Duration::from_secs(900), || {
            UnixStream::connect(&socket).is_ok()
        });
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line)
                    && value.get("event").is_some()
                    && tx.send(value).is_err()
                {
                    break;
                }
            }
        });
        rx
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.script.id() as i32, libc::SIGTERM) };
        let _ = self.script.wait();
    }
}

fn condition(cluster: &ControlPlane, node: &str, type_: &str) -> Option<Value> {
    let node: Value =
        serde_json::from_str(&cluster.kubectl(&["get", "node", node, "-o", "json"])).ok()?;
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn annotation(cluster: &ControlPlane, node: &str, key: &str) -> Option<String> {
    let node: Value =
        serde_json::from_str(&cluster.kubectl(&["get", "node", node, "-o", "json"])).ok()?;
    node["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_owned)
}

fn wait_condition(cluster: &ControlPlane, node: &str, type_: &str, status: &str, within: u64) {
    wait_until(
        &format!("{type_}={status} on {node}"),
        Duration::from_secs(within),
        || condition(cluster, node, type_).is_some_and(|c| c["status"] == status),
    );
}

/// The state letter of a `/proc/PID/stat` line.
fn state(stat: &str) -> char {
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .unwrap_or('?')
}

/// A kubeconfig for the guest: the API server at the host's loopback as QEMU user networking
/// shows it (10.0.2.2), checked against the name in its certificate.
fn guest_kubeconfig(cluster: &ControlPlane, share: &Path) {
    let host = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
    let server = host
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap();
    let port = server.rsplit_once(':').unwrap().1;
    let token = host
        .lines()
        .find_map(|l| {
            l.split_once("token: ")
                .map(|(_, t)| t.trim_end_matches('}').trim())
        })
        .unwrap();
    let ca = host
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority: "))
        .unwrap();
    std::fs::copy(ca, share.join("ca.crt")).unwrap();
    std::fs::write(
        share.join("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://10.0.2.2:{port}\n    certificate-authority: /mnt/host/ca.crt\n    tls-server-name: kubernetes\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\nusers:\n- name: admin\n  user: {{token: {token}}}\n"
        ),
    )
    .unwrap();
}

fn apply(cluster: &ControlPlane, dir: &Path, name: &str, json: &str) {
    let file = dir.join(name);
    std::fs::write(&file, json).unwrap();
    cluster.kubectl(&["apply", "-f", file.to_str().unwrap()]);
}

#[test]
fn a_stopped_qemu_nbd_hangs_its_reader_the_agent_says_so_and_a_reboot_ordered_by_the_operator_frees_the_vm()
 {
    let ok = require("needs root", unsafe { libc::geteuid() } == 0)
        && require(
            "needs qemu-system-x86_64 (scripts/install-test-deps.sh)",
            have("qemu-system-x86_64"),
        )
        && require(
            "needs busybox-static and qemu-nbd",
            have("busybox") && have("qemu-nbd"),
        )
        && require(
            "needs the release binaries (cargo build --release -p node-agent -p operator; scripts/images.sh does it)",
            release_binary("crashwatch-agent").exists()
                && release_binary("crashwatch-operator").exists(),
        );
    if !ok {
        return;
    }
    let Some(cluster) = ControlPlane::get() else {
        return;
    };
    cluster.install_crds();
    let suffix = std::process::id();
    let node = format!("fault-vm-{suffix}");
    let namespace = format!("fault-vm-{suffix}");
    let policy = format!("fault-vm-{suffix}");
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    let ctl = share.join("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    std::fs::write(ctl.join("node"), &node).unwrap();
    stage_release_agent(&share);
    guest_kubeconfig(&cluster, &share);
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fault-vm/hang-reboot.sh"),
        share.join("hang-reboot.sh"),
    )
    .unwrap();
    std::fs::File::create(share.join("disk.img"))
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    // The Node, and a Pod on it that no kubelet will ever finish evicting: the drain times
    // out, as it does on a node whose pods sit in D.
    apply(
        &cluster,
        dir.path(),
        "objects.json",
        &format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[
              {{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}","labels":{{"kubernetes.io/hostname":"{node}"}}}}}},
              {{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{namespace}"}}}},
              {{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"stuck","namespace":"{namespace}"}},
                "spec":{{"nodeName":"{node}","terminationGracePeriodSeconds":30,
                         "containers":[{{"name":"c","image":"busybox"}}]}}}}]}}"#
        ),
    );

    let touch = |name: &str| std::fs::write(ctl.join(name), "").unwrap();
    let read = |name: &str| std::fs::read_to_string(ctl.join(name)).unwrap_or_default();
    let vm = Vm::start(&dir.path().join("out"), &share, "hang-reboot.sh");
    let events = vm.qmp_events();
    wait_until(
        "the guest's nbd device and agent",
        Duration::from_secs(600),
        || ctl.join("nbd-ready").exists(),
    );
    wait_condition(&cluster, &node, "ProcessHung", "False", 300);
    let first_boot = read("boots").trim().to_owned();
    assert_eq!(
        annotation(&cluster, &node, "crashwatch.dev/boot-id").as_deref(),
        Some(first_boot.as_str()),
        "the agent states the VM's boot id"
    );

    // Stop the server: the reader hangs in D, and kill -9 does not free it.
    touch("stop");
    wait_until("the reader", Duration::from_secs(60), || {
        !read("reader.stat").is_empty()
    });
    let reader: u32 = read("reader.pid").trim().parse().unwrap();
    assert_eq!(state(&read("reader.stat")), 'D', "{}", read("reader.stat"));
    wait_condition(&cluster, &node, "ProcessHung", "True", 120);
    let hung = condition(&cluster, &node, "ProcessHung").unwrap();
    let message = hung["message"].as_str().unwrap();
    assert_eq!(hung["reason"], "NbdClientHung", "{hung}");
    assert!(
        message.starts_with(&format!("dd pid {reader} tid {reader}: D for ")),
        "{message}"
    );
    assert!(message.ends_with(", holds nbd0"), "{message}");
    touch("kill9");
    wait_until("the state after kill -9", Duration::from_secs(60), || {
        !read("reader-after-kill9.stat").is_empty()
    });
    assert_eq!(
        state(&read("reader-after-kill9.stat")),
        'D',
        "kill -9 does not free it: {}",
        read("reader-after-kill9.stat")
    );
    assert_eq!(
        condition(&cluster, &node, "ProcessHung").unwrap()["status"],
        "True"
    );

    // The server continues: the kernel completes the read, the killed reader exits.
    touch("cont");
    wait_condition(&cluster, &node, "ProcessHung", "False", 120);
    assert_eq!(
        condition(&cluster, &node, "ProcessHung").unwrap()["reason"],
        "NoProcessHung"
    );

    // Stuck again, long enough for the driver's own complaint (blk-mq's 30 s timer).
    touch("stop2");
    wait_condition(&cluster, &node, "ProcessHung", "True", 120);
    wait_condition(&cluster, &node, "NbdDeviceError", "True", 180);
    let nbd = condition(&cluster, &node, "NbdDeviceError").unwrap();
    assert!(
        nbd["message"].as_str().unwrap().starts_with("nbd0: "),
        "{nbd}"
    );

    // The agent restarts (SIGKILL) inside the VM: both conditions are derived again, from
    // /proc and from the kernel ring (its cursor is past the nbd error), neither reset nor
    // re-dated.
    let hung_since =
        condition(&cluster, &node, "ProcessHung").unwrap()["lastTransitionTime"].clone();
    // The kmsg cursor trails the records handled by at most a second: after two, it is past
    // the nbd error, and only the reread of the ring can find that error again.
    std::thread::sleep(Duration::from_secs(2));
    touch("restart-agent");
    wait_until("the agent's restart", Duration::from_secs(120), || {
        ctl.join("agent-restarted").exists()
    });
    // Only the new agent writes from now on: a heartbeat after this second is its own.
    let restarted_at = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    wait_until(
        "a heartbeat of the restarted agent",
        Duration::from_secs(300),
        || {
            condition(&cluster, &node, "NbdDeviceError").is_some_and(|c| {
                c["lastHeartbeatTime"].as_str().unwrap_or_default() > restarted_at.as_str()
            })
        },
    );
    let nbd_after = condition(&cluster, &node, "NbdDeviceError").unwrap();
    assert_eq!(nbd_after["status"], "True", "{nbd_after}");
    assert_eq!(
        nbd_after["lastTransitionTime"], nbd["lastTransitionTime"],
        "{nbd_after}"
    );
    let hung_after = condition(&cluster, &node, "ProcessHung").unwrap();
    assert_eq!(hung_after["status"], "True", "{hung_after}");
    assert_eq!(hung_after["lastTransitionTime"], hung_since, "{hung_after}");

    // The operator: drain, the drain times out with the hang still there, reboot.
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_owned();
    let mut operator = Command::new(release_binary("crashwatch-operator"))
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .args(["run", "--metrics-addr", "127.0.0.1:0"])
        .args(["--lease-namespace", "default"])
        .args(["--lease-name", &format!("fault-vm-{suffix}")])
        .args(["--identity", "fault-vm-test"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("operator.log")).unwrap())
        .spawn()
        .expect("crashwatch-operator");
    apply(
        &cluster,
        dir.path(),
        "policy.json",
        &format!(
            r#"{{"apiVersion":"crashwatch.dev/v1alpha1","kind":"RemediationPolicy","metadata":{{"name":"{policy}"}},
              "spec":{{"match":{{"processNames":["dd"],"kinds":["HungTask"],
                                 "nodeSelector":{{"matchLabels":{{"kubernetes.io/hostname":"{node}"}}}}}},
                       "threshold":{{"count":1,"window":"1h"}},"action":"Drain",
                       "drain":{{"timeout":"5s","force":true}},
                       "safety":{{"maxUnavailable":1,"cooldown":"1s"}},
                       "escalation":{{"reboot":{{"timeout":"10m"}}}}}}}}"#
        ),
    );
    let reset = loop {
        let event = events
            .recv_timeout(Duration::from_secs(600))
            .unwrap_or_else(|_| {
                panic!(
                    "no reboot within 10 minutes; operator log:\n{}\nconsole:\n{}",
                    std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default(),
                    vm.console()
                )
            });
        if event["event"] == "RESET" || event["event"] == "SHUTDOWN" {
            break event;
        }
    };
    assert_eq!(
        reset["event"], "RESET",
        "a reboot, not a power-off: {reset}"
    );
    assert_eq!(reset["data"]["reason"], "guest-reset", "{reset}");
    let console = vm.console();
    for line in [
        "sysrq: Emergency Sync",
        "sysrq: Emergency Remount R/O",
        "sysrq: Resetting",
    ] {
        assert!(console.contains(line), "{line} missing from the console");
    }

    // The VM boots again; its agent states the new boot id, and the ledger closes the step.
    wait_until("the second boot", Duration::from_secs(600), || {
        read("boots").lines().count() == 2
    });
    let second_boot = read("boots").lines().nth(1).unwrap().to_owned();
    assert_ne!(second_boot, first_boot);
    wait_until(
        "the ledger to record the reboot",
        Duration::from_secs(600),
        || {
            annotation(&cluster, &node, "crashwatch.dev/remediations")
                .and_then(|l| serde_json::from_str::<Value>(&l).ok())
                .is_some_and(|l| l[&policy]["reboot"]["phase"] == "Rebooted")
        },
    );
    let ledger: Value =
        serde_json::from_str(&annotation(&cluster, &node, "crashwatch.dev/remediations").unwrap())
            .unwrap();
    let step = &ledger[&policy]["reboot"];
    assert_eq!(step["bootId"], first_boot.as_str(), "{step}");
    assert_eq!(step["newBootId"], second_boot.as_str(), "{step}");
    assert!(step["seconds"].as_f64().unwrap() > 0.0, "{step}");
    assert_eq!(
        annotation(&cluster, &node, "crashwatch.dev/reboot-order"),
        None,
        "the order is withdrawn once done"
    );
    wait_condition(&cluster, &node, "ProcessHung", "False", 120);
    eprintln!(
        "fault VM: ProcessHung while stuck: {message:?}; NbdDeviceError: {:?}; reboot step: {step}",
        nbd["message"]
    );

    touch("poweroff");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(operator.id() as i32, libc::SIGTERM) };
    let _ = operator.wait();
    drop(vm);
    cluster.kubectl(&["delete", "remediationpolicy", &policy, "--wait=false"]);
    cluster.kubectl(&["delete", "namespace", &namespace, "--wait=false"]);
    cluster.kubectl(&["delete", "node", &node, "--wait=false"]);
}
