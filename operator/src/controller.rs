//! The reconcile loop: for each RemediationPolicy, plan over the cached Nodes and
//! CrashReports, and carry out the plan. Level-triggered and idempotent: what was done is
//! read back from the Nodes' ledgers and the policy's status, so a restart (or a new
//! leader) continues where the last one stopped and repeats nothing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crds::policy::{NodeRemediation, RemediationState};
use crds::{RemediationPolicy, RemediationPolicyStatus};
use futures::{Stream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::metrics::OperatorMetrics;
use crate::policy::activity::{PodLabels, ReportTimes, report_matches};
use crate::policy::ledger::{DrainPhase, LEDGER_ANNOTATION, ReleasedBy};
use crate::policy::plan::{BlockReason, Change, ChangeKind, NodeView, Plan, Rules, plan, verb};
use crate::policy::retention::{self, Held, Retention};
use crate::policy::status::{carry_since, news};
use crate::remediate::{drain, node};
use crate::reports::CachedReport;

/// How often a draining node is looked at while its pods go, besides whenever its Pod
/// watch reports a change.
const DRAIN_POLL: Duration = Duration::from_secs(5);
/// The first wait after a disruption budget refused an eviction (budget changes are not
/// watched), doubling up to [`MAX_EVICTION_BACKOFF`].
const FIRST_EVICTION_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two evictions a disruption budget refused.
const MAX_EVICTION_BACKOFF: Duration = Duration::from_secs(30);
/// A policy is reconciled at least this often, whatever happens.
const RESYNC: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    client: Client,
    /// A client that does not retry 429s itself: a disruption budget's refusal comes back
    /// at once, to be shown in the status and retried with this controller's backoff.
    eviction_client: Client,
    reports: Store<CachedReport>,
    nodes: Store<Node>,
    policies: Store<RemediationPolicy>,
    recorder: Recorder,
    metrics: Arc<OperatorMetrics>,
    eviction_backoff: Mutex<HashMap<String, Duration>>,
    /// A Pod watch per draining node (field selector `spec.nodeName`), so that the
    /// cluster's other Pods never sit in memory. Freed with the node's backoff when no
    /// policy drains the node any more, whatever the reason.
    pod_watches: Mutex<HashMap<String, PodWatch>>,
    /// Ticks when a watched Pod changes: every policy is reconciled again.
    pod_changes: tokio::sync::mpsc::UnboundedSender<()>,
    /// The labels of pods that reports name, read when a policy selects pods by label, for
    /// [`POD_LABELS_TTL`] (None: the pod is gone).
    pod_labels: Mutex<HashMap<PodKey, (Instant, Option<Labels>)>>,
    /// The status node list this process last wrote, per policy uid.
    written_status: Mutex<HashMap<String, Vec<NodeRemediation>>>,
    /// This operator's own pod (namespace, name): a drain leaves its replicas in place.
    own_pod: (String, String),
}

