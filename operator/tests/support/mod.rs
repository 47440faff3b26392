//! The operator against the real test control plane: Nodes, Pods, PDBs and CrashReports are
//! API objects, the operator is the real binary. Tests run one at a time (the operator acts
//! on every policy in the cluster) and each labels its objects with an id of its own, which
//! its policies select, so no test sees another's nodes.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crds::{CrashReport, RemediationPolicy};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
pub use testkit::{ControlPlane, free_port};

/// The label every object of one test carries, with the test's id as value.
pub const TEST_LABEL: &str = "crashwatch.dev/test";

/// One test's share of the cluster.
pub struct Fixture {
    /// The control plane.
    pub cluster: ControlPlane,
    /// An admin client.
    pub client: Client,
    /// This test's id: label value and name prefix.
    pub id: String,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Fixture {
    /// Takes the test lock, installs the CRDs and connects. None when skipped.
    pub async fn begin(test: &str) -> Option<Fixture> {
        let serial = SERIAL.lock().await;
        let cluster = ControlPlane::get()?;
        cluster.install_crds();
        let kubeconfig = Kubeconfig::read_from(&cluster.kubeconfig).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
        let nanos = Timestamp::now().subsec_nanosecond();
        Some(Fixture {
            client: Client::try_from(config).unwrap(),
            cluster,
            id: format!("{test}-{nanos:x}"),
            _serial: serial,
        })
    }

    /// Creates `count` labelled Nodes named `<id>-n<i>` and returns their names.
    pub async fn nodes(&self, count: usize) -> Vec<String> {
        let api: Api<Node> = Api::all(self.client.clone());
        let mut names = Vec::new();
        for i in 0..count {
            let name = format!("{}-n{i}", self.id);
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {TEST_LABEL: self.id}},
            }))
            .unwrap();
            api.create(&PostParams::default(), &node).await.unwrap();
            names.push(name);
        }
        names
    }

    /// Creates a RemediationPolicy selecting this test's nodes; `spec` is merged over a
    /// HungTask-of-qemu-nbd, threshold 2 in 10m, no-cooldown default.
    pub async fn policy(&self, name: &str, spec: Value) -> String {
        let name = format!("{}-{name}", self.id);
        let mut full = json!({
            "match": {
                "processNames": ["qemu-nbd"],
                "kinds": ["HungTask"],
                "nodeSelector": {"matchLabels": {TEST_LABEL: self.id}},
            },
            "threshold": {"count": 2, "window": "10m"},
            "action": "Cordon",
            "safety": {"cooldown": "0s"},
        });
        merge(&mut full, spec);
        let policy: RemediationPolicy = serde_json::from_value(json!({
            "apiVersion": "crashwatch.dev/v1alpha1",
            "kind": "RemediationPolicy",
            "metadata": {"name": name},
            "spec": full,
        }))
        .unwrap();
        Api::<RemediationPolicy>::all(self.client.clone())
            .create(&PostParams::default(), &policy)
            .await
            .unwrap();
        name
    }

    /// Merges `spec` into a policy's spec.
    pub async fn edit_policy(&self, name: &str, spec: Value) {
        Api::<RemediationPolicy>::all(self.client.clone())
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    /// Creates or updates the report of `process`/`kind` on `node` so that it holds one
    /// occurrence per age in `seconds_ago`.
    pub async fn report(&self, node: &str, process: &str, kind: &str, seconds_ago: &[i64]) {
        let name = format!("{node}.{}.{}", kind.to_lowercase(), process);
        self.report_with(&name, node, process, kind, seconds_ago, json!({}))
            .await;
    }

    /// Creates or updates report `name` of `process`/`kind` on `node`, with `extra` merged
    /// into its spec, so that it holds one occurrence per age in `seconds_ago`: its count,
    /// first and last times, the five recent ones, and time buckets as the agent writes
    /// them.
    pub async fn report_with(
        &self,
        name: &str,
        node: &str,
        process: &str,
        kind: &str,
        seconds_ago: &[i64],
        extra: Value,
    ) {
        let api: Api<CrashReport> = Api::all(self.client.clone());
        let mut spec = json!({"nodeName": node, "kind": kind, "comm": process});
        merge(&mut spec, extra);
        let report: CrashReport = serde_json::from_value(json!({
            "apiVersion": "crashwatch.dev/v1alpha1",
            "kind": "CrashReport",
            "metadata": {"name": name, "labels": {TEST_LABEL: self.id}},
            "spec": spec,
        }))
        .unwrap();
        let ssa = PatchParams::apply("crashwatch-test").force();
        api.patch(name, &ssa, &Patch::Apply(&report)).await.unwrap();
        let now = Timestamp::now();
        let mut times: Vec<Timestamp> = seconds_ago
            .iter()
            .map(|&s| now - SignedDuration::from_secs(s))
            .collect();
        times.sort();
        let recent: Vec<Value> = times
            .iter()
            .rev()
            .take(5)
            .rev()
            .map(|t| json!({"time": t.to_string()}))
            .collect();
        let mut buckets = Vec::new();
        for &t in &times {
            crds::report::add_to_buckets(&mut buckets, t);
        }
        let status = json!({
            "apiVersion": "crashwatch.dev/v1alpha1",
            "kind": "CrashReport",
            "status": {
                "count": times.len(),
                "firstSeen": times.first().map(|t| t.to_string()),
                "lastSeen": times.last().map(|t| t.to_string()),
                "recent": recent,
                "buckets": buckets,
            },
        });
        api.patch_status(name, &ssa, &Patch::Apply(&status))
            .await
            .unwrap();
    }

    /// A Node.
    pub async fn node(&self, name: &str) -> Node {
        Api::<Node>::all(self.client.clone())
            .get(name)
            .await
            .unwrap()
    }

    /// This test's Nodes that are unschedulable.
    pub async fn cordoned(&self) -> Vec<String> {
        let selector = ListParams::default().labels(&format!("{TEST_LABEL}={}", self.id));
        let mut names: Vec<String> = Api::<Node>::all(self.client.clone())
            .list(&selector)
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|n| n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true))
            .filter_map(|n| n.metadata.name)
            .collect();
        names.sort();
        names
    }

    /// A policy's status, as JSON.
    pub async fn status(&self, policy: &str) -> Value {
        let policy = Api::<RemediationPolicy>::all(self.client.clone())
            .get(policy)
            .await
            .unwrap();
        serde_json::to_value(policy.status.unwrap_or_default()).unwrap()
    }

    /// The Events about `node`, as (reason, note).
    pub async fn events(&self, node: &str) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::all(self.client.clone());
        let mut events: Vec<_> = api
            .list(&ListParams::default().fields(&format!("regarding.name={node}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect();
        events.sort();
        events
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The operators of later tests need not keep reconciling this test's policies.
        let label = format!("{TEST_LABEL}={}", self.id);
        let _ = Command::new(self.cluster.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .args(["delete", "remediationpolicies", "--all", "--wait=false"])
            .output();
        let _ = Command::new(self.cluster.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.cluster.kubeconfig)
            .args(["delete", "crashreports", "-l", &label, "--wait=false"])
            .output();
    }
}

/// JSON merge of `patch` into `base`.
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, patch) => *base = patch,
    }
}

