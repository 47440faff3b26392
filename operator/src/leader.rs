//! Leader election on a `coordination.k8s.io` Lease, so that only one replica acts.
//!
//! A lease is taken over when its holder has not renewed it for its duration, measured on
//! this process's own clock from when it last saw the record change (as client-go does), so
//! clock skew between replicas does not matter. Every write is guarded by the Lease's
//! resourceVersion: two candidates cannot both win.

use std::future::Future;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::metrics::OperatorMetrics;

/// A Lease this process competes for.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

/// Leadership was lost, or could not be renewed in time.
#[derive(Debug, thiserror::Error)]
#[error("lost the leader lease {name}: {why}")]
pub struct LostLease {
    name: String,
    why: String,
}

impl LeaseLock {
    /// A lock on Lease `name` in `namespace`, for `identity`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: None,
        }
    }

    fn spec(&self, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the lease once. Ok(true) when this process holds it afterwards.
    pub async fn try_hold(&mut self) -> kube::Result<bool> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, 0)),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.take().unwrap_or_default();
        let record = (spec.holder_identity.clone(), spec.renew_time.clone());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|(holder, renewed, _)| (holder, renewed) != (&record.0, &record.1));
        if changed {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        let mine = holder == self.identity;
        let their_duration =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|(_, _, seen)| seen.elapsed() >= their_duration);
        if !(mine || holder.is_empty() || expired) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(acquired, transitions));
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
    }

    /// Gives the lease up, if this process holds it, so a successor need not wait.
    pub async fn release(&self) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )?;
        Ok(())
    }

    /// Waits until this process holds the lease, then runs `work` while renewing it. Ends
    /// with `work`'s result, or with [`LostLease`] as soon as the lease cannot be kept:
    /// whoever calls this must then stop acting (the binary exits).
    /// A `shutdown` before leadership ends the wait; after it, `work` handles shutdown.
    pub async fn run<S, W>(
        mut self,
        metrics: &OperatorMetrics,
        shutdown: S,
        work: W,
    ) -> anyhow::Result<()>
    where
        S: Future<Output = ()>,
        W: Future<Output = anyhow::Result<()>>,
    {
        let retry = (self.duration / 5).max(Duration::from_millis(200));
        let mut shutdown = std::pin::pin!(shutdown);
        let mut renewed;
        loop {
            let sent = Instant::now();
            match tokio::time::timeout(self.request_deadline(), self.try_hold()).await {
                Ok(Ok(true)) => {
                    renewed = sent;
                    break;
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "cannot read the leader lease"),
                Err(_) => tracing::warn!("the leader lease request did not answer in time"),
            }
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(retry) => {}
            }
        }
        tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
        metrics.leader.set(1);
        let renew_every = (self.duration / 3).max(Duration::from_millis(200));
        let margin = self.margin();
        let name = self.name.clone();
        let result = {
            let keep = async {
                loop {
                    tokio::time::sleep(renew_every).await;
                    // A follower takes over a lease duration after it saw the last renewal,
                    // which it cannot have seen before that renewal was sent: this process
                    // must have stopped acting by then, so every request ends before.
                    let stop_by = renewed + self.duration.saturating_sub(margin);
                    let sent = Instant::now();
                    let left = stop_by.saturating_duration_since(sent);
                    let lost = |why: String| LostLease {
                        name: name.clone(),
                        why,
                    };
                    match tokio::time::timeout(left, self.try_hold()).await {
                        Ok(Ok(true)) => renewed = sent,
                        Ok(Ok(false)) => return lost("another replica holds it".into()),
                        Err(_) => {
                            return lost(format!(
                                "the API server did not answer the renewal within {left:?}, before the lease could pass to another replica"
                            ));
                        }
                        Ok(Err(error)) if Instant::now() + renew_every >= stop_by => {
                            return lost(format!("not renewed in time: {error}"));
                        }
                        Ok(Err(error)) => {
                            tracing::warn!(%error, "renewing the leader lease failed; retrying")
                        }
                    }
                }
            };
            tokio::select! {
                result = work => result,
                lost = keep => Err(lost.into()),
            }
        };
        // The work is dropped here: nothing acts any more.
        metrics.leader.set(0);
        if let Err(error) = &result
            && error.is::<LostLease>()
        {
            tracing::error!(%error, "stopped acting: no longer the leader");
        }
        if result.is_ok() {
            match tokio::time::timeout(self.request_deadline(), self.release()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "could not release the leader lease"),
                Err(_) => tracing::warn!("releasing the leader lease did not answer in time"),
            }
        }
        result
    }

    /// How long before a follower could take over the leader stops: a tenth of the lease,
    /// at least 100 ms.
    fn margin(&self) -> Duration {
        (self.duration / 10).max(Duration::from_millis(100))
    }

    /// The deadline of a request made while not leading: shorter than the lease.
    fn request_deadline(&self) -> Duration {
        self.duration.saturating_sub(self.margin())
    }
}

fn conflict_is_false<T>(result: kube::Result<T>) -> kube::Result<bool> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}
