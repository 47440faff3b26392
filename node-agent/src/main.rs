//! `crashwatch-agent`: the command line.

use std::io::{self, IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use node_agent::conditions::ConditionFeed;
use node_agent::conditions::writer::{self, ConditionMetrics, WriterConfig};
use node_agent::daemon::{self, RunConfig};
use node_agent::explain;
use node_agent::hangwatch::WatchConfig;
use node_agent::kmsg::cursor::read_boot_id;
use node_agent::metrics::AgentMetrics;
use node_agent::pipeline::Pipeline;
use node_agent::publish::kubernetes::{self, KubePublisher};
use node_agent::publish::outbox::Outbox;
use node_agent::publish::{JsonLines, Publish};
use node_agent::recognise::{LogLine, Recogniser};
use node_agent::symbolize::debuginfod::Debuginfod;
use node_agent::symbolize::locate::DEFAULT_SEARCH_PATHS;
use node_agent::symbolize::{NoSymbolizer, Places, Symbolize, Symbolizer};

/// Recognises, explains and reports user-space crashes and hangs from the kernel log.
#[derive(Parser)]
#[command(name = "crashwatch-agent", version, about)]
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

/// Logs to standard error at `RUST_LOG` (default `default_filter`) in `format`.
fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Explains crashes and hangs in pasted kernel log text (arguments, or stdin).
    Explain(ExplainArgs),
    /// Follows this machine's kernel log and reports every crash and hang.
    Run(Box<RunArgs>),
    /// The core handler the kernel runs for each core dump (installed by `run
    /// --core-handler`; not for people): reads the dump on stdin.
    #[command(hide = true)]
    Coredump(CoredumpArgs),
}

#[derive(Args)]
struct CoredumpArgs {
    /// Only check that this binary runs here, and print `ok`.
    #[arg(long)]
    check: bool,
    /// The pattern's specifiers, in node_agent::coredump::pattern::HANDLER_ARGS order.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
    specifiers: Vec<String>,
}

#[derive(Args)]
struct ExplainArgs {
    /// Kernel log lines in any common format; none or `-` reads standard input.
    lines: Vec<String>,
    /// Print one JSON object per event (JSON Lines) instead of a report.
    #[arg(long)]
    json: bool,
    /// Recognise and decode only; do not look for binaries or debug information.
    #[arg(long)]
    no_symbolize: bool,
    #[command(flatten)]
    symbols: SymbolArgs,
}

/// Where binaries and debug information are found.
#[derive(Args)]
struct SymbolArgs {
    /// A binary to use for the module with the same file name (repeatable).
    #[arg(long = "binary", value_name = "PATH")]
    binaries: Vec<PathBuf>,
    /// Another directory to look for modules in by file name (repeatable), searched after the
    /// usual bin and lib directories.
    #[arg(long = "search-path", value_name = "DIR")]
    search_paths: Vec<PathBuf>,
    /// The host filesystem prefix: search paths and debug dirs are looked up under it.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// A root of .build-id/xx/rest.debug and debuglink files (repeatable).
    #[arg(long = "debug-dir", value_name = "DIR", default_values_t = ["/usr/lib/debug".to_owned()])]
    debug_dirs: Vec<String>,
    /// How many MiB of parsed binaries and debug information to keep cached.
    #[arg(long, default_value_t = 256)]
    symbol_cache_mib: usize,
    /// A debuginfod server to fetch debug files from by build-id (repeatable).
    #[arg(
        long = "debuginfod",
        value_name = "URL",
        env = "DEBUGINFOD_URLS",
        value_delimiter = ' '
    )]
    debuginfod_urls: Vec<String>,
    /// Where fetched debug files are cached (default: STATE_DIR/debuginfod for run,
    /// ~/.cache/crashwatch/debuginfod for explain).
    #[arg(long, value_name = "DIR")]
    debuginfod_cache: Option<PathBuf>,
    /// Seconds one debuginfod request may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    debuginfod_timeout: u64,
    /// Allow plain-http debuginfod servers (by default only https is used: a debug file
    /// decides what the agent reports).
    #[arg(long)]
    debuginfod_allow_http: bool,
    /// How many MiB of fetched debug files the on-disk cache keeps (least recently used
    /// files are removed beyond that).
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    debuginfod_cache_mib: u64,
    /// Where a symbol index is kept per build-id: built in the background the first time a
    /// file with DWARF is symbolized, it makes later lookups read a few pages instead of
    /// every unit (default: STATE_DIR/symbol-index for run; none for explain).
    #[arg(long, value_name = "DIR")]
    symbol_index_dir: Option<PathBuf>,
}