/// Polls `check` every 100 ms until it returns Some, for at most `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The real operator binary, running against the test cluster.
pub struct Operator {
    child: Child,
    /// The port of its /metrics and /healthz.
    pub port: u16,
    /// Its identity in the Lease.
    pub identity: String,
    log: PathBuf,
}

impl Operator {
    /// Starts `crashwatch-operator run` as the cluster's admin, competing for Lease `lease`
    /// in `default`.
    pub fn start(fixture: &Fixture, lease: &str, identity: &str, extra: &[&str]) -> Operator {
        let mut args = vec!["--lease-namespace", "default"];
        args.extend(extra);
        Operator::start_as(&fixture.cluster.kubeconfig, lease, identity, &args)
    }

    /// Starts `crashwatch-operator run` with the credentials in `kubeconfig`.
    pub fn start_as(
        kubeconfig: &std::path::Path,
        lease: &str,
        identity: &str,
        extra: &[&str],
    ) -> Operator {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("{identity}-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_crashwatch-operator"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,operator=debug")
            .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--lease-name", lease])
            .args(["--identity", identity])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start crashwatch-operator");
        let operator = Operator {
            child,
            port,
            identity: identity.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while operator.get("/healthz").is_none() {
            assert!(
                Instant::now() < deadline,
                "operator not healthy:\n{}",
                operator.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        operator
    }

    /// Starts the single operator of a test and waits until it leads.
    pub async fn leading(fixture: &Fixture, extra: &[&str]) -> Operator {
        let operator = Operator::start(
            fixture,
            &format!("{}-lease", fixture.id),
            &fixture.id,
            extra,
        );
        operator.wait_leading().await;
        operator
    }

    /// Waits until this operator holds the lease.
    pub async fn wait_leading(&self) {
        eventually("the operator to lead", Duration::from_secs(30), || async {
            (self.metric("crashwatch_operator_leader") == 1.0).then_some(())
        })
        .await;
    }

    /// GETs a path of its HTTP server.
    pub fn get(&self, path: &str) -> Option<String> {
        testkit::http_get(self.port, path)
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
    }

    /// The sum of every series of metric `name` whose labels contain all of `labels`.
    pub fn metric_with(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let body = self.get("/metrics").unwrap_or_default();
        testkit::metric_samples(&body)
            .into_iter()
            .filter(|(series, _)| {
                series.split('{').next() == Some(name)
                    && labels
                        .iter()
                        .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// The sum of every series of metric `name`.
    pub fn metric(&self, name: &str) -> f64 {
        self.metric_with(name, &[])
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for it to exit by itself; its exit status, or None.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Kills it with SIGKILL: no chance to release the Lease.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it with SIGTERM and waits.
    pub fn terminate(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- operator {} log ---\n{}", self.identity, self.log());
        }
    }
}
