//! The debuginfod client against elfutils' real `debuginfod` server on loopback.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crds::{Address, CrashEvent, EventKind};
use node_agent::symbolize::Symbolize;
use node_agent::symbolize::debuginfod::{Debuginfod, DebuginfodError};
use node_agent::symbolize::elf::hex;
use support::{build_id, compile_crashy, free_port, have, require, split_debug, symbol_range};

/// `debuginfod` serving one directory, started in its own session; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Serves `dir` and waits until it answers 200 for `ready_build_id`.
    fn start(dir: &Path, db: &Path, ready_build_id: &str) -> Server {
        let port = free_port();
        let child = Command::new("setsid")
            .args(["debuginfod", "-F", "-L", "-t", "0", "-g", "0", "-p"])
            .arg(port.to_string())
            .arg("-d")
            .arg(db)
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start debuginfod");
        let server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        // The server answers 404 until its first scan of the directory is done.
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = format!("{}/buildid/{ready_build_id}/debuginfo", server.url);
        while Instant::now() < deadline {
            let status = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &probe])
                .output()
                .expect("curl");
            if status.stdout == b"200" {
                return server;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("debuginfod did not serve {ready_build_id} within 30 s");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the server leads its own group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A crash of `crashy` at the start of `read_null_offset`.
fn event_in(debug_file: &Path) -> CrashEvent {
    let (start, _) = symbol_range(debug_file, "read_null_offset");
    let mut event = CrashEvent::new(EventKind::Segfault);
    event.module = Some("crashy".into());
    event.module_offset = Some(Address(start)); // PIE text: file offset == address
    event
}

/// A stripped `crashy` in `dir/bin` and its debug file in `dir/served`.
fn stripped_build(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("served")).unwrap();
    let binary = dir.join("bin/crashy");
    compile_crashy(&binary, &[]);
    let debug_file = dir.join("served/crashy.debug");
    split_debug(&binary, &debug_file);
    (binary, debug_file)
}

fn requirements() -> bool {
    require(
        "needs debuginfod, curl, gcc, objcopy and readelf",
        ["debuginfod", "curl", "gcc", "objcopy", "readelf", "setsid"]
            .iter()
            .all(|t| have(t)),
    )
}

#[test]
fn a_stripped_binary_is_symbolized_through_debuginfod_and_the_file_is_cached() {
    if !requirements() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (binary, debug_file) = stripped_build(dir.path());
    let id = build_id(&binary);
    let cache = dir.path().join("cache");
    let server = Server::start(&dir.path().join("served"), &dir.path().join("db"), &id);
    // Loopback plain http: allowed explicitly.
    let client = Arc::new(
        Debuginfod::new(
            vec![server.url.clone()],
            cache.clone(),
            Duration::from_secs(10),
            true,
        )
        .unwrap(),
    );

    let mut event = event_in(&debug_file);
    support::symbolizer(&binary, Vec::new(), Some(client.clone()))
        .symbolize(&mut event)
        .expect("symbolized through debuginfod");
    let innermost = event.frames.first().expect("frames");
    assert_eq!(innermost.function.as_deref(), Some("read_null_offset"));
    assert!(
        innermost
            .file
            .as_deref()
            .is_some_and(|f| f.ends_with("crashy.c"))
            && innermost.line.is_some(),
        "DWARF, not just a symbol: {innermost:?}"
    );
    let cached = cache.join(&id).join("debuginfo");
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(&debug_file).unwrap(),
        "the cache holds the served file"
    );

    // With the server gone, the cache still answers.
    drop(server);
    let mut again = event_in(&debug_file);
    support::symbolizer(&binary, Vec::new(), Some(client))
        .symbolize(&mut again)
        .expect("symbolized from the cache");
    assert_eq!(again.frames, event.frames);
}

/// A loopback listener that counts connections and answers each with `response` (or
/// never answers when it is None).
fn counting_listener(response: Option<&'static str>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            counted.fetch_add(1, Ordering::SeqCst);
            match response {
                Some(text) => {
                    use std::io::{Read, Write};
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request);
                    let _ = stream.write_all(text.as_bytes());
                }
                None => held.push(stream), // accept, then say nothing
            }
        }
    });
    (url, count)
}

#[test]
fn a_build_id_no_server_has_is_asked_for_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, connections) = counting_listener(Some(
        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ));
    let client =
        Debuginfod::new(vec![url], dir.path().into(), Duration::from_secs(5), true).unwrap();
    let id = [0xab; 20];
    assert!(matches!(
        client.debuginfo(&id),
        Err(DebuginfodError::NotFound(_))
    ));
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    for _ in 0..3 {
        assert!(matches!(
            client.debuginfo(&id),
            Err(DebuginfodError::KnownMissing(_))
        ));
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the negative cache answered"
    );
}