/// The Pods of one draining node, kept current by a watch.
struct PodWatch {
    pods: Store<Pod>,
    task: tokio::task::JoinHandle<()>,
    /// The policies draining the node.
    drained_by: BTreeSet<String>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Context {
    /// The Pods on `node`, from its watch, started on first use, for `policy`'s drain.
    async fn pods_on(&self, node: &str, policy: &str) -> Result<Vec<Arc<Pod>>, Error> {
        let pods = {
            let mut watches = self.pod_watches.lock().unwrap();
            let watch = watches.entry(node.to_owned()).or_insert_with(|| {
                let (pods, writer) = reflector::store();
                let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
                let changes = reflector::reflector(
                    writer,
                    watcher(Api::<Pod>::all(self.client.clone()), on_node),
                )
                .default_backoff()
                .touched_objects();
                let tick = self.pod_changes.clone();
                let task = tokio::spawn(async move {
                    let mut changes = std::pin::pin!(changes);
                    while let Some(change) = changes.next().await {
                        if change.is_ok() && tick.send(()).is_err() {
                            return;
                        }
                    }
                });
                PodWatch {
                    pods,
                    task,
                    drained_by: BTreeSet::new(),
                }
            });
            watch.drained_by.insert(policy.to_owned());
            let pods = watch.pods.clone();
            self.metrics.drain_pod_watches.set(watches.len() as i64);
            pods
        };
        tokio::time::timeout(Duration::from_secs(30), pods.wait_until_ready())
            .await
            .map_err(|_| Error::CachesNotReady)?
            .map_err(|_| Error::CachesNotReady)?;
        Ok(pods.state())
    }

    /// The labels of the pods that `reports` name in the namespaces `policy` opts in, when
    /// it selects pods by label (read with a list by name, cached for [`POD_LABELS_TTL`]).
    async fn labels_for(
        &self,
        policy: &RemediationPolicy,
        reports: &[Arc<CachedReport>],
    ) -> Result<HashMap<PodKey, Labels>, Error> {
        let Some(pods) = policy
            .spec
            .selector
            .pods
            .as_ref()
            .filter(|p| p.selector.is_some())
        else {
            return Ok(HashMap::new());
        };
        let wanted: HashSet<PodKey> = reports
            .iter()
            .filter_map(|r| r.facts.as_ref().ok()?.pod.as_ref())
            .filter(|p| pods.namespaces.is_empty() || pods.namespaces.contains(&p.namespace))
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        let mut known = HashMap::new();
        for (namespace, name) in wanted {
            let cached = {
                let mut cache = self.pod_labels.lock().unwrap();
                cache.retain(|_, (read, _)| read.elapsed() < POD_LABELS_TTL);
                cache
                    .get(&(namespace.clone(), name.clone()))
                    .map(|(_, l)| l.clone())
            };
            let labels = match cached {
                Some(labels) => labels,
                None => {
                    let on_name = ListParams::default().fields(&format!("metadata.name={name}"));
                    let listed = Api::<Pod>::namespaced(self.client.clone(), &namespace)
                        .list(&on_name)
                        .await?;
                    let labels = listed
                        .items
                        .into_iter()
                        .next()
                        .map(|p| p.metadata.labels.unwrap_or_default());
                    self.pod_labels.lock().unwrap().insert(
                        (namespace.clone(), name.clone()),
                        (Instant::now(), labels.clone()),
                    );
                    labels
                }
            };
            if let Some(labels) = labels {
                known.insert((namespace, name), labels);
            }
        }
        Ok(known)
    }

    /// Stops watching the Pods of a node that is no longer draining, and forgets its
    /// backoff.
    fn forget_pods_on(&self, node: &str) {
        let mut watches = self.pod_watches.lock().unwrap();
        watches.remove(node);
        self.metrics.drain_pod_watches.set(watches.len() as i64);
        self.eviction_backoff.lock().unwrap().remove(node);
    }

    /// `policy` drains only `draining` now: every other node's watch loses it, and a watch
    /// that no policy needs any more is freed with its backoff. Policies that no longer
    /// exist lose their watches too.
    fn keep_drains(&self, policy: &str, draining: &[&str]) {
        let live: HashSet<String> = self.policies.state().iter().map(|p| p.name_any()).collect();
        let mut watches = self.pod_watches.lock().unwrap();
        let mut backoff = self.eviction_backoff.lock().unwrap();
        watches.retain(|node, watch| {
            watch
                .drained_by
                .retain(|p| live.contains(p) && (p != policy || draining.contains(&node.as_str())));
            let keep = !watch.drained_by.is_empty();
            if !keep {
                backoff.remove(node);
                tracing::debug!(%node, "stopped watching the Pods of a node no policy drains");
            }
            keep
        });
        backoff.retain(|node, _| watches.contains_key(node));
        self.metrics.drain_pod_watches.set(watches.len() as i64);
    }
}

/// Why a reconcile failed; it is retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request (a conflict included: the plan is
    /// made again on fresh objects).
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The Node or CrashReport cache did not fill in time.
    #[error("the Node and CrashReport caches are not filled yet")]
    CachesNotReady,
}

/// A pod's labels, as read for `match.pods.selector`.
type Labels = std::collections::BTreeMap<String, String>;
/// A pod's namespace and name.
type PodKey = (String, String);
/// How long a pod's labels are reused before they are read again.
const POD_LABELS_TTL: Duration = Duration::from_secs(30);

/// How often retention looks for reports to delete.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// Nodes per page of a consistent Node list.
const NODE_PAGE: u32 = 500;

