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
    let client = Arc::new(Debuginfod::new(
        vec![server.url.clone()],
        cache.clone(),
        Duration::from_secs(10),
    ));

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
    let client = Debuginfod::new(vec![url], dir.path().into(), Duration::from_secs(5));
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
    let client = Debuginfod::new(vec![url], dir.path().into(), Duration::from_secs(1));
    let id = [0xcd; 20];
    let err = client.debuginfo(&id).unwrap_err();
    assert!(matches!(err, DebuginfodError::Server { .. }), "{err}");
    assert!(err.to_string().to_lowercase().contains("timeout"), "{err}");
    // A failure is not a miss: the next crash asks again.
    let _ = client.debuginfo(&id);
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[test]
fn a_server_sending_the_wrong_file_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _) = counting_listener(Some(
        "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nnot an ELF!!",
    ));
    let client = Debuginfod::new(vec![url], dir.path().into(), Duration::from_secs(5));
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