#[test]
fn a_server_that_never_answers_times_out_and_is_not_cached_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (url, connections) = counting_listener(None);
    let mut client =
        Debuginfod::new(vec![url], dir.path().into(), Duration::from_secs(1), true).unwrap();
    let id = [0xcd; 20];
    let err = client.debuginfo(&id).unwrap_err();
    assert!(matches!(err, DebuginfodError::Server { .. }), "{err}");
    assert!(err.to_string().to_lowercase().contains("timeout"), "{err}");
    // The failure is remembered for a while: the next crash does not wait for the server.
    let started = Instant::now();
    let err = client.debuginfo(&[0xce; 20]).unwrap_err();
    assert!(matches!(err, DebuginfodError::ServersFailing(_)), "{err}");
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    // A failure is not a miss: once the failure has expired, the next crash asks again.
    client.failure_ttl = Duration::ZERO;
    let _ = client.debuginfo(&id);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[test]
fn plain_http_servers_need_an_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let make = |url: &str, allow_http| {
        Debuginfod::new(
            vec![url.to_owned()],
            dir.path().into(),
            Duration::from_secs(1),
            allow_http,
        )
    };
    let err = make("http://debuginfod.example.org", false).unwrap_err();
    assert!(matches!(err, DebuginfodError::InsecureUrl(_)), "{err}");
    assert!(err.to_string().contains("--debuginfod-allow-http"), "{err}");
    assert!(make("http://debuginfod.example.org", true).is_ok());
    assert!(make("https://debuginfod.example.org", false).is_ok());
    assert!(matches!(
        make("ftp://debuginfod.example.org", true),
        Err(DebuginfodError::BadUrl(_))
    ));
    // And the command line says so before it starts anything.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crashwatch-agent"))
        .args([
            "explain",
            "--debuginfod",
            "http://127.0.0.1:1",
            "crashy[1]: segfault at 0 ip 0000000000000001 sp 0000000000000002 error 4",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--debuginfod-allow-http"), "{stderr}");
}

#[test]
fn in_the_background_a_silent_server_never_blocks_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let (url, connections) = counting_listener(None);
    let client = Arc::new(
        Debuginfod::new(vec![url], dir.path().into(), Duration::from_secs(2), true)
            .unwrap()
            .fetch_in_background(),
    );
    let id = [0x5a; 20];
    let started = Instant::now();
    for _ in 0..3 {
        let err = client.lookup(&id).unwrap_err();
        assert!(matches!(err, DebuginfodError::Fetching(_)), "{err}");
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert!(client.is_fetching(&id));
    // One fetch for the three lookups, which gives up after its timeout.
    support::wait_until(
        "the background fetch to time out",
        Duration::from_secs(10),
        || !client.is_fetching(&id),
    );
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    // The failure is remembered: the next lookup starts no fetch that would wait again.
    let err = client.lookup(&[0x5b; 20]).unwrap_err();
    assert!(matches!(err, DebuginfodError::ServersFailing(_)), "{err}");
    assert!(!client.is_fetching(&[0x5b; 20]));
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the server is not asked again yet"
    );
}

#[test]
fn a_server_sending_the_wrong_file_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _) = counting_listener(Some(
        "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nnot an ELF!!",
    ));
    let client =
        Debuginfod::new(vec![url], dir.path().into(), Duration::from_secs(5), true).unwrap();
    let id = [0xef; 20];
    assert!(matches!(
        client.debuginfo(&id),
        Err(DebuginfodError::WrongFile { .. })
    ));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join(hex(&id)))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(leftovers.is_empty(), "nothing kept: {leftovers:?}");
    // A hostile build-id cannot escape the cache directory.
    assert!(matches!(
        client.debuginfo(&[]),
        Err(DebuginfodError::BadBuildId(_))
    ));
}

