//! Helpers shared by the integration tests of every crate: requirements that fail under CI
//! instead of skipping, the test control plane, and the workspace's binaries.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether the kernel tests can run. Under `CI=true` a missing requirement fails the test
/// instead of skipping it, so a skipped kernel test never passes CI.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and this test cannot run: {what}");
    }
    eprintln!("SKIPPED (not CI): {what}");
    false
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The test control plane started by `scripts/test.sh` (`CRASHWATCH_CONTROL_PLANE` names its
/// directory). None when there is none and this is not CI.
pub struct ControlPlane {
    /// Its directory: `env`, `kubeconfig`, logs.
    pub dir: PathBuf,
    /// The kubeconfig of its admin.
    pub kubeconfig: PathBuf,
    /// The directory holding kubectl, helm and promtool.
    pub bin: PathBuf,
}

impl ControlPlane {
    /// The running control plane, or None (a failure under CI).
    pub fn get() -> Option<ControlPlane> {
        let dir = std::env::var_os("CRASHWATCH_CONTROL_PLANE").map(PathBuf::from);
        let env = dir
            .as_ref()
            .and_then(|d| fs::read_to_string(d.join("env")).ok());
        if !require(
            "needs the test control plane: run scripts/test.sh, or set CRASHWATCH_CONTROL_PLANE to a dir started by scripts/control-plane.sh",
            env.is_some(),
        ) {
            return None;
        }
        let (dir, env) = (dir.unwrap(), env.unwrap());
        let value = |key: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{key} missing from the control plane's env"))
        };
        Some(ControlPlane {
            kubeconfig: value("KUBECONFIG"),
            bin: value("CONTROL_PLANE_BIN"),
            dir,
        })
    }

    /// Runs kubectl against the cluster; returns stdout, panicking on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let output = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Stops kube-apiserver (etcd keeps running) until the returned guard is dropped, which
    /// starts it again, also when the test fails.
    pub fn api_server_outage(&self) -> ApiServerOutage<'_> {
        self.script("stop-apiserver");
        ApiServerOutage(self)
    }

    /// Freezes kube-apiserver with SIGSTOP until the returned guard is dropped, which sends
    /// SIGCONT, also when the test fails: connections are accepted by the kernel and never
    /// answered, as behind a network blackhole, unlike a stopped server that refuses them.
    pub fn api_server_blackhole(&self) -> ApiServerBlackhole {
        let pid: i32 = fs::read_to_string(self.dir.join("kube-apiserver.pid"))
            .expect("kube-apiserver.pid")
            .trim()
            .parse()
            .expect("a pid");
        // SAFETY: kill has no memory-safety preconditions.
        let stopped = unsafe { libc::kill(pid, libc::SIGSTOP) };
        assert_eq!(stopped, 0, "SIGSTOP kube-apiserver ({pid})");
        ApiServerBlackhole(pid)
    }

    /// Runs `scripts/control-plane.sh COMMAND DIR`.
    fn script(&self, command: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/control-plane.sh");
        let status = Command::new(script)
            .arg(command)
            .arg(&self.dir)
            .status()
            .expect("control-plane.sh");
        assert!(status.success(), "control-plane.sh {command} failed");
    }

    /// Installs the committed CRDs and waits until they are served.
    pub fn install_crds(&self) {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/crashwatch-crds.yaml");
        self.kubectl(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/crashreports.crashwatch.dev",
            "crd/remediationpolicies.crashwatch.dev",
        ]);
    }
}

/// GETs `path` from a server on `127.0.0.1:port`: the status code and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The samples of a Prometheus text exposition, `name{labels}` → value.
pub fn metric_samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, value)| Some((series.to_owned(), value.parse().ok()?)))
        .collect()
}

/// Polls `done` every 20 ms until it holds; panics after `timeout`, naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A binary of another crate in this workspace, built by the same `cargo test` run
/// (`cargo test --workspace` builds every package's binaries before running tests).
pub fn workspace_binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let binary = profile_dir.join(name);
    assert!(
        binary.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build --workspace` first)",
        binary.display()
    );
    binary
}

/// kube-apiserver stopped; dropping this starts it again.
pub struct ApiServerOutage<'a>(&'a ControlPlane);

impl Drop for ApiServerOutage<'_> {
    fn drop(&mut self) {
        self.0.script("start-apiserver");
    }
}

/// kube-apiserver frozen by SIGSTOP; dropping this sends SIGCONT.
pub struct ApiServerBlackhole(i32);

impl Drop for ApiServerBlackhole {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}
