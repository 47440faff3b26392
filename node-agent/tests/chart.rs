//! The Helm chart against real helm, promtool, kubectl and the test control plane.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::ControlPlane;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/crashwatch")
}

/// Runs a tool of the control plane's bin dir; returns (success, stdout + stderr).
fn tool(cluster: &ControlPlane, program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(cluster.bin.join(program))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn ok(cluster: &ControlPlane, program: &str, args: &[&str]) -> String {
    let (success, text) = tool(cluster, program, args);
    assert!(success, "{program} {args:?}:\n{text}");
    text
}

/// Every optional feature on.
const ALL_ON: &str = "operator.enabled=true,admissionPolicy.enabled=true,defaultPolicy.enabled=true,monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,monitoring.prometheusRule.enabled=true,monitoring.dashboard.enabled=true,monitoring.serviceMonitor.additionalLabels.release=kps";

fn kinds(rendered: &str) -> BTreeSet<String> {
    rendered
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_chart_lints_and_renders_with_defaults_and_with_everything_on() {
    let Some(cluster) = ControlPlane::get() else {
        return;
    };
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let lint = ok(&cluster, "helm", &["lint", chart]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    assert!(
        !lint.contains("[WARNING]") && !lint.contains("[ERROR]"),
        "{lint}"
    );

    let defaults = kinds(&ok(&cluster, "helm", &["template", "t", chart]));
    for kind in [
        "DaemonSet",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert!(defaults.contains(kind), "{kind} missing: {defaults:?}");
    }
    for kind in [
        "ServiceMonitor",
        "PrometheusRule",
        "RemediationPolicy",
        "ConfigMap",
    ] {
        assert!(!defaults.contains(kind), "{kind} is optional: {defaults:?}");
    }
    let everything = ok(&cluster, "helm", &["template", "t", chart, "--set", ALL_ON]);
    let all = kinds(&everything);
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "RemediationPolicy",
        "ConfigMap",
    ] {
        assert!(all.contains(kind), "{kind} missing: {all:?}");
    }
    assert!(
        everything.contains("grafana_dashboard: \"1\""),
        "sidecar label"
    );
    assert!(everything.contains("release: kps"), "additionalLabels");
    // The operator's alerts need its metrics scraped: a Service and a ServiceMonitor of its own.
    assert_eq!(
        everything.matches("kind: ServiceMonitor").count(),
        2,
        "a ServiceMonitor for the agent and one for the operator"
    );
    assert!(everything.contains("name: t-crashwatch-operator-metrics"));
    assert!(
        everything.contains("dryRun: true"),
        "the default policy starts in dry run"
    );

    // The schema refuses nonsense.
    let (accepted, text) = tool(
        &cluster,
        "helm",
        &["template", "t", chart, "--set", "agent.metricsPort=99999"],
    );
    assert!(!accepted && text.contains("metricsPort"), "{text}");
}

#[test]
fn the_alert_rules_pass_promtool_and_the_chart_renders_them_verbatim() {
    let Some(cluster) = ControlPlane::get() else {
        return;
    };
    let files = chart().join("files");
    let check = ok(
        &cluster,
        "promtool",
        &[
            "check",
            "rules",
            files.join("alerts.yaml").to_str().unwrap(),
        ],
    );
    assert!(check.contains("SUCCESS: 10 rules found"), "{check}");
    let tests = ok(
        &cluster,
        "promtool",
        &[
            "test",
            "rules",
            files.join("alerts.test.yaml").to_str().unwrap(),
        ],
    );
    assert!(tests.contains("SUCCESS"), "{tests}");

    // The PrometheusRule's spec, extracted from the rendering, passes promtool too.
    let rendered = ok(
        &cluster,
        "helm",
        &[
            "template",
            "t",
            chart().to_str().unwrap(),
            "--show-only",
            "templates/monitoring.yaml",
            "--set",
            "monitoring.prometheusRule.enabled=true",
        ],
    );
    let rule = rendered
        .split("\n---")
        .find(|doc| doc.contains("kind: PrometheusRule"))
        .expect("a PrometheusRule");
    let spec = rule.split_once("\nspec:\n").unwrap().1;
    let unindented: String = spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("alerts.yaml"), unindented).unwrap();
    std::fs::copy(
        files.join("alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .unwrap();
    let rendered_tests = ok(
        &cluster,
        "promtool",
        &[
            "test",
            "rules",
            dir.path().join("alerts.test.yaml").to_str().unwrap(),
        ],
    );
    assert!(rendered_tests.contains("SUCCESS"), "{rendered_tests}");
}

/// `kubectl auth can-i --list` for a service account, minus what every authenticated user
/// may do (discovery, self reviews): `resource verbs` lines.
fn permissions(cluster: &ControlPlane, namespace: &str, account: &str) -> BTreeSet<String> {
    let who = format!("--as=system:serviceaccount:{namespace}:{account}");
    let list = ok(
        cluster,
        "kubectl",
        &["auth", "can-i", "--list", &who, "-n", namespace],
    );
    list.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let resource = *fields.first()?;
            let verbs = line.rsplit_once('[')?.1.trim_end_matches(']');
            let generic = resource.starts_with("selfsubject")
                || line.contains(" [/")
                || line.trim_start().starts_with('[');
            (!generic).then(|| format!("{resource} [{verbs}]"))
        })
        .collect()
}

fn set(lines: &[&str]) -> BTreeSet<String> {
    lines.iter().map(|l| (*l).to_owned()).collect()
}

#[test]
fn helm_install_creates_least_privilege_objects_and_uninstall_removes_them() {
    let Some(cluster) = ControlPlane::get() else {
        return;
    };
    let suffix = std::process::id();
    let namespace = format!("crashwatch-chart-{suffix}");
    let release = format!("cw{suffix}");
    ok(&cluster, "kubectl", &["create", "namespace", &namespace]);
    let chart = chart();
    ok(
        &cluster,
        "helm",
        &[
            "install",
            &release,
            chart.to_str().unwrap(),
            "-n",
            &namespace,
            "--set",
            "admissionPolicy.enabled=true",
        ],
    );
    let full = format!("{release}-crashwatch");
    for object in [
        format!("daemonset/{full}-agent"),
        format!("deployment/{full}-operator"),
        format!("serviceaccount/{full}-agent"),
        format!("serviceaccount/{full}-operator"),
        format!("service/{full}-agent-metrics"),
        format!("role/{full}-operator-leader"),
    ] {
        ok(&cluster, "kubectl", &["get", "-n", &namespace, &object]);
    }
    for object in [
        format!("clusterrole/{full}-agent"),
        format!("clusterrole/{full}-operator"),
        format!("validatingadmissionpolicy/{full}-agent-own-node"),
        format!("validatingadmissionpolicybinding/{full}-agent-own-node"),
        format!("validatingadmissionpolicy/{full}-agent-own-events"),
        format!("validatingadmissionpolicybinding/{full}-agent-own-events"),
        "crd/crashreports.crashwatch.dev".to_owned(),
    ] {
        ok(&cluster, "kubectl", &["get", &object]);
    }

    // RBAC, exactly: what each service account may do beyond discovery.
    assert_eq!(
        permissions(&cluster, &namespace, &format!("{full}-agent")),
        set(&[
            "crashreports.crashwatch.dev [get create patch]",
            "crashreports.crashwatch.dev/status [patch]",
            "events.events.k8s.io [create patch]",
            "nodes [get]",
            "nodes/status [patch]",
        ])
    );
    assert_eq!(
        permissions(&cluster, &namespace, &format!("{full}-operator")),
        set(&[
            "crashreports.crashwatch.dev [list watch delete]",
            "events.events.k8s.io [create patch]",
            "leases.coordination.k8s.io [get create update]",
            "nodes [list watch patch]",
            "nodes/status [patch]",
            "pods [list watch]",
            "pods/eviction [create]",
            "remediationpolicies.crashwatch.dev [list watch]",
            "remediationpolicies.crashwatch.dev/status [patch]",
        ])
    );
    let agent = format!("--as=system:serviceaccount:{namespace}:{full}-agent");
    for (verb, resource) in [("patch", "nodes"), ("delete", "pods"), ("list", "secrets")] {
        let (allowed, text) = tool(
            &cluster,
            "kubectl",
            &["auth", "can-i", verb, resource, &agent],
        );
        assert!(
            !allowed && text.trim_start().starts_with("no"),
            "agent may {verb} {resource}: {text}"
        );
    }

    agent_writes_only_its_own_nodes_reports(&cluster, &namespace, &format!("{full}-agent"));

    ok(&cluster, "helm", &["uninstall", &release, "-n", &namespace]);
    for object in [
        format!("clusterrole/{full}-agent"),
        format!("validatingadmissionpolicy/{full}-agent-own-node"),
    ] {
        let (found, _) = tool(&cluster, "kubectl", &["get", &object]);
        assert!(!found, "{object} survived helm uninstall");
    }
    let (found, _) = tool(
        &cluster,
        "kubectl",
        &["get", "-n", &namespace, &format!("daemonset/{full}-agent")],
    );
    assert!(!found, "the DaemonSet survived helm uninstall");
    ok(
        &cluster,
        "kubectl",
        &["get", "crd/crashreports.crashwatch.dev"],
    );
}

/// A bound token of the agent's account for a Pod on `node` (created with the Node): the
/// token carries the node-name claim, as the DaemonSet's projected token does.
fn agent_token(cluster: &ControlPlane, namespace: &str, account: &str, node: &str) -> String {
    let pod = format!("agent-{node}");
    let objects = format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[
          {{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node}"}}}},
          {{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{pod}","namespace":"{namespace}"}},
            "spec":{{"nodeName":"{node}","serviceAccountName":"{account}","terminationGracePeriodSeconds":0,
                     "containers":[{{"name":"agent","image":"agent"}}]}}}}]}}"#
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.json");
    std::fs::write(&file, objects).unwrap();
    ok(cluster, "kubectl", &["apply", "-f", file.to_str().unwrap()]);
    let token = ok(
        cluster,
        "kubectl",
        &[
            "create",
            "token",
            account,
            "-n",
            namespace,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &pod,
        ],
    );
    token.trim().to_owned()
}

