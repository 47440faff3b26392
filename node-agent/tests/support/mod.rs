//! Shared helpers for tests that drive the real kernel and the real agent binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crds::CrashEvent;
#[allow(unused_imports)]
pub use testkit::{ControlPlane, free_port, require, wait_until};

pub mod stuck;

/// Kernel tests share sysctls and the kernel log: they run one at a time.
pub fn kernel_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Root, a readable `/dev/kmsg` and writable sysctls.
pub fn require_kernel() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require("needs root", root)
        && require(
            "needs a readable /dev/kmsg",
            fs::File::open("/dev/kmsg").is_ok(),
        )
        && require(
            "needs writable sysctls",
            fs::OpenOptions::new()
                .write(true)
                .open("/proc/sys/kernel/printk_ratelimit")
                .is_ok(),
        )
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Sets a sysctl and restores the old value when dropped (also when a test panics).
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    /// `name` as under /proc/sys, for example `kernel/printk_ratelimit`.
    pub fn set(name: &str, value: &str) -> Sysctl {
        let path = Path::new("/proc/sys").join(name);
        let old =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        fs::write(&path, value)
            .unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
        Sysctl {
            path,
            old: old.trim().to_owned(),
        }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.old) {
            eprintln!(
                "FAILED to restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

/// A binary of the workspace's release build (`cargo build --release`).
pub fn release_binary(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name)
}

/// Copies the release agent into `share` (the fault VM's 9p share), and the libraries `ldd`
/// lists into `share/lib`, for the guest to run it with
/// `lib/ld-linux-x86-64.so.2 --library-path lib crashwatch-agent`.
pub fn stage_release_agent(share: &Path) {
    let agent = release_binary("crashwatch-agent");
    fs::copy(&agent, share.join("crashwatch-agent")).unwrap();
    let lib = share.join("lib");
    fs::create_dir_all(&lib).unwrap();
    let ldd = Command::new("ldd").arg(&agent).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(path) = path {
            let name = if line.contains("ld-linux") {
                "ld-linux-x86-64.so.2".into()
            } else {
                path.file_name().unwrap().to_owned()
            };
            fs::copy(&path, lib.join(name)).unwrap();
        }
    }
    assert!(lib.join("ld-linux-x86-64.so.2").exists(), "{ldd:?}");
}

/// The test program, compiled once per test process with gcc -O2 -g.
pub fn crashy() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("crashwatch-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("crashy");
        compile_crashy(&binary, &[]);
        binary
    })
}

/// Compiles the test program to `out` with `gcc -O2 -g -pthread` and `extra` flags (later
/// flags win, so `-O0` in `extra` overrides `-O2`).
pub fn compile_crashy(out: &Path, extra: &[&str]) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/crashy.c");
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-pthread"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(&source)
        .status()
        .expect("gcc");
    assert!(status.success(), "gcc {extra:?} failed");
}

/// Runs `program` with `args`, asserts it succeeded, and returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Moves `binary`'s debug information into `debug_file` and strips `binary`.
pub fn split_debug(binary: &Path, debug_file: &Path) {
    run(
        "objcopy",
        &[
            "--only-keep-debug",
            binary.to_str().unwrap(),
            debug_file.to_str().unwrap(),
        ],
    );
    run("strip", &["--strip-all", binary.to_str().unwrap()]);
}

/// Runs `command` with `stdin` as its standard input; returns what it printed.
pub fn output_with_stdin(command: &mut Command, stdin: &[u8]) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// `binary`'s GNU build-id in hex, from binutils' readelf.
pub fn build_id(binary: &Path) -> String {
    run("readelf", &["-n", binary.to_str().unwrap()])
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .expect("the binary has a build-id")
}

/// A symbolizer for `binary`, looking for debug files under `debug_dirs` and, if given,
/// asking `debuginfod`.
pub fn symbolizer(
    binary: &Path,
    debug_dirs: Vec<PathBuf>,
    debuginfod: Option<std::sync::Arc<node_agent::symbolize::debuginfod::Debuginfod>>,
) -> node_agent::symbolize::Symbolizer {
    node_agent::symbolize::Symbolizer::new(
        node_agent::symbolize::Places {
            root: "/".into(),
            proc_root: "/proc".into(),
            binaries: vec![binary.to_owned()],
            search_paths: Vec::new(),
            debug_dirs,
            debuginfod,
        },
        64 << 20,
    )
}

