//! End to end on a real one-node cluster, as a user runs crashwatch: `scripts/cluster.sh up`
//! starts etcd, the Kubernetes control plane, containerd, runc, the CNI bridge and a kubelet on
//! this machine; the archives of `scripts/images.sh` are loaded into it; the chart is installed
//! with helm and default values. Each trial is one user's path, run in this order on the same
//! node: install, a host crash, an upgrade, a drain on a real hang, uninstall, and `down`, which
//! must leave the machine as it was.
//!
//! Needs root, the kernel (real segfaults and hung tasks), FUSE and qemu-nbd, the node's Debian
//! packages and the tools of `scripts/control-plane-tools.sh`. The images come from
//! `CRASHWATCH_IMAGES` (a directory written by `scripts/images.sh`; `scripts/test.sh` sets it),
//! or are built here. Under `CI=true` anything missing fails.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::{Value, json};
use support::stuck::{StuckReader, require_nbd_lab};
use support::{
    PreviousHandler, Sysctl, compile_crashy, core_pattern, have, printed, require, run_to_crash,
    wait_until,
};

const NAMESPACE: &str = "crashwatch";
const RELEASE: &str = "crashwatch";
/// The chart's default `agent.stateDir` on the node.
const STATE_DIR: &str = "/var/lib/crashwatch";
/// Where the test's workloads run.
const SHOP: &str = "shop";
/// Where the crashing and hanging pods of the pod trials run.
const STORE: &str = "store";

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1); // one node, one path after another
    // Without root, the kernel or the node's packages the trials are skipped, with the
    // reason printed; under CI=true `require` fails the run instead.
    let ready = requirements();
    let trials: Vec<Trial> = vec![
        trial(
            "install_gives_a_ready_agent_reading_kmsg_and_an_operator_leader",
            install,
        ),
        trial("a_host_segfault_is_a_crash_report_within_10_s", host_crash),
        trial(
            "a_crashing_pod_is_named_unwound_like_gdb_and_told_on_the_pod",
            pod_crash,
        ),
        trial(
            "a_burst_of_20_crashing_pods_is_counted_and_attributed_exactly",
            pod_burst,
        ),
        trial("helm_upgrade_rolls_the_agent_and_counts_survive", upgrade),
        trial("a_hung_process_in_a_pod_is_attributed", pod_hang),
        trial(
            "a_drain_on_a_real_hang_stops_pods_honours_the_pdb_and_the_budget",
            drain,
        ),
        trial("helm_uninstall_removes_everything_but_the_crds", uninstall),
        trial("cluster_down_leaves_the_machine_as_it_was", down),
    ]
    .into_iter()
    .map(|trial| trial.with_ignored_flag(!ready))
    .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // A filtered run may skip `down`: the node never outlives the harness.
    if let Some(Ok(cluster)) = CLUSTER.lock().unwrap_or_else(|p| p.into_inner()).take() {
        cluster.down();
    }
    // The kernel's core_pattern and core_pipe_limit go back whatever happened.
    drop(shared().previous_handler.take());
    conclusion.exit();
}

fn trial(name: &'static str, run: fn(&Cluster)) -> Trial {
    Trial::test(name, move || with_cluster(run))
}

/// The node, brought up by the first trial that runs; an error for every later trial if that
/// failed.
static CLUSTER: Mutex<Option<Result<Cluster, String>>> = Mutex::new(None);

/// What the trials hand each other.
static SHARED: Mutex<Shared> = Mutex::new(Shared {
    crash_binary: None,
    hang_name: None,
    previous_handler: None,
});

/// The shared state, also after a trial panicked while holding it.
fn shared() -> std::sync::MutexGuard<'static, Shared> {
    SHARED.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shared {
    /// The core_pattern handler the test installed before the chart, restored on drop.
    previous_handler: Option<PreviousHandler>,
    /// The host program whose crash the host-crash trial reported.
    crash_binary: Option<PathBuf>,
    /// The watched process name the upgrade added, for the drain trial's hang.
    hang_name: Option<String>,
}

fn with_cluster(run: fn(&Cluster)) -> Result<(), Failed> {
    let mut slot = CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        *slot = Some(Cluster::up());
    }
    match slot.as_ref().unwrap() {
        Ok(cluster) => {
            // A panic is a failed trial; the node stays for the next one.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cluster)));
            result.map_err(|panic| {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into());
                Failed::from(text)
            })
        }
        Err(why) => Err(Failed::from(format!("the node did not come up: {why}"))),
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real node, its tools, and the state of the machine before it came up.
struct Cluster {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    bin: PathBuf,
    node: String,
    before: HostState,
    state_dir_existed: bool,
}

/// Root, the kernel, FUSE and qemu-nbd (the hang), and the node's packages.
fn requirements() -> bool {
    require_nbd_lab()
        && require(
            "needs containerd, runc, ctr and the CNI bridge plugin (scripts/install-test-deps.sh)",
            have("containerd")
                && have("runc")
                && have("ctr")
                && Path::new("/usr/lib/cni/bridge").exists(),
        )
}