/// kubectl with `token` instead of the admin's credentials; `stdin` is fed to `-f -`.
fn as_agent(cluster: &ControlPlane, token: &str, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(cluster.bin.join("kubectl"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .arg("--token")
        .arg(token)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A CrashReport named `name` about `node`, with `extra` spec fields.
fn report_json(name: &str, node: &str, extra: &str) -> String {
    format!(
        r#"{{"apiVersion":"crashwatch.dev/v1alpha1","kind":"CrashReport",
           "metadata":{{"name":"{name}"}},
           "spec":{{"nodeName":"{node}","kind":"Segfault","comm":"qemu-nbd"{extra}}}}}"#
    )
}

/// An events.k8s.io Event in `namespace` about `kind`/`name` (`namespace/name` for a Pod),
/// reported by `controller` on `instance`.
fn event_json(
    namespace: &str,
    (kind, name): (&str, &str),
    controller: &str,
    instance: &str,
    reason: &str,
) -> String {
    let id = format!("{:x}", jiff::Timestamp::now().as_nanosecond());
    let (regarding_namespace, name) = name.split_once('/').unwrap_or(("", name));
    format!(
        r#"{{"apiVersion":"events.k8s.io/v1","kind":"Event",
           "metadata":{{"name":"cw-{id}","namespace":"{namespace}"}},
           "eventTime":"{}","reportingController":"{controller}","reportingInstance":"{instance}",
           "action":"Reported","reason":"{reason}","type":"Normal","note":"test",
           "regarding":{{"apiVersion":"v1","kind":"{kind}","name":"{name}","namespace":"{}"}}}}"#,
        jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ"),
        regarding_namespace,
    )
}

