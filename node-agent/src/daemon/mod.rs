//! The agent daemon: follows the kernel log and scans `/proc`, and publishes what it finds.

pub mod http;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crds::CrashEvent;
use tokio::time::MissedTickBehavior;

use crate::conditions::ConditionFeed;
use crate::coredump::{CoreHandler, CoreMerge, InstallConfig, Merged, Spool};
use crate::hangwatch::{HangState, HangWatcher, WatchConfig};
use crate::kmsg::cursor::read_boot_id;
use crate::kmsg::inflight::InFlightFile;
use crate::kmsg::{
    Cursor, CursorFile, KmsgReader, ReadOutcome, SeqTracker, SeqVerdict, parse_record,
};
use crate::metrics::AgentMetrics;
use crate::pipeline::{Finished, Pipeline};
use crate::publish::Publish;
use crate::recognise::{LogLine, Recognised, Recogniser};
use crate::symbolize::Symbolize;

/// How long the log must be quiet before an open report is closed (a segfault's `Code:`
/// record and a hung task's stack follow their first record within microseconds).
const QUIET_PERIOD: Duration = Duration::from_millis(250);
/// The longest the cursor file may lag behind the records handled.
const CURSOR_LAG: Duration = Duration::from_secs(1);

/// Everything `crashwatch-agent run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The kernel log device.
    pub kmsg_path: PathBuf,
    /// Where the kmsg cursor is kept; without it every start reads the whole ring again.
    pub state_dir: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// The `node` label and CrashReport node.
    pub node_name: String,
    /// The hang watcher's configuration.
    pub watch: WatchConfig,
    /// How often the hang watcher scans `/proc`.
    pub hang_scan_interval: Duration,
    /// Whether events go to the API server, so that `/readyz` also needs it.
    pub publishes_to_api: bool,
    /// Where to install the core handler, when it is wanted.
    pub core_handler: Option<InstallConfig>,
    /// The container runtime's state dir as the agent sees it, for naming the pod of a
    /// live process (a hung one) from its bundle.
    pub runtime_state_dir: PathBuf,
}

/// How often the core handler's spool is looked at.
const SPOOL_INTERVAL: Duration = Duration::from_millis(100);