impl Cluster {
    fn up() -> Result<Cluster, String> {
        let images = images();
        let bin = PathBuf::from(
            String::from_utf8(script(&["control-plane-tools.sh"]).stdout)
                .unwrap()
                .lines()
                .last()
                .unwrap_or_default(),
        );
        let dir = tempfile::Builder::new()
            .prefix("crashwatch-node.")
            .tempdir()
            .unwrap();
        let before = HostState::now(dir.path());
        let state_dir_existed = Path::new(STATE_DIR).exists();
        let start = Instant::now();
        let up = script(&["cluster.sh", "up", dir.path().to_str().unwrap()]);
        if !up.status.success() {
            return Err(format!(
                "cluster.sh up failed: {}",
                String::from_utf8_lossy(&up.stderr)
            ));
        }
        eprintln!(
            "cluster.sh up: node Ready in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        let cluster = Cluster {
            kubeconfig: dir.path().join("kubeconfig"),
            node: fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
                .to_owned(),
            dir,
            bin,
            before,
            state_dir_existed,
        };
        let dir = cluster.dir.path().to_str().unwrap();
        let archives = [
            images.join("crashwatch-agent.tar"),
            images.join("crashwatch-operator.tar"),
            busybox_image(cluster.dir.path()),
        ];
        let mut load = vec!["cluster.sh", "load", dir];
        load.extend(archives.iter().map(|a| a.to_str().unwrap()));
        let loaded = script(&load);
        if !loaded.status.success() {
            cluster.down();
            return Err(format!(
                "cluster.sh load failed: {}",
                String::from_utf8_lossy(&loaded.stderr)
            ));
        }
        Ok(cluster)
    }

    /// `cluster.sh down`; then the chart's state dir goes too, if the test made it.
    fn down(&self) -> Duration {
        let start = Instant::now();
        let output = script(&["cluster.sh", "down", self.dir.path().to_str().unwrap()]);
        let took = start.elapsed();
        assert!(
            output.status.success(),
            "cluster.sh down: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if !self.state_dir_existed {
            let _ = fs::remove_dir_all(STATE_DIR);
        }
        took
    }

    fn command(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(self.bin.join(tool))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"))
    }

    /// kubectl's stdout; panics when it fails.
    fn kubectl(&self, args: &[&str]) -> String {
        let output = self.command("kubectl", args);
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&args)).unwrap()
    }

    /// Applies a manifest given as JSON.
    fn apply(&self, manifest: Value) {
        let file = self.dir.path().join("manifest.json");
        fs::write(&file, manifest.to_string()).unwrap();
        self.kubectl(&["apply", "--server-side", "-f", file.to_str().unwrap()]);
    }

    fn helm(&self, args: &[&str]) -> String {
        let output = self.command("helm", args);
        assert!(
            output.status.success(),
            "helm {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// The pods of a component of the release.
    fn release_pods(&self, component: &str) -> Vec<Value> {
        let selector =
            format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}");
        let list = self.json(&["get", "pods", "-n", NAMESPACE, "-l", &selector]);
        list["items"].as_array().unwrap().clone()
    }

    /// The one Ready agent pod (name, uid), once there is exactly one and it is Ready.
    fn ready_agent(&self) -> (String, String) {
        let mut found = None;
        wait_until("one Ready agent pod", Duration::from_secs(120), || {
            let pods = self.release_pods("agent");
            found = match pods.as_slice() {
                [pod] if is_ready(pod) && pod["metadata"]["deletionTimestamp"].is_null() => Some((
                    str_of(&pod["metadata"]["name"]),
                    str_of(&pod["metadata"]["uid"]),
                )),
                _ => None,
            };
            found.is_some()
        });
        found.unwrap()
    }

    /// The sum of a metric's series on a pod, through the API server's pod proxy; None when
    /// the pod does not answer or has no such metric.
    fn metric(&self, pod: &str, port: u16, name: &str) -> Option<f64> {
        let path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:{port}/proxy/metrics");
        let output = self.command("kubectl", &["get", "--raw", &path]);
        let samples = testkit::metric_samples(&String::from_utf8_lossy(&output.stdout));
        let series: Vec<f64> = samples
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, value)| *value)
            .collect();
        (!series.is_empty()).then(|| series.iter().sum())
    }

    /// The CrashReports of this node whose process is `comm`.
    fn reports_of(&self, comm: &str) -> Vec<Value> {
        let list = self.json(&["get", "crashreports"]);
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["spec"]["nodeName"] == self.node.as_str() && r["spec"]["comm"] == comm)
            .cloned()
            .collect()
    }

    fn node_object(&self) -> Value {
        self.json(&["get", "node", &self.node])
    }
}

/// Runs a script of the repository's `scripts/`.
fn script(args: &[&str]) -> Output {
    Command::new(repo().join("scripts").join(args[0]))
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]))
}

/// The directory with crashwatch-agent.tar and crashwatch-operator.tar.
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