/// Runs the controller until `shutdown` resolves.
/// `identity` is this replica's name in the Lease, its pod's name in `namespace` in a cluster.
pub async fn run(
    client: Client,
    eviction_client: Client,
    namespace: &str,
    identity: &str,
    metrics: Arc<OperatorMetrics>,
    retention: Retention,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: node::FIELD_MANAGER.into(),
            instance: Some(identity.to_owned()),
        },
    );
    let (reports, report_changes) = cached_reports(&client, recorder.clone(), metrics.clone());
    let (nodes, node_changes) = cached_nodes(&client);
    let (pod_changes, mut pod_ticks) = tokio::sync::mpsc::unbounded_channel();
    let pod_changes_stream = futures::stream::poll_fn(move |cx| pod_ticks.poll_recv(cx));
    let controller = Controller::new(
        Api::<RemediationPolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    let context = Arc::new(Context {
        client: client.clone(),
        eviction_client,
        reports,
        nodes,
        policies: controller.store(),
        recorder,
        metrics,
        eviction_backoff: Mutex::default(),
        pod_watches: Mutex::default(),
        pod_changes,
        pod_labels: Mutex::default(),
        written_status: Mutex::default(),
        own_pod: (namespace.to_owned(), identity.to_owned()),
    });
    let retention_task = tokio::spawn(enforce_retention(context.clone(), retention));
    controller
        // One policy at a time: each decision sees the writes of the one before.
        .with_config(controller::Config::default().concurrency(1))
        .reconcile_all_on(report_changes)
        .reconcile_all_on(node_changes)
        .reconcile_all_on(pod_changes_stream)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::warn!(%error, "reconcile failed");
            }
        })
        .await;
    retention_task.abort();
    Ok(())
}

/// Logs a watch failure and drops it (the watch retries with backoff).
fn ok_or_log<K: Resource<DynamicType = ()>>(result: Result<K, watcher::Error>) -> Option<K> {
    match result {
        Ok(object) => Some(object),
        Err(error) => {
            tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying");
            None
        }
    }
}

/// The cache of every CrashReport, reduced to what the operator reads, and a stream that
/// ticks whenever one changes. A report that does not decode is skipped by planning and
/// reported once per version: a metric and a Warning Event about it.
fn cached_reports(
    client: &Client,
    recorder: Recorder,
    metrics: Arc<OperatorMetrics>,
) -> (Store<CachedReport>, impl Stream<Item = ()> + Send + 'static) {
    let (store, writer) = reflector::store();
    let reported: Arc<Mutex<HashSet<(String, String)>>> = Arc::default();
    let changes = reflector::reflector(
        writer,
        watcher(
            Api::<CachedReport>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(|result| async move { ok_or_log(result) })
    .then(move |report: CachedReport| {
        let (recorder, metrics, reported) = (recorder.clone(), metrics.clone(), reported.clone());
        async move {
            let Err(problem) = &report.facts else {
                return;
            };
            let key = (
                report.metadata.uid.clone().unwrap_or_default(),
                report.metadata.resource_version.clone().unwrap_or_default(),
            );
            if !reported.lock().unwrap().insert(key) {
                return;
            }
            metrics.reports_undecodable.inc();
            tracing::warn!(report = %report.name_any(), %problem, "skipping a CrashReport that does not decode");
            let event = Event {
                type_: EventType::Warning,
                reason: "Undecodable".into(),
                note: Some(
                    format!("crashwatch-operator skips this CrashReport: {problem}")
                        .chars()
                        .take(1000)
                        .collect(),
                ),
                action: "Read".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &report.object_ref(&())).await {
                tracing::warn!(%error, "could not publish an Event");
            }
        }
    });
    (store, changes)
}

/// What of a Node planning and remediation read: the rest (managed fields, images,
/// other annotations) is dropped before it is cached.
fn slim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    if let Some(annotations) = node.metadata.annotations.as_mut() {
        annotations.retain(|key, _| {
            key == LEDGER_ANNOTATION
                || key == crds::node::BOOT_ID_ANNOTATION
                || key == crds::node::REBOOT_ORDER_ANNOTATION
        });
    }
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
        // Only the boot id: the reboot step reads it.
        status.node_info =
            status
                .node_info
                .take()
                .map(|info| k8s_openapi::api::core::v1::NodeSystemInfo {
                    boot_id: info.boot_id,
                    ..Default::default()
                });
        status.daemon_endpoints = None;
        status.addresses = None;
        status.capacity = None;
        status.allocatable = None;
        status.config = None;
        status.features = None;
        status.runtime_handlers = None;
    }
}