impl SymbolArgs {
    /// The symbolizer these options describe. `background` makes debuginfod fetches run
    /// off the caller's path (the daemon).
    fn symbolizer(
        &self,
        proc_root: PathBuf,
        default_cache: PathBuf,
        default_index_dir: Option<PathBuf>,
        background: bool,
    ) -> anyhow::Result<Symbolizer> {
        // Extra directories add to the usual ones; they never hide them.
        let search_paths = DEFAULT_SEARCH_PATHS
            .iter()
            .map(PathBuf::from)
            .chain(self.search_paths.iter().cloned())
            .collect();
        let debuginfod = if self.debuginfod_urls.iter().all(|u| u.trim().is_empty()) {
            None
        } else {
            let mut client = Debuginfod::new(
                self.debuginfod_urls.clone(),
                self.debuginfod_cache.clone().unwrap_or(default_cache),
                Duration::from_secs(self.debuginfod_timeout),
                self.debuginfod_allow_http,
            )?;
            client.cache_limit_bytes = self.debuginfod_cache_mib << 20;
            if background {
                client = client.fetch_in_background();
            }
            Some(Arc::new(client))
        };
        let places = Places {
            root: self.root.clone(),
            proc_root,
            binaries: self.binaries.clone(),
            search_paths,
            debug_dirs: self.debug_dirs.iter().map(PathBuf::from).collect(),
            debuginfod,
        };
        let symbolizer = Symbolizer::new(places, self.symbol_cache_mib << 20);
        Ok(match self.symbol_index_dir.clone().or(default_index_dir) {
            Some(dir) => symbolizer.with_index_dir(dir),
            None => symbolizer,
        })
    }
}

#[derive(Args)]
struct RunArgs {
    /// Print events as JSON Lines on stdout instead of publishing CrashReports (no cluster
    /// needed).
    #[arg(long)]
    standalone: bool,
    /// The kernel log device.
    #[arg(long, default_value = "/dev/kmsg")]
    kmsg: PathBuf,
    /// Where the kmsg cursor is kept across restarts.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9477")]
    metrics_addr: SocketAddr,
    /// This node's name (default: $NODE_NAME, then the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The proc filesystem to scan for hung tasks.
    #[arg(long, default_value = "/proc")]
    proc: PathBuf,
    /// A process name whose hung threads are reported even when the kernel stays silent.
    #[arg(long = "watch-process", default_values_t = ["qemu-nbd".to_owned()])]
    watch_processes: Vec<String>,
    /// Seconds a watched thread must be stuck in uninterruptible sleep to be reported.
    #[arg(long, default_value_t = 120.0)]
    hang_threshold: f64,
    /// Seconds between two scans of /proc.
    #[arg(long, default_value_t = 1.0)]
    hang_scan_interval: f64,
    /// Seconds between two writes of the same CrashReport (repeats in between are counted
    /// and written together).
    #[arg(long, default_value_t = 2.0)]
    publish_interval: f64,
    /// How many occurrences are kept while the API server cannot be reached; beyond that
    /// they are dropped and counted in crashwatch_reports_published_total{result="dropped"}.
    #[arg(long, default_value_t = 10_000)]
    outbox_limit: usize,
    /// Install the agent as the kernel's core_pattern pipe handler while it runs: each crash
    /// is then attributed to its pod and unwound, symbolized from its own container, with
    /// no core file kept. The previous handler still receives every dump, and is restored
    /// when the agent stops. Needs --state-dir.
    #[arg(long)]
    core_handler: bool,
    /// The state dir's path on the host, where the kernel runs the handler from (default:
    /// --state-dir, right when the agent runs on the host).
    #[arg(long, value_name = "DIR")]
    host_state_dir: Option<PathBuf>,
    /// The container runtime's state dir on the host, where the handler reads which pod
    /// and container a process ran in.
    #[arg(long, value_name = "DIR", default_value = "/run/containerd")]
    runtime_state_dir: PathBuf,
    #[command(flatten)]
    conditions: ConditionArgs,
    #[command(flatten)]
    symbols: SymbolArgs,
}

