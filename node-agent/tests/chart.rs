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
    assert!(check.contains("SUCCESS: 5 rules found"), "{check}");
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
        ])
    );
    assert_eq!(
        permissions(&cluster, &namespace, &format!("{full}-operator")),
        set(&[
            "crashreports.crashwatch.dev [list watch]",
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

/// With a token bound to a pod on node A, the agent's account may write a CrashReport about
/// A and is refused one about B.
fn agent_writes_only_its_own_nodes_reports(cluster: &ControlPlane, namespace: &str, account: &str) {
    let suffix = std::process::id();
    let (node_a, node_b) = (format!("vap-a-{suffix}"), format!("vap-b-{suffix}"));
    let pod = format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[
          {{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{node_a}"}}}},
          {{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"agent-{suffix}","namespace":"{namespace}"}},
            "spec":{{"nodeName":"{node_a}","serviceAccountName":"{account}","terminationGracePeriodSeconds":0,
                     "containers":[{{"name":"agent","image":"agent"}}]}}}}]}}"#
    );
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects.json");
    std::fs::write(&objects, pod).unwrap();
    ok(
        cluster,
        "kubectl",
        &["apply", "-f", objects.to_str().unwrap()],
    );
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
            &format!("agent-{suffix}"),
        ],
    );
    let report = |node: &str| {
        let file = dir.path().join(format!("{node}.json"));
        std::fs::write(
            &file,
            format!(
                r#"{{"apiVersion":"crashwatch.dev/v1alpha1","kind":"CrashReport",
                   "metadata":{{"name":"{node}.segfault.0000000000000001"}},
                   "spec":{{"nodeName":"{node}","kind":"Segfault","comm":"qemu-nbd"}}}}"#
            ),
        )
        .unwrap();
        tool(
            cluster,
            "kubectl",
            &[
                "create",
                "--token",
                token.trim(),
                "-f",
                file.to_str().unwrap(),
            ],
        )
    };
    // The policy takes effect asynchronously: wait until the forged report is refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (created, text) = report(&node_b);
        if !created {
            assert!(
                text.contains(&format!(
                    "may not write a CrashReport about node \"{node_b}\""
                )),
                "{text}"
            );
            break;
        }
        ok(
            cluster,
            "kubectl",
            &[
                "delete",
                "crashreport",
                &format!("{node_b}.segfault.0000000000000001"),
            ],
        );
        assert!(
            Instant::now() < deadline,
            "the admission policy never applied"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (created, text) = report(&node_a);
    assert!(created, "its own node's report is allowed: {text}");
}