/// What of a Node can change a plan: labels, the ledger, the boot id and reboot order,
/// schedulability, taints and the conditions' statuses. A heartbeat changes none of these.
fn node_fingerprint(node: &Node) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    node.metadata.labels.hash(&mut hasher);
    for key in [
        LEDGER_ANNOTATION,
        crds::node::BOOT_ID_ANNOTATION,
        crds::node::REBOOT_ORDER_ANNOTATION,
    ] {
        node.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .hash(&mut hasher);
    }
    node.status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| &i.boot_id)
        .hash(&mut hasher);
    for condition in node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
    {
        (&condition.type_, &condition.status).hash(&mut hasher);
    }
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.unschedulable).hash(&mut hasher);
    serde_json::to_string(&spec.and_then(|s| s.taints.as_ref()))
        .unwrap_or_default()
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// The cache of every Node, reduced by [`slim_node`], and a stream that ticks when a
/// Node changes in a way that matters to a plan (not on heartbeats).
fn cached_nodes(client: &Client) -> (Store<Node>, impl Stream<Item = ()> + Send + 'static) {
    let (store, writer) = reflector::store();
    let changes = reflector::reflector(
        writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(slim_node),
    )
    .touched_objects()
    .predicate_filter(node_fingerprint, Default::default())
    .filter_map(|result| async move { ok_or_log(result).map(|_| ()) });
    (store, changes)
}

/// Every Node, read consistently from the API server, a page at a time.
async fn list_nodes(client: &Client) -> Result<Vec<Arc<Node>>, Error> {
    let api = Api::<Node>::all(client.clone());
    let mut nodes = Vec::new();
    let mut params = ListParams::default().limit(NODE_PAGE);
    loop {
        let page = api.list(&params).await?;
        nodes.extend(page.items.into_iter().map(|mut n| {
            slim_node(&mut n);
            Arc::new(n)
        }));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(nodes),
        }
    }
}

/// Deletes, every [`RETENTION_EVERY`], the reports retention gives up. Each delete is
/// conditional on the version read, so a report that just saw a new occurrence stays.
/// Also frees the Pod watches of deleted policies' drains.
async fn enforce_retention(ctx: Arc<Context>, rules: Retention) {
    let api = Api::<crds::CrashReport>::all(ctx.client.clone());
    let mut ticker = tokio::time::interval(RETENTION_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if ctx.reports.wait_until_ready().await.is_err()
            || ctx.policies.wait_until_ready().await.is_err()
        {
            return;
        }
        // A deleted policy is never reconciled again: free the Pod watches of its drains.
        ctx.keep_drains("", &[]);
        let reports = ctx.reports.state();
        let by_name: HashMap<&str, &CachedReport> = reports
            .iter()
            .filter_map(|r| Some((r.metadata.name.as_deref()?, &**r)))
            .collect();
        let held: Vec<Held> = reports
            .iter()
            .filter_map(|r| {
                let facts = r.facts.as_ref().ok()?;
                Some(Held {
                    name: r.metadata.name.as_deref()?,
                    node: &facts.node_name,
                    last_seen: facts.last_seen(),
                })
            })
            .collect();
        let doomed = retention::to_delete(&held, Timestamp::now(), rules);
        for (name, why) in doomed {
            let Some(report) = by_name.get(name) else {
                continue;
            };
            let params = kube::api::DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: report.metadata.uid.clone(),
                    resource_version: report.metadata.resource_version.clone(),
                }),
                ..kube::api::DeleteParams::default()
            };
            match api.delete(name, &params).await {
                Ok(_) => {
                    ctx.metrics
                        .reports_deleted
                        .with_label_values(&[why.label()])
                        .inc();
                    tracing::info!(report = %name, reason = why.label(), "deleted a CrashReport");
                }
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
                Err(error) => {
                    tracing::warn!(report = %name, %error, "could not delete a CrashReport");
                    break;
                }
            }
        }
    }
}