/// The Node conditions the agent writes, and reboots the operator orders.
#[derive(Args)]
struct ConditionArgs {
    /// Do not write the ProcessHung and NbdDeviceError conditions on this node's status.
    #[arg(long)]
    no_node_conditions: bool,
    /// Most seconds between two writes of the conditions (each moves lastHeartbeatTime).
    #[arg(long, default_value_t = 30.0)]
    condition_heartbeat: f64,
    /// Seconds an nbd error keeps NbdDeviceError True.
    #[arg(long, default_value_t = 600.0)]
    nbd_error_window: f64,
    /// Carry out a reboot the operator orders for this node (sysrq: sync, remount
    /// read-only, reset). Without it, orders are logged and counted, never followed.
    #[arg(long)]
    allow_reboot: bool,
    /// The sysrq trigger (default: PROC/sysrq-trigger).
    #[arg(long)]
    sysrq_trigger: Option<PathBuf>,
    /// Seconds to wait after the emergency sync and after the read-only remount.
    #[arg(long, default_value_t = 2.0)]
    sysrq_settle: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Coredump(args) = &cli.command {
        // Run by the kernel, with nowhere to log but the kernel log itself.
        if args.check {
            println!("ok");
            return ExitCode::SUCCESS;
        }
        return match node_agent::coredump::handler::run(&args.specifiers) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    init_logging(cli.log_format, "info");
    let result = match cli.command {
        Command::Coredump(_) => unreachable!("handled above"),
        Command::Explain(args) => explain_command(args),
        Command::Run(args) => run_command(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("crashwatch-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn explain_command(args: ExplainArgs) -> anyhow::Result<()> {
    let text = if args.lines.is_empty() || args.lines == ["-"] {
        if io::stdin().is_terminal() {
            eprintln!(
                "crashwatch-agent: reading kernel log lines from standard input (end with Ctrl-D)"
            );
        }
        // Kernel logs may carry any bytes (process names are not UTF-8 by contract).
        let mut bytes = Vec::new();
        io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .context("cannot read standard input")?;
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        args.lines.join("\n")
    };
    let symbolizer: Box<dyn Symbolize> = if args.no_symbolize {
        Box::new(NoSymbolizer)
    } else {
        Box::new(args.symbols.symbolizer(
            PathBuf::from("/proc"),
            user_debuginfod_cache(),
            None,
            false,
        )?)
    };
    let mut pipeline = Pipeline::new(symbolizer);
    let mut recogniser = Recogniser::new();
    let mut items = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        items.extend(recogniser.feed(LogLine::parse_text(line)));
    }
    items.extend(recogniser.flush());
    let stdout = io::stdout();
    let mut json = JsonLines::new(stdout.lock());
    let mut found = 0;
    let mut untrusted = 0;
    for item in items {
        if item == node_agent::recognise::Recognised::Untrusted {
            untrusted += 1;
        }
        let Some(finished) = pipeline.handle(item, None) else {
            continue;
        };
        found += 1;
        if let Some(err) = &finished.not_symbolized {
            eprintln!("crashwatch-agent: not symbolized: {err}");
        }
        let event = finished.event;
        if args.json {
            json.publish(&event)?;
        } else {
            let mut out = io::stdout().lock();
            if found > 1 {
                writeln!(out)?;
            }
            write!(out, "{}", explain::render_text(&event))?;
        }
    }
    if untrusted > 0 {
        eprintln!(
            "crashwatch-agent: ignored {untrusted} line(s) that user space wrote into the kernel log"
        );
    }
    if found == 0 {
        eprintln!("crashwatch-agent: no crash or hang found in the input");
    }
    pipeline.wait_for_background_work();
    Ok(())
}

/// `$XDG_CACHE_HOME/crashwatch/debuginfod`, or under `~/.cache`.
fn user_debuginfod_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("crashwatch/debuginfod")
}

/// Where the core handler goes, when `--core-handler` asks for it.
fn core_handler_config(
    symbols: &SymbolArgs,
    state_dir: Option<&std::path::Path>,
    enabled: bool,
    host_state_dir: Option<PathBuf>,
    runtime_state_dir: PathBuf,
) -> anyhow::Result<Option<node_agent::coredump::InstallConfig>> {
    if !enabled {
        return Ok(None);
    }
    let state_dir = state_dir.context("--core-handler needs --state-dir")?;
    Ok(Some(node_agent::coredump::InstallConfig {
        kernel_dir: PathBuf::from("/proc/sys/kernel"),
        state_dir: state_dir.to_owned(),
        host_state_dir: host_state_dir.unwrap_or_else(|| state_dir.to_owned()),
        host_root: symbols.root.clone(),
        debug_dirs: symbols.debug_dirs.iter().map(PathBuf::from).collect(),
        runtime_state_dir,
    }))
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let positive = |name: &str, secs: f64| {
        if secs.is_finite() && secs > 0.0 {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(anyhow::anyhow!(
                "--{name} must be a positive number of seconds, not {secs}"
            ))
        }
    };
    let standalone = args.standalone;
    let outbox_limit = args.outbox_limit;
    let condition_heartbeat = positive("condition-heartbeat", args.conditions.condition_heartbeat)?;
    let nbd_error_window = positive("nbd-error-window", args.conditions.nbd_error_window)?;
    let sysrq_settle = Duration::from_secs_f64(args.conditions.sysrq_settle.clamp(0.0, 60.0));
    let sysrq_trigger = args
        .conditions
        .sysrq_trigger
        .clone()
        .unwrap_or_else(|| args.proc.join("sysrq-trigger"));
    let write_conditions = !standalone && !args.conditions.no_node_conditions;
    let allow_reboot = args.conditions.allow_reboot;
    let publish_interval = positive("publish-interval", args.publish_interval)?;
    let debuginfod_cache = args
        .state_dir
        .as_ref()
        .map_or_else(user_debuginfod_cache, |dir| dir.join("debuginfod"));
    let index_dir = args.state_dir.as_ref().map(|dir| dir.join("symbol-index"));
    let symbolizer =
        args.symbols
            .symbolizer(args.proc.clone(), debuginfod_cache, index_dir, true)?;
    let node_name = match args.node_name {
        Some(name) => name,
        None => std::fs::read_to_string(args.proc.join("sys/kernel/hostname"))
            .map(|h| h.trim().to_owned())
            .context("no --node-name or NODE_NAME, and the host name is unreadable")?,
    };
    let core_handler = core_handler_config(
        &args.symbols,
        args.state_dir.as_deref(),
        args.core_handler,
        args.host_state_dir,
        args.runtime_state_dir.clone(),
    )?;
    let config = RunConfig {
        kmsg_path: args.kmsg,
        state_dir: args.state_dir,
        metrics_addr: args.metrics_addr,
        node_name,
        watch: WatchConfig {
            proc_root: args.proc,
            process_names: args.watch_processes,
            threshold: positive("hang-threshold", args.hang_threshold)?,
        },
        hang_scan_interval: positive("hang-scan-interval", args.hang_scan_interval)?,
        publishes_to_api: !standalone,
        runtime_state_dir: args.symbols.root.join(
            args.runtime_state_dir
                .strip_prefix("/")
                .unwrap_or(&args.runtime_state_dir),
        ),
        core_handler,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
        };
        let metrics = Arc::new(AgentMetrics::new(&config.node_name));
        if standalone {
            let publisher = JsonLines::new(io::stdout());
            return daemon::run(config, metrics, symbolizer, publisher, shutdown).await;
        }
        let client = kube::Client::try_default()
            .await
            .context("no Kubernetes client configuration (in-cluster or KUBECONFIG); use --standalone to run without a cluster")?;
        let boot_id = read_boot_id(&config.watch.proc_root).context("cannot read the boot id")?;
        let feed = write_conditions.then(|| {
            let (sender, receiver) = tokio::sync::watch::channel(None);
            let writer = WriterConfig {
                node: config.node_name.clone(),
                boot_id: boot_id.clone(),
                heartbeat: condition_heartbeat,
                allow_reboot,
                sysrq_trigger,
                sysrq_settle,
            };
            let condition_metrics = ConditionMetrics::new(&config.node_name, metrics.registry());
            tokio::spawn(writer::write_loop(
                client.clone(),
                writer,
                receiver,
                condition_metrics,
            ));
            ConditionFeed::new(sender, nbd_error_window)
        });
        let outbox = Arc::new(Mutex::new(Outbox::new(&config.node_name, outbox_limit)));
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(kubernetes::write_loop(
            client,
            outbox.clone(),
            wake.clone(),
            config.node_name.clone(),
            boot_id,
            publish_interval,
            metrics.clone(),
        ));
        let publisher = KubePublisher::new(outbox, wake, metrics.clone());
        daemon::run_with_conditions(config, metrics, symbolizer, publisher, feed, shutdown).await
    })
}