/// Runs until `shutdown` completes, publishing every event to `publisher`.
pub async fn run<S, P>(
    config: RunConfig,
    metrics: Arc<AgentMetrics>,
    symbolizer: S,
    publisher: P,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()>
where
    S: Symbolize,
    P: Publish,
{
    run_with_conditions(config, metrics, symbolizer, publisher, None, shutdown).await
}

/// As [`run`], also deriving the Node conditions into `conditions` after every `/proc` scan.
pub async fn run_with_conditions<S, P>(
    config: RunConfig,
    metrics: Arc<AgentMetrics>,
    symbolizer: S,
    mut publisher: P,
    mut conditions: Option<ConditionFeed>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()>
where
    S: Symbolize,
    P: Publish,
{
    // Installed before the agent says it is ready. The handler is restored when `core_handler` drops, on every way out of this function.
    let core_handler = match &config.core_handler {
        Some(install) => match CoreHandler::install(install) {
            Ok(handler) => {
                metrics.core_handler_installed.set(1);
                Some(handler)
            }
            Err(err) => {
                tracing::error!(
                    err = format!("{err:#}"),
                    "cannot install the core handler; crashes are reported from the kernel log only"
                );
                None
            }
        },
        None => None,
    };
    let listener = http::bind(config.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        config.publishes_to_api,
    ));

    let boot_id = read_boot_id(&config.watch.proc_root).context("cannot read the boot id")?;
    let cursor_file = match &config.state_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create state dir {}", dir.display()))?;
            Some(CursorFile::in_dir(dir))
        }
        None => None,
    };
    let stored = cursor_file.as_ref().and_then(|file| {
        file.load()
            .inspect_err(|err| tracing::error!(%err, "ignoring the kmsg cursor; starting from the oldest record"))
            .ok()
            .flatten()
    });
    let resume_after = CursorFile::resume_point(stored, &boot_id);
    match resume_after {
        Some(seq) => tracing::info!(seq, "resuming after the persisted kmsg cursor"),
        None => tracing::info!(
            "no kmsg cursor for this boot; reading from the oldest record in the ring"
        ),
    }

    if let Some(feed) = conditions.as_mut() {
        feed.read_ring(&config.kmsg_path, monotonic_usec());
    }
    let mut reader = KmsgReader::open(&config.kmsg_path)?;
    metrics.kmsg_reader_up.set(1);
    let clock = Clock::now();
    let mut state = ReadState {
        seq: SeqTracker::resume_after(resume_after),
        recogniser: Recogniser::new(),
        pipeline: Pipeline::new(symbolizer),
        metrics: metrics.clone(),
        clock,
        core: core_handler
            .as_ref()
            .map(|h| (CoreMerge::default(), h.spool().clone())),
        published_spool_files: Vec::new(),
        proc_root: config.watch.proc_root.clone(),
        runtime_state_dir: config.runtime_state_dir.clone(),
    };
    if let Some(dir) = &config.state_dir {
        state
            .pipeline
            .note_symbolization_in(InFlightFile::open(dir, &boot_id));
    }
    let mut watcher = HangWatcher::new(config.watch.clone());
    // Hangs reported before a restart (a rollout) stay reported while the thread is stuck.
    let hang_file = config
        .state_dir
        .as_ref()
        .map(|dir| dir.join(HANG_STATE_FILE));
    if let Some(saved) = hang_file.as_deref().and_then(load_hang_state)
        && saved.boot_id == boot_id
    {
        tracing::info!(
            episodes = saved.episodes.len(),
            "hang episodes reported before the restart are not reported again while they last"
        );
        state.pipeline.episodes.restore(saved.episodes);
        watcher.restore(saved.sightings);
    }
    let mut saved_hangs: Option<HangState> = None;
    let mut last_hang_save = Instant::now();
    let mut spool_tick = tokio::time::interval(SPOOL_INTERVAL);
    spool_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut scan = tokio::time::interval(config.hang_scan_interval);
    scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut persisted = resume_after;
    let mut last_persist = Instant::now();
    tokio::pin!(shutdown);

    loop {
        let mut published = false;
        let open_report = state.recogniser.has_open_report();
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Before the reader: a storm of kernel records (always ready) must not starve
            // the /proc scan, and with it the hang watcher and the ProcessHung condition.
            // The tick is due once an interval, so it never starves the reader.
            _ = scan.tick() => {
                let now = monotonic_usec();
                for event in watcher.scan(&mut state.pipeline.episodes, now) {
                    let event = state.finish_event(event, Some(now));
                    publisher.publish(&event).context("publishing an event")?;
                }
                if let Some(feed) = conditions.as_mut() {
                    feed.after_scan(watcher.stuck(), now);
                }
            },
            // Before the reader too: a storm must not hold crash lines waiting for dumps.
            _ = spool_tick.tick(), if state.core.is_some() => {
                for event in state.read_spool() {
                    publisher.publish(&event).context("publishing an event")?;
                    published = true;
                }
            },
            outcome = reader.next() => match outcome.context("reading the kernel log")? {
                ReadOutcome::Record(bytes) => {
                    if let Some(feed) = conditions.as_mut() {
                        feed.on_record(bytes);
                    }
                    for event in state.handle_record(bytes) {
                        publisher.publish(&event).context("publishing an event")?;
                        published = true;
                    }
                }
                ReadOutcome::Overrun => tracing::warn!("kernel log records were overwritten before they were read"),
            },
            () = tokio::time::sleep(QUIET_PERIOD), if open_report => {
                if let Some(item) = state.recogniser.flush()
                    && let Some(event) = state.finish(item) {
                        publisher.publish(&event).context("publishing an event")?;
                        published = true;
                    }
            },
        }
        state.remove_published_spool_files();
        let done = delivered_through(state.handled_through(), &publisher);
        if let Some(file) = &cursor_file
            && done != persisted
            && (published || last_persist.elapsed() >= CURSOR_LAG)
            && let Some(last_seq) = done
        {
            file.store(&Cursor {
                boot_id: boot_id.clone(),
                last_seq,
            })
            .context("persisting the kmsg cursor")?;
            persisted = done;
            last_persist = Instant::now();
        }
        if let Some(file) = &hang_file
            && last_hang_save.elapsed() >= CURSOR_LAG
        {
            last_hang_save = Instant::now();
            save_hang_state(
                file,
                &boot_id,
                &state.pipeline.episodes,
                &watcher,
                done,
                &publisher,
                &mut saved_hangs,
            );
        }
    }
    if let Some(file) = &hang_file {
        let done = delivered_through(state.handled_through(), &publisher);
        save_hang_state(
            file,
            &boot_id,
            &state.pipeline.episodes,
            &watcher,
            done,
            &publisher,
            &mut saved_hangs,
        );
    }

    if let (Some(file), Some(last_seq)) = (
        &cursor_file,
        delivered_through(state.handled_through(), &publisher),
    ) {
        file.store(&Cursor { boot_id, last_seq })
            .context("persisting the kmsg cursor")?;
    }
    drop(core_handler);
    metrics.core_handler_installed.set(0);
    metrics.kmsg_reader_up.set(0);
    tracing::info!("stopped");
    Ok(())
}