fn error_policy(_: Arc<RemediationPolicy>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed; retrying in 5s");
    Action::requeue(Duration::from_secs(5))
}

/// The nodes a policy selects, each with the reports that match the policy.
fn views(
    policy: &RemediationPolicy,
    selector: &Selector,
    nodes: &[Arc<Node>],
    reports: &[Arc<CachedReport>],
    pod_labels: &HashMap<PodKey, Labels>,
) -> Vec<NodeView> {
    let mut by_node: HashMap<&str, Vec<ReportTimes>> = HashMap::new();
    let decoded = reports.iter().filter_map(|r| r.facts.as_ref().ok());
    let labels = |facts: &crate::reports::ReportFacts| {
        facts
            .pod
            .as_ref()
            .and_then(|p| pod_labels.get(&(p.namespace.clone(), p.name.clone())))
            .map_or(PodLabels::Unknown, PodLabels::Known)
    };
    for facts in decoded.filter(|f| report_matches(&policy.spec, f, labels(f))) {
        by_node
            .entry(facts.node_name.as_str())
            .or_default()
            .push(facts.times.clone());
    }
    nodes
        .iter()
        .filter(|n| selector.matches(n.labels()))
        .map(|n| {
            let mut view = node::view(n);
            view.reports = by_node.remove(view.name.as_str()).unwrap_or_default();
            view
        })
        .collect()
}