/// Moves `debug_file` (split from `binary`) to `DEBUG_DIR/.build-id/xx/rest.debug`.
pub fn install_by_build_id(binary: &Path, debug_file: &Path, debug_dir: &Path) -> PathBuf {
    let id = build_id(binary);
    let place = debug_dir
        .join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    fs::create_dir_all(place.parent().unwrap()).unwrap();
    fs::rename(debug_file, &place).unwrap();
    place
}

/// Runs `binary ARG` until it dies of a signal; returns what it printed.
pub fn run_to_crash(binary: &Path, arg: &str) -> String {
    let output = Command::new(binary)
        .arg(arg)
        .stderr(Stdio::null())
        .output()
        .expect("run the crashing program");
    assert!(
        output.status.code().is_none(),
        "{} {arg} did not die of a signal: {:?}",
        binary.display(),
        output.status
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of `KEY=value` in a program's output.
pub fn printed<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

/// A crash caused for real: the ids the program printed before it died.
#[derive(Debug, Clone, Copy)]
pub struct Crash {
    /// The process id.
    pub pid: u32,
    /// The id the kernel logs: the thread id for the thread mode, else the pid.
    pub logged_id: u32,
}

/// Runs `crashy MODE` and returns its ids; asserts it died of a signal.
pub fn crash(mode: &str) -> Crash {
    let output = run_to_crash(crashy(), mode);
    let id = |key: &str| printed(&output, key).map(|v| v.parse().unwrap());
    let pid = id("pid").expect("crashy printed its pid");
    Crash {
        pid,
        logged_id: id("tid").unwrap_or(pid),
    }
}

/// Crashes crashy `count` times (NULL read), as fast as processes start, printing nothing.
pub fn crash_storm(count: u64) {
    for _ in 0..count {
        Command::new(crashy())
            .arg("null")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
    }
}

/// The `[start, end)` address range of `symbol` in `binary`, from binutils' `nm -S`.
pub fn symbol_range(binary: &Path, symbol: &str) -> (u64, u64) {
    let output = Command::new("nm")
        .arg("-S")
        .arg(binary)
        .output()
        .expect("nm");
    let text = String::from_utf8_lossy(&output.stdout);
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() == 4 && fields[3] == symbol {
            let start = u64::from_str_radix(fields[0], 16).unwrap();
            let size = u64::from_str_radix(fields[1], 16).unwrap();
            return (start, start + size);
        }
    }
    panic!("{symbol} not in nm -S {}", binary.display());
}

/// The real agent, running `run --standalone` as a child process.
pub struct Agent {
    child: Child,
    events: Receiver<CrashEvent>,
    /// Every event received so far.
    pub seen: Vec<CrashEvent>,
    /// Where /metrics is served.
    pub metrics_port: u16,
    log: PathBuf,
    node: String,
}

impl Agent {
    /// Starts the agent in standalone mode with a state dir and extra arguments.
    pub fn start(state_dir: &Path, extra: &[&str]) -> Agent {
        let mut args = vec!["--standalone", "--node-name", "test-node"];
        args.extend(extra);
        Agent::spawn(state_dir, &args, None, None, true)
    }

    /// Like [`Agent::start`], but the agent runs inside `cgroup` from its first instruction
    /// (it joins the cgroup before it executes the agent binary).
    pub fn start_in_cgroup(state_dir: &Path, extra: &[&str], cgroup: &MemoryCgroup) -> Agent {
        let mut args = vec!["--standalone", "--node-name", "test-node"];
        args.extend(extra);
        Agent::spawn(state_dir, &args, None, Some(cgroup), true)
    }

    /// Starts the agent publishing CrashReports for `node` to the cluster of `kubeconfig`
    /// (one write per object per second unless `extra` sets `--publish-interval`), and
    /// waits until it is ready.
    pub fn start_publishing(
        state_dir: &Path,
        node: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Agent {
        Agent::publishing(state_dir, node, kubeconfig, extra, true)
    }

    /// Like [`Agent::start_publishing`], but waits only until the agent is alive: it is
    /// not ready while the API server is down.
    pub fn start_publishing_during_outage(
        state_dir: &Path,
        node: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Agent {
        Agent::publishing(state_dir, node, kubeconfig, extra, false)
    }

    /// Like [`Agent::start_publishing`], but run through `wrapper` (a command and its
    /// arguments, for example `unshare` into a time namespace); the agent is killed with it.
    pub fn start_publishing_wrapped(
        state_dir: &Path,
        node: &str,
        kubeconfig: &Path,
        extra: &[&str],
        wrapper: &[&str],
    ) -> Agent {
        let mut args = vec!["--node-name", node, "--publish-interval", "1"];
        args.extend(extra);
        Agent::spawn_wrapped(state_dir, &args, Some(kubeconfig), None, true, wrapper)
    }

    fn publishing(
        state_dir: &Path,
        node: &str,
        kubeconfig: &Path,
        extra: &[&str],
        ready: bool,
    ) -> Agent {
        let mut args = vec!["--node-name", node];
        if !extra.contains(&"--publish-interval") {
            args.extend(["--publish-interval", "1"]);
        }
        args.extend(extra);
        Agent::spawn(state_dir, &args, Some(kubeconfig), None, ready)
    }

    fn spawn(
        state_dir: &Path,
        args: &[&str],
        kubeconfig: Option<&Path>,
        cgroup: Option<&MemoryCgroup>,
        ready: bool,
    ) -> Agent {
        Agent::spawn_wrapped(state_dir, args, kubeconfig, cgroup, ready, &[])
    }

    fn spawn_wrapped(
        state_dir: &Path,
        args: &[&str],
        kubeconfig: Option<&Path>,
        cgroup: Option<&MemoryCgroup>,
        ready: bool,
        wrapper: &[&str],
    ) -> Agent {
        let metrics_port = free_port();
        let log = state_dir.join(format!("agent-{metrics_port}.log"));
        let agent = env!("CARGO_BIN_EXE_crashwatch-agent");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(agent);
                command
            }
            None => Command::new(agent),
        };
        if let Some(kubeconfig) = kubeconfig {
            command.env("KUBECONFIG", kubeconfig);
        }
        if let Some(cgroup) = cgroup {
            cgroup.enter_on_exec(&mut command);
        }
        let mut child = command
            .args(["run", "--state-dir"])
            .arg(state_dir)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start crashwatch-agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event: CrashEvent = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"));
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let node = args
            .iter()
            .position(|a| *a == "--node-name")
            .map(|i| args[i + 1].to_owned())
            .unwrap_or_default();
        let mut agent = Agent {
            node,
            child,
            events,
            seen: Vec::new(),
            metrics_port,
            log,
        };
        agent.wait_until(if ready { "/readyz" } else { "/healthz" });
        agent
    }

    /// Waits until `/readyz` says ok.
    pub fn wait_ready(&mut self) {
        self.wait_until("/readyz");
    }

    /// Whether `/readyz` says ok now.
    pub fn is_ready(&self) -> bool {
        self.get("/readyz")
            .is_some_and(|body| body.starts_with("ok"))
    }

    fn wait_until(&mut self, endpoint: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .get(endpoint)
                .is_some_and(|body| body.starts_with("ok"))
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent's {endpoint} not ok after 10 s:\n{}", self.log());
    }

    /// Waits up to `timeout` for an event matching `predicate` and returns it.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&CrashEvent) -> bool,
    ) -> CrashEvent {
        if let Some(event) = self.seen.iter().find(|e| predicate(e)) {
            return event.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if predicate(&event) {
                        return event;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no event {what} within {timeout:?}; agent log:\n{}",
                    self.log()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "agent output ended before {what}; agent log:\n{}",
                    self.log()
                ),
            }
        }
    }

    /// Collects every event that arrives within `period`.
    pub fn drain_for(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while let Ok(event) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(event);
        }
    }

    /// GETs a path from the agent's HTTP endpoint.
    pub fn get(&self, path: &str) -> Option<String> {
        testkit::http_get(self.metrics_port, path).map(|(_, body)| body)
    }

    /// The agent's metrics, `name{labels}` → value.
    pub fn metrics(&self) -> HashMap<String, f64> {
        testkit::metric_samples(&self.get("/metrics").expect("/metrics"))
    }

    /// The sum of a labelled counter over every series of one process.
    pub fn process_counter(&self, name: &str, process: &str) -> f64 {
        self.labelled(name, "process", process)
    }

    /// The sum of a counter over every series with `label="value"`.
    pub fn labelled(&self, name: &str, label: &str, value: &str) -> f64 {
        let prefix = format!("{name}{{");
        let label = format!("{label}=\"{value}\"");
        self.metrics()
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) && k.contains(&label))
            .map(|(_, v)| v)
            .sum()
    }

    /// One counter's value, ignoring labels other than `node`.
    pub fn counter(&self, name: &str) -> f64 {
        let key = format!("{name}{{node=\"{}\"}}", self.node);
        *self
            .metrics()
            .get(&key)
            .unwrap_or_else(|| panic!("no metric {key}"))
    }

    /// Sends SIGTERM and returns how long the agent took to exit.
    pub fn stop(mut self) -> Duration {
        let started = Instant::now();
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "agent exited with {status}:\n{}",
            self.log()
        );
        started.elapsed()
    }

    /// Kills the agent with SIGKILL: no chance to store its cursor or flush anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the agent to exit; its exit status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the agent process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's CPU time so far (user + system) and its resident memory now, from
    /// `/proc/PID/stat` and `/proc/PID/status`.
    pub fn resources(&self) -> (Duration, u64) {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu = (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks;
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
        (Duration::from_secs_f64(cpu), rss_kib * 1024)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes one line into the kernel log as user space does (a new open per line, so the
/// per-fd rate limit never applies).
pub fn write_kmsg(line: &str) {
    let mut kmsg = fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("open /dev/kmsg for writing");
    kmsg.write_all(line.as_bytes()).expect("write /dev/kmsg");
}

/// The sequence number of the newest record in the kernel's ring.
pub fn newest_kmsg_seq() -> u64 {
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .unwrap();
    let mut buffer = vec![0u8; 16384];
    let mut newest = 0;
    loop {
        match kmsg.read(&mut buffer) {
            Ok(n) => {
                if let Ok(record) = node_agent::kmsg::parse_record(&buffer[..n]) {
                    newest = record.seq;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return newest,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) => panic!("reading /dev/kmsg: {e}"),
        }
    }
}

/// Makes the agent of `state_dir` start after everything already in the kernel log.
pub fn start_at_the_end_of_the_log(state_dir: &Path) {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let cursor = serde_json::json!({ "bootId": boot_id.trim(), "lastSeq": newest_kmsg_seq() });
    fs::write(state_dir.join("kmsg-cursor.json"), cursor.to_string()).unwrap();
}

/// The CrashReports of `node` in the test cluster, as JSON.
pub fn reports_of(cluster: &ControlPlane, node: &str) -> Vec<serde_json::Value> {
    let list: serde_json::Value =
        serde_json::from_str(&cluster.kubectl(&["get", "crashreports", "-o", "json"])).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["spec"]["nodeName"] == node)
        .cloned()
        .collect()
}

/// The sequence number of the oldest record still in the kernel's ring.
pub fn oldest_kmsg_seq() -> u64 {
    let mut kmsg = fs::File::open("/dev/kmsg").unwrap();
    let mut buffer = vec![0u8; 16384];
    let n = kmsg.read(&mut buffer).unwrap();
    let record = node_agent::kmsg::parse_record(&buffer[..n]).unwrap();
    record.seq
}

/// The common start of a crash test: the kernel lock, the requirements, an unlimited printk
/// rate (restored when dropped) and a fresh state dir. None when the test is skipped.
/// Fields drop in order: the state dir, then the sysctl, then the lock.
pub struct KernelTest {
    /// The agent's state dir.
    pub state: tempfile::TempDir,
    _unlimited: Sysctl,
    _lock: MutexGuard<'static, ()>,
}

impl KernelTest {
    /// Takes the lock and checks the requirements.
    pub fn begin() -> Option<KernelTest> {
        let lock = kernel_lock();
        if !require_kernel() {
            return None;
        }
        Some(KernelTest {
            state: tempfile::tempdir().unwrap(),
            _unlimited: Sysctl::set("kernel/printk_ratelimit", "0"),
            _lock: lock,
        })
    }
}

/// A cgroup v1 memory cgroup made for one test: its limit, its OOM kill count; removed
/// when dropped (its remaining processes are killed first).
pub struct MemoryCgroup {
    /// `/sys/fs/cgroup/memory/NAME`.
    pub path: PathBuf,
}

/// Root, and the cgroup v1 memory controller at `/sys/fs/cgroup/memory`.
pub fn require_memory_cgroup() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require("needs root", root)
        && require(
            "needs the cgroup v1 memory controller at /sys/fs/cgroup/memory",
            Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists(),
        )
}

impl MemoryCgroup {
    /// Makes `command`'s process join this cgroup before it executes, so that everything it
    /// allocates is charged here.
    pub fn enter_on_exec(&self, command: &mut Command) {
        use std::os::unix::process::CommandExt;
        let procs = std::ffi::CString::new(
            self.path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: between fork and exec the closure calls only async-signal-safe
        // functions (open, write, close) on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Creates `/sys/fs/cgroup/memory/NAME` (unique per test process) limited to `limit` bytes.
    pub fn create(name: &str, limit: u64) -> MemoryCgroup {
        let path = Path::new("/sys/fs/cgroup/memory")
            .join(format!("crashwatch-test-{name}-{}", std::process::id()));
        if path.exists() {
            drop(MemoryCgroup { path: path.clone() });
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let cgroup = MemoryCgroup { path };
        fs::write(cgroup.path.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        cgroup
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.path.join(file)).unwrap_or_default()
    }

    /// How many processes the kernel's OOM killer killed in this cgroup (`oom_kill` in
    /// `memory.oom_control`).
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.oom_control")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .map(|v| v.trim().parse().unwrap())
            .expect("memory.oom_control has oom_kill")
    }

    /// The largest memory use seen (`memory.max_usage_in_bytes`).
    pub fn max_usage(&self) -> u64 {
        self.read("memory.max_usage_in_bytes")
            .trim()
            .parse()
            .unwrap()
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        self.read("cgroup.procs")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // A cgroup with processes cannot be removed: kill what is left (only this test's
        // processes were ever put here), then wait until it is empty.
        for pid in self.pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = fs::remove_dir(&self.path) {
            if Instant::now() >= deadline {
                eprintln!("FAILED to remove cgroup {}: {e}", self.path.display());
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A core_pattern handler of the test's own, as systemd-coredump or apport would be on a
/// node: a script that keeps every dump it receives as `cores/core.PID`. The old
/// `core_pattern` and `core_pipe_limit` come back when this drops.
pub struct PreviousHandler {
    /// The pattern it set.
    pub pattern: String,
    cores: PathBuf,
    _pattern: Sysctl,
    _pipe_limit: Sysctl,
}

impl PreviousHandler {
    /// Writes the script into `dir` and points `core_pattern` at it.
    pub fn install(dir: &Path) -> PreviousHandler {
        use std::os::unix::fs::PermissionsExt;
        let cores = dir.join("cores");
        fs::create_dir_all(&cores).unwrap();
        let script = dir.join("previous-handler");
        fs::write(
            &script,
            format!("#!/bin/sh\ncat > {}/core.$1\n", cores.display()),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let pattern = format!("|{} %P", script.display());
        PreviousHandler {
            _pipe_limit: Sysctl::set("kernel/core_pipe_limit", "0"),
            _pattern: Sysctl::set("kernel/core_pattern", &pattern),
            pattern,
            cores,
        }
    }

    /// The dump kept for process `pid`, once complete (a valid ELF core).
    pub fn wait_core(&self, pid: u64) -> PathBuf {
        let path = self.cores.join(format!("core.{pid}"));
        wait_until(
            "the previous handler's dump",
            Duration::from_secs(20),
            || fs::read(&path).is_ok_and(|b| b.len() > 64 && &b[..4] == b"\x7fELF" && b[16] == 4),
        );
        path
    }
}

/// The kernel's `core_pattern` now.
pub fn core_pattern() -> String {
    fs::read_to_string("/proc/sys/kernel/core_pattern")
        .unwrap()
        .trim_end()
        .to_owned()
}

/// One frame of gdb's `bt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GdbFrame {
    /// The function gdb names.
    pub function: String,
    /// The source file after ` at `, empty without one.
    pub file: String,
    /// The source line, 0 without one.
    pub line: u64,
}

/// gdb's `bt` of `core` with `binary`, innermost first (to main, as gdb stops there).
pub fn gdb_backtrace(binary: &Path, core: &Path) -> Vec<GdbFrame> {
    let output = run(
        "gdb",
        &[
            "-batch",
            "-nx",
            "-ex",
            "bt",
            binary.to_str().unwrap(),
            core.to_str().unwrap(),
        ],
    );
    // gdb prints frame #0 once as it loads the core, then the whole `bt`.
    let bt = output
        .rfind("\n#0 ")
        .map_or(output.as_str(), |at| &output[at + 1..]);
    bt.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            // "#1  0x000055d0c0c4a196 in charge (order=...) at /path/checkout.c:26"
            let rest = l.split_once("  ").map_or(l, |(_, r)| r);
            let rest = match rest.split_once(" in ") {
                Some((address, r)) if address.starts_with("0x") => r,
                _ => rest,
            };
            let function = rest.split(" (").next().unwrap().to_owned();
            let (file, line) = rest
                .rsplit_once(" at ")
                .and_then(|(_, at)| at.rsplit_once(':'))
                .map_or((String::new(), 0), |(file, line)| {
                    (file.to_owned(), line.trim().parse().unwrap_or(0))
                });
            GdbFrame {
                function,
                file,
                line,
            }
        })
        .collect()
}
