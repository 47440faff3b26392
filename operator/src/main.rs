//! `crashwatch-operator`: the command line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use operator::leader::LeaseLock;
use operator::metrics::OperatorMetrics;
use operator::policy::duration::parse_duration;
use operator::policy::retention::Retention;

/// Turns repeated crashes and hangs on a node into safe, explainable remediation.
#[derive(Parser)]
#[command(name = "crashwatch-operator", version, about)]
struct Cli {
    /// How log lines are written to standard error: `text` (colours only on a terminal) or
    /// `json` (one object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The format of log lines on standard error.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines; ANSI colours only when standard error is a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs to standard error at `RUST_LOG` (default: info, and warnings of kube-runtime).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube_runtime=warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Watches CrashReports, Nodes and RemediationPolicies and acts on them, while it holds
    /// the leader Lease.
    Run(RunArgs),
    /// Prints the CustomResourceDefinitions (CrashReport, RemediationPolicy) as YAML.
    Crds,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where to serve /metrics and /healthz.
    #[arg(long, default_value = "0.0.0.0:9478")]
    metrics_addr: SocketAddr,
    /// The Lease the replicas compete for.
    #[arg(long, default_value = "crashwatch-operator")]
    lease_name: String,
    /// The Lease's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's name in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a leader's Lease lasts without renewal, for example `15s`.
    #[arg(long, default_value = "15s", value_parser = |s: &str| parse_duration(s))]
    lease_duration: Duration,
    /// How long after its last occurrence a CrashReport is deleted, for example `168h`.
    #[arg(long, default_value = "168h", value_parser = |s: &str| parse_duration(s))]
    report_ttl: Duration,
    /// The most CrashReports a node keeps; the least recently seen are deleted first.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    max_reports_per_node: u32,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logging(cli.log_format);
            run(args)
        }
        Command::Crds => {
            print!("{}", crds::crd_yaml());
            Ok(())
        }
    }
}

#[tokio::main]
async fn run(args: RunArgs) -> anyhow::Result<()> {
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let metrics = Arc::new(OperatorMetrics::new());
    let config = kube::Config::infer().await?;
    let client = kube::Client::try_from(config.clone())?;
    let mut no_retry = config;
    no_retry.default_retry = false;
    let eviction_client = kube::Client::try_from(no_retry)?;
    tokio::spawn(operator::http::serve(args.metrics_addr, metrics.clone()));

    let lock = LeaseLock::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        args.lease_duration,
    );
    let work = operator::controller::run(
        client,
        eviction_client,
        &args.lease_namespace,
        &identity,
        metrics.clone(),
        Retention {
            ttl: args.report_ttl,
            per_node: args.max_reports_per_node as usize,
        },
        shutdown_signal(),
    );
    lock.run(&metrics, shutdown_signal(), work).await
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