/// The file in the state dir that keeps reported hang episodes across restarts.
const HANG_STATE_FILE: &str = "hang-episodes.json";

/// The saved hang state, if there is a readable one.
fn load_hang_state(path: &std::path::Path) -> Option<HangState> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text)
        .inspect_err(
            |err| tracing::warn!(%err, file = %path.display(), "ignoring the saved hang episodes"),
        )
        .ok()
}

/// Saves the hang episodes whose reports are delivered, when they changed. Nothing is saved
/// while a `/proc`-found hang waits for delivery: saved as reported, it would be lost by a
/// restart; unsaved, the restarted agent finds it again.
fn save_hang_state(
    path: &std::path::Path,
    boot_id: &str,
    episodes: &crate::hangwatch::HangEpisodes,
    watcher: &HangWatcher,
    delivered_through: Option<u64>,
    publisher: &impl Publish,
    saved: &mut Option<HangState>,
) {
    if publisher.has_undelivered_without_seq() {
        return;
    }
    let current = HangState {
        boot_id: boot_id.to_owned(),
        episodes: episodes.delivered(delivered_through),
        sightings: watcher.sightings(),
    };
    if saved.as_ref() == Some(&current) {
        return;
    }
    let tmp = path.with_extension("json.tmp");
    let written = serde_json::to_vec(&current)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    match written {
        Ok(()) => *saved = Some(current),
        Err(err) => tracing::warn!(%err, file = %path.display(), "cannot save the hang episodes"),
    }
}

/// The last record the cursor may pass: handled, and with every event of it delivered.
fn delivered_through(handled: Option<u64>, publisher: &impl Publish) -> Option<u64> {
    match publisher.oldest_undelivered_seq() {
        Some(oldest) => handled.min(oldest.checked_sub(1)),
        None => handled,
    }
}

struct ReadState<S> {
    seq: SeqTracker,
    recogniser: Recogniser,
    pipeline: Pipeline<S>,
    metrics: Arc<AgentMetrics>,
    clock: Clock,
    /// With the core handler: crash lines and spooled dumps waiting for each other.
    core: Option<(CoreMerge, Spool)>,
    /// Spool files whose events were handed to the publisher.
    published_spool_files: Vec<PathBuf>,
    proc_root: PathBuf,
    runtime_state_dir: PathBuf,
}

impl<S: Symbolize> ReadState<S> {
    fn handle_record(&mut self, bytes: &[u8]) -> Vec<CrashEvent> {
        let record = match parse_record(bytes) {
            Ok(record) => record,
            Err(err) => {
                self.metrics.kmsg_records_malformed.inc();
                tracing::warn!(%err, "skipping a malformed kmsg record");
                return Vec::new();
            }
        };
        match self.seq.observe(record.seq) {
            SeqVerdict::AlreadySeen => return Vec::new(),
            SeqVerdict::New { lost } => {
                self.metrics.kmsg_records.inc();
                if lost > 0 {
                    self.metrics.kmsg_records_lost.inc_by(lost);
                    tracing::warn!(
                        lost,
                        seq = record.seq,
                        "kernel log records were overwritten before they were read"
                    );
                }
            }
        }
        let items = self.recogniser.feed(LogLine::from_owned_record(record));
        items
            .into_iter()
            .filter_map(|item| self.finish(item))
            .collect()
    }

    fn finish(&mut self, item: Recognised) -> Option<CrashEvent> {
        let usec = match &item {
            Recognised::Event(found) => found.monotonic_usec,
            _ => None,
        };
        // With the core handler, a crash line waits for its dump's richer event.
        if let (Some((merge, _)), Recognised::Event(found)) = (&mut self.core, &item)
            && found.event.kind.is_user_crash()
            && found.event.pid.is_some()
        {
            let Recognised::Event(found) = item else {
                unreachable!("matched above")
            };
            let merged = merge.line(found.event, usec, Instant::now())?;
            return Some(self.finish_merged(merged));
        }
        let finished = self.pipeline.handle(item, Some(&self.metrics))?;
        Some(self.stamped(finished, usec))
    }