async fn reconcile(policy: Arc<RemediationPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_seconds.start_timer();
    let ready = async {
        ctx.reports.wait_until_ready().await.ok();
        ctx.nodes.wait_until_ready().await.ok();
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .map_err(|_| Error::CachesNotReady)?;
    let name = policy.name_any();
    let now = Timestamp::now();
    let checked = Rules::new(&name, &policy.spec)
        .map_err(|e| e.to_string())
        .and_then(|rules| {
            let selector = policy.spec.selector.node_selector.clone().map_or_else(
                || Ok(Selector::default()),
                |s| Selector::try_from(s).map_err(|e| format!("match.nodeSelector: {e}")),
            )?;
            if let Some(pods) = policy.spec.selector.pods.as_ref()
                && let Some(wanted) = pods.selector.clone()
            {
                Selector::try_from(wanted).map_err(|e| format!("match.pods.selector: {e}"))?;
            }
            Ok((rules, selector))
        });
    let (rules, selector) = match checked {
        Ok(checked) => checked,
        Err(problem) => {
            ctx.keep_drains(&name, &[]);
            write_status(
                &ctx,
                &policy,
                Vec::new(),
                invalid_conditions(&policy, &problem, now),
            )
            .await?;
            return Ok(Action::await_change());
        }
    };

    let reports = ctx.reports.state();
    let pod_labels = ctx.labels_for(&policy, &reports).await?;
    let mut nodes = ctx.nodes.state();
    let mut plan = plan(
        &rules,
        &views(&policy, &selector, &nodes, &reports, &pod_labels),
        now,
    );
    if !plan.changes.is_empty() {
        // Whatever writes is decided on a consistent read of the Nodes, not on the cache,
        // which may not show the last writes yet: the budget holds even then.
        nodes = list_nodes(&ctx.client).await?;
        plan = crate::policy::plan::plan(
            &rules,
            &views(&policy, &selector, &nodes, &reports, &pod_labels),
            now,
        );
    }
    ctx.metrics
        .hung_after_drain
        .with_label_values(&[&name])
        .set(plan.hung_after_drain as i64);
    let draining: Vec<&str> = plan.drains.iter().map(|d| d.node.as_str()).collect();
    ctx.keep_drains(&name, &draining);
    let mut latest: HashMap<String, Node> = nodes
        .iter()
        .filter(|n| {
            plan.changes
                .iter()
                .any(|c| Some(&c.node) == n.metadata.name.as_ref())
                || plan
                    .drains
                    .iter()
                    .any(|d| Some(&d.node) == n.metadata.name.as_ref())
        })
        .map(|n| (n.name_any(), (**n).clone()))
        .collect();

    let node_api = Api::<Node>::all(ctx.client.clone());
    for change in &plan.changes {
        let Some(current) = latest.get(&change.node) else {
            continue;
        };
        let label = change_label(change.kind);
        match node::apply(&node_api, current, change).await {
            Ok(written) => {
                ctx.metrics
                    .remediations
                    .with_label_values(&[label, "success"])
                    .inc();
                latest.insert(change.node.clone(), written);
            }
            Err(error) => {
                ctx.metrics
                    .remediations
                    .with_label_values(&[label, "error"])
                    .inc();
                return Err(error.into());
            }
        }
        let message = change_message(&rules, &plan, change);
        node::set_condition(
            &node_api,
            &change.node,
            node::condition_for(change.kind),
            &message,
            now,
        )
        .await?;
        if change.kind == ChangeKind::Rebooted
            && let Some(seconds) = reboot_step(change, &name).and_then(|s| s.seconds)
        {
            ctx.metrics.reboot_seconds.observe(seconds);
        }
        let severity = match change.kind {
            ChangeKind::DrainTimedOut | ChangeKind::RebootOrdered | ChangeKind::RebootTimedOut => {
                EventType::Warning
            }
            _ => EventType::Normal,
        };
        if matches!(
            change.kind,
            ChangeKind::Release(_) | ChangeKind::DrainTimedOut
        ) {
            ctx.forget_pods_on(&change.node);
        }
        let reason = node::condition_for(change.kind).1;
        publish(&ctx, &policy, &change.node, severity, reason, &message).await;
        tracing::info!(policy = %name, node = %change.node, %reason, "{message}");
    }

    let mut requeue = RESYNC;
    if let Some(wake) = plan.wake_at {
        let until = Duration::try_from(wake.duration_since(now)).unwrap_or_default();
        requeue = requeue.min(until.max(Duration::from_millis(100)));
    }
    for order in &plan.drains {
        let grace = policy
            .spec
            .drain
            .as_ref()
            .and_then(|d| d.grace_period_seconds);
        let opt_ins = policy
            .spec
            .drain
            .as_ref()
            .map_or_else(Default::default, |d| drain::OptIns {
                force: d.force,
                delete_empty_dir_data: d.delete_empty_dir_data,
            });
        let pods = ctx.pods_on(&order.node, &name).await?;
        let own_pod = (ctx.own_pod.0.as_str(), ctx.own_pod.1.as_str());
        let progress = drain::step(
            &pods,
            own_pod,
            &ctx.eviction_client,
            &order.node,
            grace,
            opt_ins,
        )
        .await?;
        let entry = plan.nodes.iter_mut().find(|n| n.name == order.node);
        match progress {
            drain::Progress::Refused(pods) => {
                requeue = requeue.min(DRAIN_POLL);
                if let Some(entry) = entry {
                    entry.state = RemediationState::Blocked;
                    entry.reason = Some(BlockReason::Unevictable.because(&format!(
                        "as kubectl drain, evicting nothing: {}",
                        pods.join("; ")
                    )));
                }
            }
            drain::Progress::Done => {
                ctx.forget_pods_on(&order.node);
                let current = match latest.get(&order.node) {
                    Some(current) => current.clone(),
                    None => node_api.get(&order.node).await?,
                };
                let mut ledger = node::ledger_of(&current).0;
                if let Some(record) = ledger.get_mut(&name) {
                    record.drain = Some(DrainPhase::Drained);
                }
                node::write_ledger(&node_api, &current, &ledger).await?;
                ctx.metrics
                    .remediations
                    .with_label_values(&["DrainComplete", "success"])
                    .inc();
                let message = format!("policy {name}: every evictable pod left {}", order.node);
                node::set_condition(&node_api, &order.node, ("True", "Drained"), &message, now)
                    .await?;
                publish(
                    &ctx,
                    &policy,
                    &order.node,
                    EventType::Normal,
                    "Drained",
                    &message,
                )
                .await;
                if let Some(entry) = entry {
                    entry.state = RemediationState::Drained;
                }
            }
            drain::Progress::Waiting { remaining, refused } => {
                let mut backoffs = ctx.eviction_backoff.lock().unwrap();
                let wait = if refused.is_empty() {
                    backoffs.remove(&order.node);
                    DRAIN_POLL
                } else {
                    let next = backoffs
                        .get(&order.node)
                        .map_or(FIRST_EVICTION_RETRY, |b| (*b * 2).min(MAX_EVICTION_BACKOFF));
                    backoffs.insert(order.node.clone(), next);
                    next
                };
                requeue = requeue.min(wait);
                if let (Some(entry), Some(first)) = (entry, refused.first()) {
                    entry.state = RemediationState::Blocked;
                    entry.reason = Some(BlockReason::Pdb.because(&format!(
                        "{remaining} pods left; a disruption budget refuses {first}"
                    )));
                }
            }
        }
    }

    // What this process last wrote is fresher than the cached policy, which may not show
    // that write yet; a new process starts from the stored status.
    let uid = policy.metadata.uid.clone().unwrap_or_default();
    let previous = ctx
        .written_status
        .lock()
        .unwrap()
        .get(&uid)
        .cloned()
        .unwrap_or_else(|| policy.status.clone().unwrap_or_default().nodes);
    let mut entries = plan.nodes.clone();
    carry_since(&previous, &mut entries, now);
    for entry in news(&previous, &entries) {
        let reason = entry.reason.clone().unwrap_or_default();
        if entry.state == RemediationState::WouldAct {
            let action = if reason.starts_with("would reboot") {
                change_label(ChangeKind::RebootOrdered)
            } else {
                action_label(&rules)
            };
            ctx.metrics
                .remediations
                .with_label_values(&[action, "dry_run"])
                .inc();
            publish(
                &ctx,
                &policy,
                &entry.name,
                EventType::Normal,
                "DryRun",
                &format!("policy {name} (dry run): {reason}"),
            )
            .await;
        } else if let Some(block) = BlockReason::of_status(&reason) {
            ctx.metrics
                .remediations_blocked
                .with_label_values(&[block.label()])
                .inc();
            publish(
                &ctx,
                &policy,
                &entry.name,
                EventType::Warning,
                "RemediationBlocked",
                &format!("policy {name} holds back: {reason}"),
            )
            .await;
        }
    }
    let conditions = conditions(&policy, &plan, &entries, now);
    write_status(&ctx, &policy, entries.clone(), conditions).await?;
    ctx.written_status.lock().unwrap().insert(uid, entries);
    ctx.metrics.nodes_remediated.set(
        ctx.nodes
            .state()
            .iter()
            .filter(|n| node::ledger_of(n).0.values().any(|r| r.is_active()))
            .count() as i64,
    );
    Ok(Action::requeue(requeue))
}

fn reboot_step<'a>(
    change: &'a Change,
    policy: &str,
) -> Option<&'a crate::policy::ledger::RebootStep> {
    change.ledger.get(policy)?.reboot.as_ref()
}