/// With real bound tokens for the agents of nodes A and B: every write of A about B (a
/// forged create, a squatted name, a takeover, an inflated status, an Event about B, a fake
/// operator Event), every delete and every absurd value is refused with a clear message,
/// and each node's own writes pass.
fn agent_writes_only_its_own_nodes_reports(cluster: &ControlPlane, namespace: &str, account: &str) {
    let suffix = std::process::id();
    let (node_a, node_b) = (format!("vap-a-{suffix}"), format!("vap-b-{suffix}"));
    let token_a = agent_token(cluster, namespace, account, &node_a);
    let token_b = agent_token(cluster, namespace, account, &node_b);
    let create = |token: &str, json: &str| as_agent(cluster, token, &["create", "-f", "-"], json);
    let refused = |what: &str, (done, text): (bool, String), expected: &str| {
        assert!(!done, "{what} was allowed: {text}");
        assert!(
            text.contains(expected),
            "{what}: expected {expected:?} in:\n{text}"
        );
    };
    let allowed = |what: &str, (done, text): (bool, String)| {
        assert!(done, "{what} was refused: {text}");
    };

    // The policy takes effect asynchronously: wait until a forged report is refused.
    let forged = format!("{node_b}.segfault.0000000000000001");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (created, text) = create(&token_a, &report_json(&forged, &node_b, ""));
        if !created {
            assert!(
                text.contains(&format!(
                    "may not write a CrashReport about node \"{node_b}\""
                )),
                "{text}"
            );
            break;
        }
        ok(cluster, "kubectl", &["delete", "crashreport", &forged]);
        assert!(
            Instant::now() < deadline,
            "the admission policy never applied"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Each node's own writes pass: create, status, an Event about its Node and about a Pod.
    let own_a = format!("{node_a}.segfault.00000000000000a1");
    let own_b = format!("{node_b}.segfault.00000000000000b1");
    allowed(
        "A's own report",
        create(&token_a, &report_json(&own_a, &node_a, "")),
    );
    allowed(
        "B's own report",
        create(&token_b, &report_json(&own_b, &node_b, "")),
    );
    let status = r#"{"count":2,"lastSeen":"2026-01-01T00:00:00Z"}"#;
    // A server-side apply of the status, as the agent writes it (it may not read status).
    let patch_status = |token: &str, name: &str, status: &str| {
        let object = format!(
            r#"{{"apiVersion":"crashwatch.dev/v1alpha1","kind":"CrashReport",
               "metadata":{{"name":"{name}"}},"status":{status}}}"#
        );
        as_agent(
            cluster,
            token,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=crashwatch-agent",
                "--subresource=status",
                "-f",
                "-",
            ],
            &object,
        )
    };
    allowed("A's own status", patch_status(&token_a, &own_a, status));
    allowed(
        "A's own spec",
        as_agent(
            cluster,
            &token_a,
            &[
                "patch",
                "crashreport",
                &own_a,
                "--type=merge",
                "-p",
                r#"{"spec":{"pid":42}}"#,
            ],
            "",
        ),
    );
    // Wait for the Event policy too (it was bound with the other, but binds on its own).
    let about_b = event_json(
        "default",
        ("Node", &node_b),
        "crashwatch-agent",
        &node_a,
        "Segfault",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while create(&token_a, &about_b).0 {
        assert!(Instant::now() < deadline, "the Event policy never applied");
        std::thread::sleep(Duration::from_millis(500));
    }
    allowed(
        "an Event about A's own Node",
        create(
            &token_a,
            &event_json(
                "default",
                ("Node", &node_a),
                "crashwatch-agent",
                &node_a,
                "Segfault",
            ),
        ),
    );
    allowed(
        "an Event about a Pod",
        create(
            &token_a,
            &event_json(
                namespace,
                ("Pod", &format!("{namespace}/some-pod")),
                "crashwatch-agent",
                &node_a,
                "Segfault",
            ),
        ),
    );

    // The attacks.
    refused(
        "squatting B's report name",
        create(
            &token_a,
            &report_json(&format!("{node_b}.segfault.00000000000000b2"), &node_a, ""),
        ),
        &format!("may only name CrashReports \"{node_a}.KIND.HASH\""),
    );
    refused(
        "a name that is not NODE.KIND.HASH",
        create(
            &token_a,
            &report_json(&format!("{node_a}.anything"), &node_a, ""),
        ),
        "may only name CrashReports",
    );
    refused(
        "taking over B's report",
        as_agent(
            cluster,
            &token_a,
            &[
                "patch",
                "crashreport",
                &own_b,
                "--type=merge",
                "-p",
                &format!(r#"{{"spec":{{"nodeName":"{node_a}"}}}}"#),
            ],
            "",
        ),
        &format!("may not change CrashReport \"{own_b}\" of node \"{node_b}\""),
    );
    refused(
        "inflating B's status",
        patch_status(&token_a, &own_b, r#"{"count":1000000}"#),
        &format!("may not write a CrashReport about node \"{node_b}\""),
    );
    for name in [&own_a, &own_b] {
        refused(
            "deleting a report",
            as_agent(cluster, &token_a, &["delete", "crashreport", name], ""),
            "cannot delete resource \"crashreports\"",
        );
    }
    refused(
        "an Event about another Node",
        create(&token_a, &about_b),
        &format!(
            "may write Events only about its own Node or a Pod in the namespace of the Event, not about Node \"{node_b}\""
        ),
    );
    refused(
        "a fake operator Event on its own Node",
        create(
            &token_a,
            &event_json(
                "default",
                ("Node", &node_a),
                "crashwatch-operator",
                "op",
                "Drained",
            ),
        ),
        "may write Events only as reportingController crashwatch-agent",
    );
    refused(
        "an Event about a Pod of another namespace",
        create(
            &token_a,
            &event_json(
                "default",
                ("Pod", &format!("{namespace}/elsewhere")),
                "crashwatch-agent",
                &node_a,
                "Segfault",
            ),
        ),
        "may write Events only about its own Node or a Pod",
    );

    // Absurd values, refused by the CRD's schema whoever writes them.
    let absurd = |extra: &str| format!("{node_a}.segfault.00000000000000c{}", extra.len() % 10);
    let long_raw = format!(r#","raw":[{}]"#, vec![r#""x""#; 5000].join(","));
    for (extra, expected) in [
        (
            r#","faultAddress":"0x123456789abcdef012345""#.to_owned(),
            "spec.faultAddress",
        ),
        (
            long_raw,
            "spec.raw: Too many: 5000: must have at most 128 items",
        ),
        (
            r#","pid":99999999"#.to_owned(),
            "spec.pid: Invalid value: 99999999: spec.pid in body should be less than or equal to 4194304",
        ),
        (
            format!(r#","module":"{}""#, "m".repeat(5000)),
            "spec.module: Too long",
        ),
    ] {
        refused(
            &format!("absurd {}", &extra[..extra.len().min(40)]),
            create(&token_a, &report_json(&absurd(&extra), &node_a, &extra)),
            expected,
        );
    }
}