    fn finish_event(&mut self, event: CrashEvent, usec: Option<u64>) -> CrashEvent {
        let finished = self.pipeline.finish(event, Some(&self.metrics));
        self.stamped(finished, usec)
    }

    /// Logs why an event was not symbolized, gives it its wall-clock time, and names the
    /// pod of a process that still runs.
    fn stamped(&self, finished: Finished, usec: Option<u64>) -> CrashEvent {
        if let Some(err) = &finished.not_symbolized {
            tracing::info!(%err, "not symbolized");
        }
        let mut event = finished.event;
        if let Some(usec) = usec {
            event.timestamp = Some(self.clock.wall_time(usec));
        }
        if event.pod.is_none()
            && let Some(pid) = event.pid
            && let Ok(cgroup) =
                std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
            && let Some((pod, container)) =
                crate::coredump::attribute::attribute(&cgroup, &self.runtime_state_dir)
        {
            event.pod = Some(pod);
            event.container = Some(container);
        }
        // Known by ids only (an OOM kill's cgroup path): the names from the bundle.
        if let (Some(pod), Some(container)) = (&mut event.pod, &mut event.container)
            && pod.name.is_empty()
        {
            crate::coredump::attribute::name_from_bundle(pod, container, &self.runtime_state_dir);
        }
        event
    }

    /// Finishes a crash from the merge: the handler's event is symbolized already.
    fn finish_merged(&mut self, merged: Merged) -> CrashEvent {
        match merged {
            Merged::FromDump {
                event,
                monotonic_usec,
                spool_file,
            } => {
                self.metrics.core_dumps_handled.inc();
                self.published_spool_files.push(spool_file);
                let finished = self.pipeline.finish_symbolized(event, Some(&self.metrics));
                self.stamped(finished, monotonic_usec)
            }
            Merged::LineOnly {
                event,
                monotonic_usec,
            } => self.finish_event(event, monotonic_usec),
        }
    }

    /// New spooled dumps, and what has waited long enough, as events to publish.
    fn read_spool(&mut self) -> Vec<CrashEvent> {
        let Some((merge, spool)) = &mut self.core else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut ready = Vec::new();
        let (spooled, bad) = spool.read();
        self.metrics.core_dumps_unreadable.inc_by(bad as u64);
        for (path, event) in spooled {
            if self.published_spool_files.contains(&path) || merge.holds(&path) {
                continue;
            }
            ready.extend(merge.dump(path, event, now));
        }
        let spool = spool.clone();
        ready.extend(merge.due(now, |tid| spool.is_in_flight(tid)));
        ready
            .into_iter()
            .map(|merged| self.finish_merged(merged))
            .collect()
    }

    /// Removes the spool files of published events: the publisher holds them now.
    fn remove_published_spool_files(&mut self) {
        for path in self.published_spool_files.drain(..) {
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), %err, "cannot remove a spooled crash");
            }
        }
    }

    /// The last record whose events are all out: before any open report, and before any
    /// crash line waiting for its dump.
    fn handled_through(&self) -> Option<u64> {
        let through = match self.recogniser.oldest_pending_seq() {
            Some(pending) => pending.checked_sub(1),
            None => self.seq.last_seq(),
        };
        match self.core.as_ref().and_then(|(merge, _)| merge.oldest_seq()) {
            Some(waiting) => through.min(waiting.checked_sub(1)),
            None => through,
        }
    }
}

/// Converts kernel timestamps (µs since boot) into wall-clock time.
#[derive(Debug, Clone, Copy)]
struct Clock {
    boot_unix_usec: i64,
}

impl Clock {
    fn now() -> Self {
        let unix_usec = jiff::Timestamp::now().as_microsecond();
        Clock {
            boot_unix_usec: unix_usec - monotonic_usec() as i64,
        }
    }

    fn wall_time(&self, monotonic_usec: u64) -> String {
        jiff::Timestamp::from_microsecond(self.boot_unix_usec + monotonic_usec as i64)
            .map(|t| t.to_string())
            .unwrap_or_default()
    }
}

/// Microseconds on `CLOCK_MONOTONIC`, the clock of kmsg timestamps and `se.exec_start`.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