fn action_label(rules: &Rules) -> &'static str {
    change_label(ChangeKind::Remediate(rules.action))
}

fn change_label(kind: ChangeKind) -> &'static str {
    match kind {
        ChangeKind::Remediate(crds::policy::Action::Cordon) => "Cordon",
        ChangeKind::Remediate(crds::policy::Action::Taint) => "Taint",
        ChangeKind::Remediate(crds::policy::Action::Drain) => "Drain",
        ChangeKind::Release(ReleasedBy::Recovery) => "Recover",
        ChangeKind::Release(ReleasedBy::Human) => "ReleaseByUser",
        ChangeKind::DrainTimedOut => "DrainTimeout",
        ChangeKind::RebootOrdered => "Reboot",
        ChangeKind::Rebooted => "RebootComplete",
        ChangeKind::RebootTimedOut => "RebootTimeout",
        ChangeKind::RebootCancelled => "RebootCancel",
    }
}

fn change_message(rules: &Rules, plan: &Plan, change: &Change) -> String {
    let policy = &rules.policy;
    let occurrences = plan
        .nodes
        .iter()
        .find(|n| n.name == change.node)
        .map_or(0, |n| n.occurrences);
    match change.kind {
        ChangeKind::Remediate(action) => format!(
            "policy {policy}: {} {}: {occurrences} matching occurrences within {:?}, threshold {}",
            verb(action),
            change.node,
            rules.window,
            rules.threshold
        ),
        ChangeKind::Release(ReleasedBy::Recovery) => format!(
            "policy {policy}: {} was quiet for {:?}; undid only this policy's own cordon or taint",
            change.node,
            rules.uncordon_after.unwrap_or_default()
        ),
        ChangeKind::Release(ReleasedBy::Human) => format!(
            "policy {policy}: someone else uncordoned or untainted {}; the same reports will not act again, new ones may",
            change.node
        ),
        ChangeKind::DrainTimedOut => format!(
            "policy {policy}: the drain of {} did not finish within {:?}; evictions stopped, the node stays cordoned",
            change.node, rules.drain_timeout
        ),
        ChangeKind::RebootOrdered => format!(
            "policy {policy}: ordered a reboot of {} (boot {}): its drain timed out and {} is still True; its crashwatch-agent reboots it through sysrq",
            change.node,
            reboot_step(change, policy).map_or("?", |s| s.boot_id.as_str()),
            rules
                .reboot
                .as_ref()
                .map_or("ProcessHung", |r| r.hang_condition.as_str()),
        ),
        ChangeKind::Rebooted => {
            let step = reboot_step(change, policy);
            format!(
                "policy {policy}: {} came back with boot id {} {:.0}s after the reboot order",
                change.node,
                step.and_then(|s| s.new_boot_id.as_deref()).unwrap_or("?"),
                step.and_then(|s| s.seconds).unwrap_or_default(),
            )
        }
        ChangeKind::RebootTimedOut => format!(
            "policy {policy}: {} did not come back with a new boot id within {:?} of the reboot order; the order is withdrawn",
            change.node,
            rules.reboot.as_ref().map(|r| r.timeout).unwrap_or_default()
        ),
        ChangeKind::RebootCancelled => format!(
            "policy {policy}: the reboot order for {} is withdrawn: the hang cleared, the node was uncordoned, or the policy is paused or in dry run",
            change.node
        ),
    }
}