/// A busybox image for the test's workloads (Debian's busybox-static).
fn busybox_image(dir: &Path) -> PathBuf {
    let out = dir.join("busybox.tar");
    let mut command = Command::new(repo().join("scripts/node/oci-image.py"));
    command
        .arg(&out)
        .arg("crashwatch.test/busybox:1")
        .args([
            "--entrypoint",
            "/bin/sh",
            "--file",
            "/bin/busybox:/bin/busybox",
        ])
        .args([
            "--dir", "/tmp", "--dir", "/proc", "--dir", "/sys", "--dir", "/dev",
        ]);
    for applet in ["sh", "sleep", "true"] {
        command.args(["--link", &format!("busybox:/bin/{applet}")]);
    }
    let output = command.output().expect("oci-image.py");
    assert!(
        output.status.success(),
        "oci-image.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Polls `check` until it gives a value; panics after `timeout` with its last complaint.
fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) if Instant::now() > deadline => panic!("timed out waiting for {what}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn str_of(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// A fresh name that no earlier run on this boot used (process names are at most 15 bytes).
fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

fn install(c: &Cluster) {
    let chart = repo().join("charts/crashwatch");
    let previous = PreviousHandler::install(c.dir.path());
    let start = Instant::now();
    // The node's containerd keeps its bundles in the cluster's directory.
    let runtime = format!(
        "agent.runtimeStateDir={}",
        c.dir.path().join("containerd/state").display()
    );
    c.helm(&[
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "-n",
        NAMESPACE,
        "--create-namespace",
        "--set",
        &runtime,
        "--wait",
        "--timeout",
        "180s",
    ]);
    // The agent is the core handler now, and recorded the one it replaced.
    let ours = format!("|{STATE_DIR}/bin/crashwatch-agent coredump ");
    wait_until("the agent's core handler", Duration::from_secs(30), || {
        core_pattern().starts_with(&ours)
    });
    let recorded = fs::read_to_string(Path::new(STATE_DIR).join("coredump/handler.json")).unwrap();
    assert!(recorded.contains(&previous.pattern), "{recorded}");
    shared().previous_handler = Some(previous);
    let (agent, _) = c.ready_agent();
    eprintln!(
        "helm install: agent Ready after {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // The agent reads /dev/kmsg inside its container.
    wait_until(
        "the agent to read the kernel log",
        Duration::from_secs(30),
        || {
            c.metric(&agent, 9477, "crashwatch_kmsg_reader_up") == Some(1.0)
                && c.metric(&agent, 9477, "crashwatch_kmsg_records_total")
                    .is_some_and(|n| n > 0.0)
        },
    );
    // Its logs are plain text: the container's stderr is no terminal.
    let logs = c.kubectl(&["logs", "-n", NAMESPACE, &agent]);
    assert!(!logs.trim().is_empty(), "the agent logged nothing");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escape codes in the agent's logs:\n{logs}"
    );

    // Both operator replicas run, and exactly one leads: the Lease names it and only its
    // metrics say so.
    c.kubectl(&[
        "wait",
        "-n",
        NAMESPACE,
        "--for=condition=Ready",
        "pod",
        "-l",
        "app.kubernetes.io/component=operator",
        "--timeout=120s",
    ]);
    let operators: Vec<String> = c
        .release_pods("operator")
        .iter()
        .map(|p| str_of(&p["metadata"]["name"]))
        .collect();
    assert_eq!(operators.len(), 2, "{operators:?}");
    let mut holder = String::new();
    wait_until(
        "an operator to hold the Lease",
        Duration::from_secs(60),
        || {
            let lease = c.command(
                "kubectl",
                &[
                    "get",
                    "lease",
                    "-n",
                    NAMESPACE,
                    "crashwatch-operator",
                    "-o",
                    "jsonpath={.spec.holderIdentity}",
                ],
            );
            holder = String::from_utf8_lossy(&lease.stdout).into_owned();
            operators.contains(&holder)
        },
    );
    wait_until(
        "the leader's metrics to say it leads",
        Duration::from_secs(30),
        || {
            operators.iter().all(|pod| {
                let leads = c.metric(pod, 9478, "crashwatch_operator_leader");
                leads == Some(if *pod == holder { 1.0 } else { 0.0 })
            })
        },
    );
    // Prometheus finds the operator through its metrics Service: it selects both replicas.
    let endpoints = c.json(&[
        "get",
        "endpoints",
        "-n",
        NAMESPACE,
        "crashwatch-operator-metrics",
    ]);
    let addresses = endpoints["subsets"][0]["addresses"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(addresses, 2, "{endpoints}");
}

fn host_crash(c: &Cluster) {
    let name = unique_name("segv-");
    let binary = c.dir.path().join(&name);
    compile_crashy(&binary, &[]);
    let start = Instant::now();
    let output = run_to_crash(&binary, "null");
    let pid: u64 = printed(&output, "pid").unwrap().parse().unwrap();
    let mut report = Value::Null;
    wait_until("its CrashReport", Duration::from_secs(10), || {
        report = c.reports_of(&name).pop().unwrap_or(Value::Null);
        !report.is_null()
    });
    eprintln!(
        "host segfault to CrashReport: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(report["spec"]["kind"], "Segfault", "{report}");
    assert_eq!(report["spec"]["pid"], pid, "{report}");
    assert_eq!(report["spec"]["faultAddress"], "0x100", "{report}");
    wait_until("its count", Duration::from_secs(10), || {
        c.reports_of(&name)[0]["status"]["count"] == 1
    });
    // kubectl get crashreports shows it.
    let row = table_row(&c.kubectl(&["get", "crashreports"]), &name);
    assert_eq!(row["NAME"], report["metadata"]["name"].as_str().unwrap());
    // No pod: the Namespace and Pod columns are empty.
    assert_eq!(
        [
            &row["NODE"],
            &row["NAMESPACE"],
            &row["POD"],
            &row["PROCESS"],
            &row["KIND"]
        ],
        [c.node.as_str(), "", "", name.as_str(), "Segfault"],
        "{row:?}"
    );
    assert!(report["spec"].get("pod").is_none(), "{report}");
    // The core handler unwound the host process too: crashy's null mode crashes in main.
    let functions: Vec<&str> = report["spec"]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    assert_eq!(functions.last(), Some(&"main"), "{report}");
    shared().crash_binary = Some(binary);
}

fn upgrade(c: &Cluster) {
    let binary = shared()
        .crash_binary
        .clone()
        .expect("the host-crash trial ran");
    let name = binary.file_name().unwrap().to_str().unwrap().to_owned();
    let (old_agent, old_uid) = c.ready_agent();
    let hang_name = unique_name("hang-");
    let watch = format!("agent.watchProcesses={{qemu-nbd,{hang_name}}}");
    let chart = repo().join("charts/crashwatch");
    c.helm(&[
        "upgrade",
        RELEASE,
        chart.to_str().unwrap(),
        "-n",
        NAMESPACE,
        "--reuse-values",
        "--set",
        "agent.hangThresholdSeconds=3",
        "--set",
        &watch,
        "--wait",
        "--timeout",
        "180s",
    ]);
    // The DaemonSet rolled: a new agent pod runs with the new value.
    let mut agent = (String::new(), String::new());
    wait_until("the rolled agent", Duration::from_secs(120), || {
        agent = c.ready_agent();
        agent.1 != old_uid
    });
    let args = c.json(&["get", "pod", "-n", NAMESPACE, &agent.0])["spec"]["containers"][0]["args"]
        .to_string();
    assert!(
        args.contains("--hang-threshold=3") && args.contains(&hang_name),
        "{args}"
    );
    assert_ne!(agent.0, old_agent);

    // The cursor is in the node's state dir, for this boot.
    let cursor = fs::read_to_string(Path::new(STATE_DIR).join("kmsg-cursor.json"))
        .expect("the cursor in the hostPath state dir");
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert!(cursor.contains(boot_id.trim()), "{cursor}");

    // Nothing was counted again: one more crash makes exactly 2, and stays 2.
    run_to_crash(&binary, "null");
    eventually("the second occurrence", Duration::from_secs(10), || {
        let report = c.reports_of(&name);
        match report.first() {
            Some(r) if r["status"]["count"] == 2 => Ok(()),
            _ => Err(format!(
                "{report:?}\nagent log:\n{}",
                c.kubectl(&["logs", "-n", NAMESPACE, &agent.0, "--tail=20"])
            )),
        }
    });
    std::thread::sleep(Duration::from_secs(4)); // two publish intervals
    let report = c.reports_of(&name);
    assert_eq!(report.len(), 1, "{report:?}");
    assert_eq!(
        report[0]["status"]["count"], 2,
        "counted again after the roll: {}",
        report[0]
    );
    shared().hang_name = Some(hang_name);
}

fn drain(c: &Cluster) {
    let hang_name = shared().hang_name.clone().expect("the upgrade trial ran");
    let (agent, agent_uid) = c.ready_agent();
    let operator_uids: BTreeSet<String> = c
        .release_pods("operator")
        .iter()
        .map(|p| str_of(&p["metadata"]["uid"]))
        .collect();
    let _sysctls = [
        Sysctl::set("kernel/hung_task_timeout_secs", "2"),
        Sysctl::set("kernel/hung_task_check_interval_secs", "1"),
        Sysctl::set("kernel/hung_task_warnings", "-1"),
    ];
    let _cleanup = Cleanup(c);

    // Workloads: a Deployment whose PodDisruptionBudget allows no disruption, and a DaemonSet.
    c.kubectl(&["create", "namespace", SHOP]);
    let container = json!({
        "name": "main", "image": "crashwatch.test/busybox:1", "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"],
    });
    let template = |app: &str| {
        json!({
            "metadata": {"labels": {"app": app}},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [container]},
        })
    };
    c.apply(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "checkout", "namespace": SHOP},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "checkout"}}, "template": template("checkout")},
    }));
    c.apply(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "node-daemon", "namespace": SHOP},
        "spec": {"selector": {"matchLabels": {"app": "node-daemon"}}, "template": template("node-daemon")},
    }));
    c.apply(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "checkout", "namespace": SHOP},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "checkout"}}},
    }));
    c.kubectl(&[
        "rollout",
        "status",
        "-n",
        SHOP,
        "deployment/checkout",
        "--timeout=120s",
    ]);
    c.kubectl(&[
        "rollout",
        "status",
        "-n",
        SHOP,
        "daemonset/node-daemon",
        "--timeout=120s",
    ]);
    let shop = |app: &str| -> Vec<Value> {
        c.json(&["get", "pods", "-n", SHOP, "-l", &format!("app={app}")])["items"]
            .as_array()
            .unwrap()
            .clone()
    };
    let checkout = shop("checkout");
    assert_eq!(checkout.len(), 2);
    let daemon_uid = str_of(&shop("node-daemon")[0]["metadata"]["uid"]);
    let checkout_containers: Vec<String> = checkout
        .iter()
        .map(|p| {
            str_of(&p["status"]["containerStatuses"][0]["containerID"]).replace("containerd://", "")
        })
        .collect();
    assert!(
        checkout_containers.iter().all(|id| id.len() == 64),
        "{checkout_containers:?}"
    );

    // A real hang of a watched process, reported by the agent in its pod.
    let stuck = StuckReader::start_named(&hang_name);
    let reader = u64::from(stuck.reader_pid());
    wait_until(
        "a HungTask report of the stuck reader",
        Duration::from_secs(30),
        || {
            c.reports_of(&hang_name).iter().any(|r| {
                r["spec"]["kind"] == "HungTask"
                    && r["status"]["recent"]
                        .as_array()
                        .is_some_and(|o| o.iter().any(|o| o["pid"] == reader))
            })
        },
    );

    // A Drain policy with no budget: blocked, the node untouched.
    let policy = |max_unavailable: i64| {
        json!({
            "apiVersion": "crashwatch.dev/v1alpha1", "kind": "RemediationPolicy",
            "metadata": {"name": "e2e-drain"},
            "spec": {
                "match": {"processNames": [hang_name], "kinds": ["HungTask"]},
                "threshold": {"count": 1, "window": "30m"},
                "action": "Drain",
                "drain": {"timeout": "5m"},
                "safety": {"maxUnavailable": max_unavailable, "cooldown": "1s", "dryRun": false, "paused": false},
            },
        })
    };
    c.apply(policy(0));
    let node_state = || -> (String, String) {
        let policy = c.json(&["get", "remediationpolicy", "e2e-drain"]);
        let entry = policy["status"]["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == c.node.as_str()).cloned())
            .unwrap_or(Value::Null);
        (str_of(&entry["state"]), str_of(&entry["reason"]))
    };
    wait_until(
        "the budget to block the drain",
        Duration::from_secs(30),
        || {
            let (state, reason) = node_state();
            state == "Blocked" && reason.starts_with("budget")
        },
    );
    assert_ne!(
        c.node_object()["spec"]["unschedulable"],
        true,
        "cordoned with no budget"
    );

    // With a budget of one node: cordoned, and the drain waits on the PDB.
    c.apply(policy(1));
    wait_until(
        "the cordon and the PDB's refusal",
        Duration::from_secs(30),
        || {
            let (state, reason) = node_state();
            c.node_object()["spec"]["unschedulable"] == true
                && state == "Blocked"
                && reason.starts_with("pdb")
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let guarded = shop("checkout");
    assert_eq!(
        guarded
            .iter()
            .map(|p| str_of(&p["metadata"]["uid"]))
            .collect::<BTreeSet<_>>(),
        checkout
            .iter()
            .map(|p| str_of(&p["metadata"]["uid"]))
            .collect::<BTreeSet<_>>(),
        "the PDB allowed no disruption, yet checkout pods went"
    );
    assert!(guarded.iter().all(is_ready));

    // The budget allows it: the kubelet stops the pods for real.
    c.apply(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "checkout", "namespace": SHOP},
        "spec": {"minAvailable": 0, "selector": {"matchLabels": {"app": "checkout"}}},
    }));
    wait_until("the drain to finish", Duration::from_secs(90), || {
        node_state().0 == "Drained"
    });
    let ctr = |args: &[&str]| -> String {
        let sock = c.dir.path().join("containerd/containerd.sock");
        let output = Command::new("ctr")
            .arg("-a")
            .arg(&sock)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    wait_until(
        "the checkout containers to stop",
        Duration::from_secs(30),
        || {
            let tasks = ctr(&["tasks", "ls", "-q"]);
            checkout_containers
                .iter()
                .all(|id| !tasks.contains(id.as_str()))
        },
    );
    let old: BTreeSet<String> = checkout
        .iter()
        .map(|p| str_of(&p["metadata"]["uid"]))
        .collect();
    for pod in shop("checkout") {
        assert!(
            !old.contains(&str_of(&pod["metadata"]["uid"])),
            "an evicted pod is back: {pod}"
        );
        assert_eq!(
            pod["status"]["phase"], "Pending",
            "a replacement ran on the cordoned node: {pod}"
        );
    }
    // DaemonSet pods stay: the test's, and crashwatch's agent; so do the operator's replicas.
    let daemon = shop("node-daemon");
    assert_eq!(str_of(&daemon[0]["metadata"]["uid"]), daemon_uid);
    assert!(is_ready(&daemon[0]));
    assert_eq!(c.ready_agent(), (agent, agent_uid));
    let operators: BTreeSet<String> = c
        .release_pods("operator")
        .iter()
        .map(|p| str_of(&p["metadata"]["uid"]))
        .collect();
    assert_eq!(operators, operator_uids);
    drop(stuck); // continue qemu-nbd before the sysctls go back
}