#[test]
fn fetched_in_the_background_the_next_crash_is_symbolized_and_the_cache_stays_bounded() {
    if !requirements() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (binary, debug_file) = stripped_build(dir.path());
    // A second build with another build-id, served from the same directory.
    let other = dir.path().join("bin-o0");
    std::fs::create_dir_all(&other).unwrap();
    let other_binary = other.join("crashy");
    compile_crashy(&other_binary, &["-O0"]);
    let other_debug = dir.path().join("served/crashy-o0.debug");
    split_debug(&other_binary, &other_debug);
    let (id, other_id) = (build_id(&binary), build_id(&other_binary));
    assert_ne!(id, other_id);
    let server = Server::start(&dir.path().join("served"), &dir.path().join("db"), &id);
    let cache = dir.path().join("cache");
    let mut client = Debuginfod::new(
        vec![server.url.clone()],
        cache.clone(),
        Duration::from_secs(10),
        true,
    )
    .unwrap()
    .fetch_in_background();
    // Room for one of the two debug files only.
    let sizes = [&debug_file, &other_debug].map(|f| std::fs::metadata(f).unwrap().len());
    client.cache_limit_bytes = sizes[0].max(sizes[1]) + sizes[0].min(sizes[1]) / 2;
    let client = Arc::new(client);

    // The first crash is reported at once, unsymbolized, and says why.
    let symbolizer = support::symbolizer(&binary, Vec::new(), Some(client.clone()));
    let mut first = event_in(&debug_file);
    let err = symbolizer.symbolize(&mut first).unwrap_err();
    assert_eq!(err.reason(), "debuginfod_pending", "{err}");
    assert!(first.frames.is_empty());
    support::wait_until("the background fetch", Duration::from_secs(20), || {
        cache.join(&id).join("debuginfo").is_file()
    });
    // The next crash of the same binary is symbolized from the fetched file.
    let mut second = event_in(&debug_file);
    symbolizer
        .symbolize(&mut second)
        .expect("symbolized once fetched");
    assert_eq!(
        second.frames.first().and_then(|f| f.function.as_deref()),
        Some("read_null_offset")
    );

    // Fetching the other build's file evicts the least recently used one.
    let mut other_event = event_in(&other_debug);
    let _ = support::symbolizer(&other_binary, Vec::new(), Some(client.clone()))
        .symbolize(&mut other_event);
    support::wait_until("the second fetch", Duration::from_secs(20), || {
        cache.join(&other_id).join("debuginfo").is_file()
    });
    support::wait_until("the eviction", Duration::from_secs(5), || {
        !cache.join(&id).join("debuginfo").exists()
    });
    let held: u64 = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|d| std::fs::metadata(d.unwrap().path().join("debuginfo")).ok())
        .map(|m| m.len())
        .sum();
    assert!(held <= client.cache_limit_bytes, "{held} bytes cached");
}

/// The acceptance of the silent-server defect, as root on the real kernel: with a
/// debuginfod server that accepts connections and never answers, a crash that needs it
/// does not hold up the report of the next, unrelated crash; and it is reported itself, at
/// once, unsymbolized, with the reason counted.
#[test]
fn a_silent_debuginfod_server_does_not_hold_up_the_kernel_log() {
    let Some(test) = support::KernelTest::begin() else {
        return;
    };
    if !requirements() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A stripped binary whose debug file only debuginfod could have.
    let (built, _) = stripped_build(dir.path());
    let stripped = dir.path().join("bin/crashy-stripped");
    std::fs::rename(&built, &stripped).unwrap();
    let (url, connections) = counting_listener(None);
    support::start_at_the_end_of_the_log(test.state.path());
    let mut agent = support::Agent::start(
        test.state.path(),
        &[
            "--binary",
            stripped.to_str().unwrap(),
            "--binary",
            support::crashy().to_str().unwrap(),
            "--debuginfod",
            &url,
            "--debuginfod-allow-http",
            "--debuginfod-timeout",
            "30",
            "--debuginfod-cache",
            dir.path().join("cache").to_str().unwrap(),
        ],
    );
    let output = support::run_to_crash(&stripped, "null");
    let needs_debuginfod: u32 = support::printed(&output, "pid").unwrap().parse().unwrap();
    let unrelated = support::crash("null");
    let crashed = Instant::now();
    let event = agent.wait_for("the unrelated crash", Duration::from_secs(3), |e| {
        e.pid == Some(unrelated.logged_id)
    });
    let latency = crashed.elapsed();
    eprintln!("the unrelated crash was reported {latency:?} after it happened");
    assert_eq!(
        event.frames.first().and_then(|f| f.function.as_deref()),
        Some("read_null_offset"),
        "the unrelated crash is symbolized from its own DWARF"
    );
    let waiting = agent.wait_for(
        "the crash needing debuginfod",
        Duration::from_secs(1),
        |e| e.pid == Some(needs_debuginfod),
    );
    assert_eq!(waiting.comm.as_deref(), Some("crashy-stripped"));
    assert!(waiting.frames.is_empty(), "{waiting:?}");
    assert!(
        waiting.build_id.is_some(),
        "the build-id to fetch is known: {waiting:?}"
    );
    assert_eq!(
        agent.labelled(
            "crashwatch_symbolization_failures_total",
            "reason",
            "debuginfod_pending"
        ),
        1.0
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the server was asked"
    );
}