async fn publish(
    ctx: &Context,
    policy: &RemediationPolicy,
    node: &str,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.to_owned()),
        ..ObjectReference::default()
    };
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Remediate".into(),
        secondary: Some(policy.object_ref(&())),
    };
    if let Err(error) = ctx.recorder.publish(&event, &regarding).await {
        tracing::warn!(%node, %error, "could not publish an Event");
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    previous: &[Condition],
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

fn conditions(
    policy: &RemediationPolicy,
    plan: &Plan,
    entries: &[NodeRemediation],
    now: Timestamp,
) -> Vec<Condition> {
    let previous = policy.status.as_ref().map_or(&[][..], |s| &s.conditions);
    let generation = policy.metadata.generation;
    let budget = plan.budget;
    let exhausted = entries
        .iter()
        .any(|e| e.reason.as_deref().and_then(BlockReason::of_status) == Some(BlockReason::Budget));
    vec![
        condition(
            "Ready",
            true,
            "Reconciled",
            format!("{} nodes selected", budget.selected),
            previous,
            generation,
            now,
        ),
        condition(
            "BudgetExhausted",
            exhausted,
            if exhausted {
                "MaxUnavailableReached"
            } else {
                "WithinBudget"
            },
            format!(
                "{} of {} selected nodes unavailable; maxUnavailable {}",
                budget.unavailable, budget.selected, budget.max_unavailable
            ),
            previous,
            generation,
            now,
        ),
    ]
}

fn invalid_conditions(policy: &RemediationPolicy, problem: &str, now: Timestamp) -> Vec<Condition> {
    let previous = policy.status.as_ref().map_or(&[][..], |s| &s.conditions);
    vec![condition(
        "Ready",
        false,
        "InvalidSpec",
        problem.to_owned(),
        previous,
        policy.metadata.generation,
        now,
    )]
}

/// Writes the status when it differs from what is stored.
async fn write_status(
    ctx: &Context,
    policy: &RemediationPolicy,
    nodes: Vec<NodeRemediation>,
    conditions: Vec<Condition>,
) -> Result<(), Error> {
    let status = RemediationPolicyStatus {
        nodes,
        conditions,
        observed_generation: policy.metadata.generation,
    };
    if policy.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({ "status": {
        "nodes": status.nodes,
        "conditions": status.conditions,
        "observedGeneration": status.observed_generation,
    }});
    Api::<RemediationPolicy>::all(ctx.client.clone())
        .patch_status(&policy.name_any(), &node::params(), &Patch::Merge(patch))
        .await?;
    Ok(())
}
