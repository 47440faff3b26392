//! `crashwatch-agent explain` as a user runs it.

mod support;

use std::process::{Command, Output};

const SEED: &str = "qemu-nbd[13647]: segfault at 100 ip 0000561c8817d1c7 sp 00007fc8f1ce9c00 error 4 in qemu-nbd[561c88107000+155000]";

fn agent(args: &[&str], stdin: &str) -> Output {
    support::output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_crashwatch-agent")).args(args),
        stdin.as_bytes(),
    )
}

#[test]
fn explains_a_line_given_as_an_argument() {
    let out = agent(&["explain", "--no-symbolize", SEED], "");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("Segfault (NULL pointer dereference): qemu-nbd (pid 13647)"),
        "{text}"
    );
    assert!(text.contains("0x4 (user, read, not-present)"), "{text}");
}

#[test]
fn reads_standard_input_in_any_format_and_prints_json_lines() {
    let input = format!(
        "Nov 24 20:50:35 node-7 kernel: [  605.503265] {SEED}\nnoise line\n[  606.1] block nbd0: Connection timed out\n"
    );
    let out = agent(&["explain", "--json", "-"], &input);
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["kind"], "Segfault");
    assert_eq!(events[0]["vmaStart"], "0x561c88107000");
    assert_eq!(
        events[0]["errorBits"],
        serde_json::json!(["user", "read", "not-present"])
    );
    assert_eq!(events[1]["kind"], "NbdError");
    assert_eq!(events[1]["device"], "nbd0");
}

#[test]
fn input_without_crashes_is_not_an_error() {
    let out = agent(&["explain"], "just some text\n");
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no crash or hang found"));
}

#[test]
fn bad_options_fail_with_a_clear_message() {
    let out = agent(&["explain", "--no-such-option"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-option"));
    let out = agent(&["run", "--standalone", "--hang-threshold=-1"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--hang-threshold must be a positive number"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent(
        &[
            "run",
            "--standalone",
            "--kmsg",
            "/nonexistent/kmsg",
            "--metrics-addr",
            "127.0.0.1:0",
            "--node-name",
            "n",
        ],
        "",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot open /nonexistent/kmsg"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn invalid_utf8_input_is_read_not_rejected() {
    let mut line =
        b"caf\xe9[7]: segfault at 0 ip 0000000000000001 sp 0000000000000002 error 4\n".to_vec();
    line.extend_from_slice(SEED.as_bytes());
    let out = support::output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_crashwatch-agent")).args(["explain", "--json"]),
        &line,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);
}

#[test]
fn a_failed_symbolization_is_said_once_and_the_event_still_printed() {
    let empty = tempfile::tempdir().unwrap();
    let out = agent(
        &[
            "explain",
            "--json",
            "--root",
            empty.path().to_str().unwrap(),
            SEED,
        ],
        "",
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.matches("not symbolized").count(), 1, "{stderr}");
    assert!(
        stderr.contains("no binary named qemu-nbd was found; pass --binary or --search-path"),
        "{stderr}"
    );
}

// https://github.com/balena-os/meta-balena/issues/1182 (aarch64). 0xf81f0ffe read by hand:
// STR (immediate, pre-index), 64-bit, imm9 = -16, Rn = sp, Rt = x30.
#[test]
fn an_arm64_code_word_is_decoded_into_the_instruction_field() {
    let input = "[   10.620694] os-config[959]: undefined instruction: pc=00000000003ed2e4\n\
                 [   10.627381] Code: aa1e03e2 b90013e3 910043e3 d61f01e0 (f81f0ffe) \n";
    let out = agent(&["explain", "--no-symbolize", "--json", "-"], input);
    assert!(out.status.success());
    let event: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(event["kind"], "InvalidOpcode");
    assert_eq!(event["instruction"], "str x30, [sp, #-0x10]!");
}

#[test]
fn an_extra_search_path_adds_to_the_default_one() {
    if !support::require(
        "needs gcc and nm",
        support::have("gcc") && support::have("nm"),
    ) {
        return;
    }
    // A host root whose /usr/bin (a default directory) holds crashy, and an extra directory
    // that holds nothing.
    let root = tempfile::tempdir().unwrap();
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(root.path().join("opt/extra")).unwrap();
    let binary = bin.join("crashy");
    support::compile_crashy(&binary, &[]);
    let (offset, _) = support::symbol_range(&binary, "read_null_offset");
    let line = format!(
        "crashy[42]: segfault at 100 ip 000055555555{offset:04x} sp 00007ffc75ee83d8 error 4 in crashy[{offset:x},555555550000+2000]"
    );
    let out = agent(
        &[
            "explain",
            "--json",
            "--root",
            root.path().to_str().unwrap(),
            "--search-path",
            "/opt/extra",
            &line,
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let event: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        event["binaryPath"],
        binary.to_str().unwrap(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(event["frames"][0]["function"], "read_null_offset");
}