/// Undoes the drain trial's cluster changes, also when it fails.
struct Cleanup<'a>(&'a Cluster);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let c = self.0;
        for args in [
            &[
                "delete",
                "remediationpolicy",
                "e2e-drain",
                "--ignore-not-found",
            ][..],
            &[
                "delete",
                "namespace",
                SHOP,
                "--ignore-not-found",
                "--wait=false",
            ],
            &["uncordon", &c.node],
        ] {
            let _ = c.command("kubectl", args);
        }
    }
}

/// The test's crashing service, as a pod's owner would ship it: `checkout.c` built -O2
/// -fomit-frame-pointer, dynamically linked and stripped, its debug file in the image under
/// /usr/lib/debug/.build-id, with the libraries it links. Returns the archive and the
/// unstripped binary (for gdb).
fn checkout_image(dir: &Path) -> (PathBuf, PathBuf) {
    let source = repo().join("node-agent/tests/programs/checkout.c");
    let full = dir.join("checkout.full");
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-fomit-frame-pointer", "-o"])
        .arg(&full)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success(), "gcc checkout.c");
    let debug = dir.join("checkout.debug");
    let stripped = dir.join("checkout");
    support::run(
        "objcopy",
        &[
            "--only-keep-debug",
            full.to_str().unwrap(),
            debug.to_str().unwrap(),
        ],
    );
    support::run(
        "strip",
        &["-o", stripped.to_str().unwrap(), full.to_str().unwrap()],
    );
    let id = support::build_id(&full);
    let archive = dir.join("checkout.tar");
    let mut command = Command::new(repo().join("scripts/node/oci-image.py"));
    command
        .arg(&archive)
        .arg(CHECKOUT_IMAGE)
        .args(["--entrypoint", "/usr/bin/checkout"])
        .arg("--file")
        .arg(format!("{}:/usr/bin/checkout:755", stripped.display()))
        .arg("--file")
        .arg(format!(
            "{}:/usr/lib/debug/.build-id/{}/{}.debug:644",
            debug.display(),
            &id[..2],
            &id[2..]
        ));
    // The hang trial's program, as `qemu-nbd`.
    let hang = dir.join("vforkhang");
    let status = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&hang)
        .arg(repo().join("node-agent/tests/programs/vforkhang.c"))
        .status()
        .unwrap();
    assert!(status.success(), "gcc vforkhang.c");
    command
        .arg("--file")
        .arg(format!("{}:/usr/bin/qemu-nbd:755", hang.display()));
    let ldd = support::run("ldd", &[stripped.to_str().unwrap()]);
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let real = fs::canonicalize(lib).unwrap();
        command
            .arg("--file")
            .arg(format!("{}:{lib}", real.display()));
    }
    command.args([
        "--dir", "/tmp", "--dir", "/proc", "--dir", "/sys", "--dir", "/dev",
    ]);
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "oci-image.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (archive, full)
}

const CHECKOUT_IMAGE: &str = "crashwatch.test/checkout:1";

/// The line of `checkout.c` carrying `marker` in a comment.
fn checkout_line(marker: &str) -> u64 {
    let source = fs::read_to_string(repo().join("node-agent/tests/programs/checkout.c")).unwrap();
    source
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker} in checkout.c")) as u64
        + 1
}

/// A pod of the checkout image that runs once, labelled as the test's.
fn checkout_pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": STORE, "labels": {"crashwatch.test/crash": "checkout"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "checkout", "image": CHECKOUT_IMAGE, "imagePullPolicy": "Never"}],
        },
    })
}

/// The Warning Events on pod `name` whose reason is `reason`.
fn pod_events(c: &Cluster, reason: &str) -> Vec<Value> {
    c.json(&["get", "events", "-n", STORE])["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == reason && e["involvedObject"]["kind"] == "Pod")
        .cloned()
        .collect()
}

fn pod_crash(c: &Cluster) {
    let (archive, full) = checkout_image(c.dir.path());
    let loaded = script(&[
        "cluster.sh",
        "load",
        c.dir.path().to_str().unwrap(),
        archive.to_str().unwrap(),
    ]);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    c.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": STORE}}));
    let name = unique_name("checkout-");
    let start = Instant::now();
    c.apply(checkout_pod(&name));
    let mut report = Value::Null;
    wait_until("the pod's CrashReport", Duration::from_secs(60), || {
        report = c
            .reports_of("checkout")
            .into_iter()
            .find(|r| r["spec"]["pod"]["name"] == name.as_str())
            .unwrap_or(Value::Null);
        !report.is_null()
    });
    eprintln!(
        "pod created to CrashReport: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let spec = &report["spec"];
    let pod = c.json(&["get", "pod", "-n", STORE, &name]);
    // Which pod and container.
    assert_eq!(spec["pod"]["namespace"], STORE, "{report}");
    assert_eq!(spec["pod"]["uid"], pod["metadata"]["uid"], "{report}");
    assert_eq!(spec["container"]["name"], "checkout", "{report}");
    assert_eq!(spec["container"]["image"], CHECKOUT_IMAGE, "{report}");
    let container_id = pod["status"]["containerStatuses"][0]["containerID"].clone();
    if !container_id.is_null() {
        assert_eq!(spec["container"]["id"], container_id, "{report}");
    }
    // Which function and line, which NULL member: from the image's own debug file.
    let frames = spec["frames"].as_array().unwrap();
    let ours: Vec<(String, u64)> = frames
        .iter()
        .map(|f| (str_of(&f["function"]), f["line"].as_u64().unwrap_or(0)))
        .collect();
    let expected = [
        ("payment_total", checkout_line("crash:here")),
        ("charge", checkout_line("call:charge")),
        ("checkout", checkout_line("call:checkout")),
        ("main", checkout_line("call:main")),
    ]
    .map(|(f, l)| (f.to_owned(), l));
    assert_eq!(ours, expected, "{report}");
    assert!(frames.iter().all(|f| f["module"] == "checkout"), "{report}");
    assert_eq!(spec["access"]["pointer"], "order->payment", "{report}");
    assert_eq!(spec["access"]["member"], "amount_cents", "{report}");
    let explanation = str_of(&spec["explanation"]);
    assert!(
        explanation.contains("NULL") && explanation.contains("amount_cents"),
        "{explanation}"
    );
    // The stack is gdb's, on the dump the previous handler received for this crash.
    let shared = shared();
    let previous = shared
        .previous_handler
        .as_ref()
        .expect("the install trial ran");
    let core = previous.wait_core(spec["pid"].as_u64().unwrap());
    let gdb: Vec<(String, u64)> = support::gdb_backtrace(&full, &core)
        .into_iter()
        .map(|f| (f.function, f.line))
        .collect();
    assert_eq!(gdb, ours, "gdb bt differs");
    drop(shared);
    // The pod tells why its container died.
    wait_until("the Pod's Warning Event", Duration::from_secs(30), || {
        pod_events(c, "Segfault").iter().any(|e| {
            e["involvedObject"]["name"] == name.as_str()
                && e["type"] == "Warning"
                && str_of(&e["message"]).contains("payment_total")
        })
    });
    let described = c.kubectl(&["describe", "pod", "-n", STORE, &name]);
    assert!(described.contains("Segfault"), "{described}");
    // kubectl get crashreports names the namespace and the pod.
    let row = table_row(&c.kubectl(&["get", "crashreports"]), &name);
    assert_eq!(
        [
            &row["NAMESPACE"],
            &row["POD"],
            &row["PROCESS"],
            &row["KIND"]
        ],
        [STORE, name.as_str(), "checkout", "Segfault"],
        "{row:?}"
    );
}

/// The row of a kubectl table that contains `needle`, by column header: cells are cut at the
/// headers' positions, so empty cells stay empty.
fn table_row(table: &str, needle: &str) -> std::collections::HashMap<String, String> {
    let mut lines = table.lines();
    let header = lines.next().expect("a header");
    let row = lines
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no row with {needle}:\n{table}"));
    let mut starts: Vec<(usize, &str)> = Vec::new();
    let mut at = 0;
    for name in header.split_whitespace() {
        let start = header[at..].find(name).unwrap() + at;
        starts.push((start, name));
        at = start + name.len();
    }
    let cell = |from: usize, to: usize| {
        row.get(from..to.min(row.len()))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    starts
        .iter()
        .enumerate()
        .map(|(i, (start, name))| {
            let end = starts.get(i + 1).map_or(row.len(), |(next, _)| *next);
            ((*name).to_owned(), cell(*start, end))
        })
        .collect()
}

fn pod_burst(c: &Cluster) {
    let report_of = || {
        c.reports_of("checkout")
            .into_iter()
            .find(|r| r["spec"]["pod"]["namespace"] == STORE)
            .expect("the pod trial's report")
    };
    let before = report_of()["status"]["count"].as_u64().unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("burst-{i:02}")).collect();
    let list = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": names.iter().map(|n| checkout_pod(n)).collect::<Vec<_>>(),
    });
    let start = Instant::now();
    c.apply(list);
    // Every pod gets its own Event.
    wait_until(
        "an Event on each of the 20 pods",
        Duration::from_secs(120),
        || {
            let told: BTreeSet<String> = pod_events(c, "Segfault")
                .iter()
                .map(|e| str_of(&e["involvedObject"]["name"]))
                .filter(|n| n.starts_with("burst-"))
                .collect();
            told.len() == names.len()
        },
    );
    eprintln!(
        "20 crashing pods to 20 Pod Events: {:.1} s",
        start.elapsed().as_secs_f64()
    );
    // The count is exact, and stays so.
    wait_until("the count of 20 more", Duration::from_secs(30), || {
        report_of()["status"]["count"].as_u64() == Some(before + 20)
    });
    std::thread::sleep(Duration::from_secs(5));
    let report = report_of();
    assert_eq!(
        report["status"]["count"].as_u64(),
        Some(before + 20),
        "{report}"
    );
    // Each recent occurrence names its own pod.
    let recent: Vec<String> = report["status"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| str_of(&o["pod"]["name"]))
        .collect();
    let distinct: BTreeSet<&String> = recent.iter().collect();
    assert_eq!(distinct.len(), recent.len(), "{recent:?}");
    assert!(recent.iter().all(|n| names.contains(n)), "{recent:?}");
    c.kubectl(&[
        "delete",
        "pods",
        "-n",
        STORE,
        "-l",
        "crashwatch.test/crash=checkout",
        "--wait=false",
    ]);
}

fn pod_hang(c: &Cluster) {
    let name = unique_name("hang-");
    let mut pod = checkout_pod(&name);
    pod["spec"]["containers"][0]["command"] = json!(["/usr/bin/qemu-nbd"]);
    pod["spec"]["containers"][0]["name"] = json!("server");
    c.apply(pod);
    // The upgrade set a 3 s threshold; the agent watches qemu-nbd by default.
    let mut report = Value::Null;
    wait_until("the hang's CrashReport", Duration::from_secs(60), || {
        report = c.json(&["get", "crashreports"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["spec"]["kind"] == "HungTask" && r["spec"]["pod"]["name"] == name.as_str())
            .cloned()
            .unwrap_or(Value::Null);
        !report.is_null()
    });
    let spec = &report["spec"];
    let uid = c.json(&["get", "pod", "-n", STORE, &name])["metadata"]["uid"].clone();
    assert_eq!(spec["comm"], "qemu-nbd", "{report}");
    assert_eq!(spec["pod"]["namespace"], STORE, "{report}");
    assert_eq!(spec["pod"]["uid"], uid, "{report}");
    assert_eq!(spec["container"]["name"], "server", "{report}");
    assert_eq!(spec["container"]["image"], CHECKOUT_IMAGE, "{report}");
    c.kubectl(&[
        "delete",
        "pod",
        "-n",
        STORE,
        &name,
        "--grace-period=0",
        "--force",
    ]);
}

fn uninstall(c: &Cluster) {
    c.helm(&[
        "uninstall",
        RELEASE,
        "-n",
        NAMESPACE,
        "--wait",
        "--timeout",
        "120s",
    ]);
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    for kind in [
        "daemonsets,deployments,services,serviceaccounts,roles,rolebindings,pods",
        "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
    ] {
        wait_until(
            "the release's objects to go",
            Duration::from_secs(60),
            || {
                let left = c.kubectl(&["get", kind, "-A", "-l", &selector, "-o", "name"]);
                left.trim().is_empty()
            },
        );
    }
    // The CRDs stay, with the reports.
    for crd in [
        "crashreports.crashwatch.dev",
        "remediationpolicies.crashwatch.dev",
    ] {
        c.kubectl(&["get", "crd", crd]);
    }
    let reports = c.json(&["get", "crashreports"]);
    assert!(!reports["items"].as_array().unwrap().is_empty());
    // The agent put the previous core handler back as it stopped.
    let previous = shared().previous_handler.take();
    if let Some(previous) = previous {
        assert_eq!(core_pattern(), previous.pattern);
    }
}

fn down(c: &Cluster) {
    let took = c.down();
    eprintln!("cluster.sh down: {:.1} s", took.as_secs_f64());
    let after = HostState::now(c.dir.path());
    assert_eq!(c.before, after, "the machine differs after cluster.sh down");
}

/// What a node run may change on this machine, as `cluster.sh down` must restore it.
#[derive(Debug, PartialEq)]
struct HostState {
    mount_points: BTreeSet<String>,
    root_propagation: String,
    links: BTreeSet<String>,
    iptables: BTreeSet<String>,
    kubepods_cgroups: BTreeSet<PathBuf>,
    network_namespaces: BTreeSet<String>,
    ip_forward: String,
    fixed_dirs: BTreeSet<String>,
    node_processes: BTreeSet<String>,
}

impl HostState {
    /// The machine now; `cluster_dir` marks the processes that belong to the node.
    fn now(cluster_dir: &Path) -> HostState {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let fields = |line: &str| line.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let root = mountinfo.lines().map(fields).find(|f| f[4] == "/").unwrap();
        let propagation = root[6..]
            .iter()
            .take_while(|f| *f != "-")
            .map(|f| f.split(':').next().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(",");
        let lines = |program: &str, args: &[&str]| -> BTreeSet<String> {
            let output = Command::new(program).args(args).output().unwrap();
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        };
        let mut iptables = BTreeSet::new();
        for program in ["iptables", "ip6tables"] {
            for table in ["filter", "nat", "mangle"] {
                for rule in lines(program, &["-t", table, "-S"]) {
                    iptables.insert(format!("{program} {table} {rule}"));
                }
            }
        }
        let kubepods_cgroups = fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .map(|c| c.path().join("kubepods"))
            .filter(|p| p.exists())
            .collect();
        let network_namespaces = fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let fixed_dirs = [
            "/var/lib/kubelet",
            "/var/log/containers",
            "/run/containerd",
            "/var/lib/cni",
        ]
        .into_iter()
        .filter(|d| Path::new(d).exists())
        .map(str::to_owned)
        .collect();
        // The node's own programs, anything whose command line names its directory (etcd,
        // kube-apiserver, the lock holder), and any process left in a pod's cgroup.
        let node_programs = [
            "kubelet",
            "containerd",
            "kube-controller",
            "kube-scheduler",
            "kube-proxy",
        ];
        let dir = cluster_dir.to_string_lossy().into_owned();
        let node_processes = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .filter_map(|e| {
                let comm = fs::read_to_string(e.path().join("comm")).ok()?;
                let cmdline = fs::read(e.path().join("cmdline")).ok()?;
                let cgroups = fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
                let comm = comm.trim();
                let ours = node_programs.iter().any(|p| comm.starts_with(p))
                    || String::from_utf8_lossy(&cmdline).contains(&dir)
                    || cgroups.contains("/kubepods");
                ours.then(|| format!("{} {comm}", e.file_name().to_string_lossy()))
            })
            .collect();
        HostState {
            mount_points: mountinfo.lines().map(|l| fields(l)[4].clone()).collect(),
            root_propagation: propagation,
            links: lines("ip", &["-o", "link", "show"])
                .iter()
                .filter_map(|l| l.split(": ").nth(1).map(str::to_owned))
                .collect(),
            iptables,
            kubepods_cgroups,
            network_namespaces,
            ip_forward: fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
            fixed_dirs,
            node_processes,
        }
    }
}
