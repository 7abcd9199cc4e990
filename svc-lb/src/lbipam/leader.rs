//! Kubernetes mode: LB-IPAM with one writer.
//!
//! Every agent runs the allocator over the same watched objects ([`Ipam::observe`]), for
//! `svc-lb status`, the metrics and the pool of each address it may announce; but the
//! Services' `status.loadBalancer.ingress` is what every agent programs, and only one
//! agent writes it: the holder of the `coordination.k8s.io/v1` Lease [`LEASE_NAME`] in
//! the agent's namespace (the service account's). Allocation starts from what the
//! statuses say (an address a status lists is held first, see [`super::allocate`]), so
//! it survives restarts and leader changes.
//!
//! The election follows client-go's leader election: the leader renews every
//! [`RENEW_EVERY`]; the others watch the Lease (one watch each, with a field selector on
//! its name: no periodic reads), and take it over when it has not changed for its
//! `leaseDurationSeconds` ([`LEASE_DURATION`]) by their own clock (no clock comparison
//! between nodes). A leader that could not renew for [`RENEW_DEADLINE`] stops writing
//! before anyone may take over. Writes are optimistic: a Lease update carries the
//! resourceVersion last seen, so two candidates racing for it get one success and one
//! 409 Conflict (after which the loser reads the Lease again). While the watch is down
//! (an error, RBAC without `watch`), every round reads the Lease with a GET instead.
//!
//! On SIGTERM the leader releases the Lease as client-go's `ReleaseOnCancel` does
//! (holder cleared, `leaseDurationSeconds: 1`): the others see it through their watch
//! and one of them takes over at once instead of after [`LEASE_DURATION`].
//!
//! The leader patches a Service's status (a JSON merge patch of the status subresource)
//! only when the allocation differs from what the status says, and releases an
//! address (clears the status) when a Service stops being a LoadBalancer. A deleted
//! Service needs no write: its address is free at the next allocation.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Service,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Allocation, Ipam, allocate, is_ours, status_ips};
use crate::{model::ServiceRef, source::Snapshot, source::metallb::Pool};

pub const LEASE_NAME: &str = "svc-lb-lbipam";
/// How long a Lease that nobody renews stays with its holder (Cilium's and client-go's
/// default too).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews, and how often the others read the Lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A leader that has not renewed for this long stops writing: before another agent,
/// which waits [`LEASE_DURATION`] from its own last sight of a change, may take over.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How long SIGTERM waits for the Lease's release before the agent exits anyway.
pub const RELEASE_WITHIN: Duration = Duration::from_secs(2);
/// A status written and not seen back in the watch within this long is written again
/// (someone changed it back, or the write was lost).
const REWRITE_AFTER: Duration = Duration::from_secs(30);

/// What the election does next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// No Lease yet: create it, held by us.
    Create(Lease),
    /// Renew ours, or take over an expired one (the Lease keeps the resourceVersion
    /// read, so a race loses with 409).
    Update(Lease),
    /// Someone else holds a live Lease.
    Wait,
}

/// A Lease's holder and renew time: what must change for it to count as renewed.
type Observed = (Option<String>, Option<MicroTime>);

/// The election's state; pure, the clock is passed in.
#[derive(Debug)]
pub struct Elector {
    me: String,
    /// The holder and renew time last seen, and when we first saw them.
    seen: Option<(Observed, Instant)>,
    /// When someone else's Lease expires unless it is renewed meanwhile.
    expires: Option<Instant>,
    /// When we last wrote the Lease successfully as its holder.
    renewed: Option<Instant>,
}

impl Elector {
    pub fn new(me: String) -> Self {
        Self {
            me,
            seen: None,
            expires: None,
            renewed: None,
        }
    }

    fn held_by_me(&self, now: Timestamp, mut lease: Lease, takeover: bool) -> Lease {
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if takeover || spec.holder_identity.as_deref() != Some(&self.me) {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.me.clone());
        spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
        spec.renew_time = Some(MicroTime(now));
        lease
    }

    /// `lease` (ours) handed over: no holder, and one second to live for readers that
    /// honour the duration (client-go's `ReleaseOnCancel` writes the same). After this
    /// we no longer lead.
    pub fn released(&mut self, mut lease: Lease, wall: Timestamp) -> Lease {
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(wall));
        spec.acquire_time = Some(MicroTime(wall));
        self.renewed = None;
        lease
    }

    /// What to do with the Lease as read (`None`: it does not exist) at `now`
    /// (monotonic) and `wall` (written into the Lease).
    pub fn step(&mut self, lease: Option<&Lease>, now: Instant, wall: Timestamp) -> Step {
        self.expires = None;
        let Some(lease) = lease else {
            self.renewed = None;
            let mut new = self.held_by_me(
                wall,
                Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.to_owned()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                },
                true,
            );
            if let Some(spec) = new.spec.as_mut() {
                spec.lease_transitions = Some(0);
            }
            return Step::Create(new);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(&self.me) {
            return Step::Update(self.held_by_me(wall, lease.clone(), false));
        }
        self.renewed = None;
        let observed: Observed = (holder.clone(), spec.renew_time.clone());
        let since = match &self.seen {
            Some((o, t)) if *o == observed => *t,
            _ => {
                self.seen = Some((observed, now));
                now
            }
        };
        let duration = spec
            .lease_duration_seconds
            .filter(|&s| s > 0)
            .map_or(LEASE_DURATION, |s| Duration::from_secs(s as u64));
        if holder.is_none() || now.duration_since(since) >= duration {
            Step::Update(self.held_by_me(wall, lease.clone(), true))
        } else {
            self.expires = Some(since + duration);
            Step::Wait
        }
    }

    /// When the Lease seen last expires, unless renewed: the time to read it again,
    /// so that a takeover does not wait for the next read period.
    pub fn expires(&self) -> Option<Instant> {
        self.expires
    }

    /// The Lease write of the last [`Elector::step`] succeeded at `now`.
    pub fn wrote(&mut self, now: Instant) {
        self.renewed = Some(now);
    }

    /// Whether we lead at `now`.
    pub fn leading(&self, now: Instant) -> bool {
        self.renewed
            .is_some_and(|t| now.duration_since(t) < RENEW_DEADLINE)
    }
}

/// The held addresses for the next allocation in Kubernetes mode: the previous
/// allocation only for Services whose status lists no address, so that what the
/// statuses say (the leader's writes) wins over this agent's own earlier view.
fn held_previous(last: &Allocation, snap: &Snapshot) -> Allocation {
    Allocation {
        assigned: last
            .assigned
            .iter()
            .filter(|(s, _)| {
                snap.services
                    .get(*s)
                    .is_none_or(|svc| status_ips(svc).is_empty())
            })
            .map(|(s, a)| (s.clone(), a.clone()))
            .collect(),
        ..Allocation::default()
    }
}

impl Ipam {
    /// Kubernetes mode: allocates over `snap` without touching it (the statuses are
    /// the ingress addresses), for the metrics, `svc-lb status`, announcement and the
    /// leader's writes. Returns the valid pools.
    pub fn observe(&mut self, snap: &Snapshot) -> Vec<Pool> {
        self.observe_as(snap, true)
    }

    /// [`Ipam::observe`], logging a Service's new pending reason at warn only when
    /// `leading` (at debug otherwise): every agent computes the same reasons, and one
    /// warning per change is enough for the cluster. The status and the metric are
    /// every agent's all the same.
    pub fn observe_as(&mut self, snap: &Snapshot, leading: bool) -> Vec<Pool> {
        let pools = self.read_pools(snap);
        if pools.is_empty() && self.last.is_none() {
            return pools;
        }
        let held = self.last.as_ref().map(|l| held_previous(l, snap));
        let services = snap.services.iter().map(|(r, s)| (r, &**s));
        let alloc = allocate(&pools, services, held.as_ref());
        let before = self.last.as_ref();
        for (service, why) in &alloc.pending {
            if before.and_then(|b| b.pending.get(service)) != Some(why) {
                if leading {
                    warn!(service = %service, reason = %why, "load-balancer address pending");
                } else {
                    debug!(service = %service, reason = %why, "load-balancer address pending (the leader warns)");
                }
            }
        }
        for (service, got) in &alloc.assigned {
            if before.and_then(|b| b.assigned.get(service)) != Some(got) {
                let ips: Vec<IpAddr> = got.iter().map(|a| a.ip).collect();
                debug!(service = %service, addresses = ?ips, "load-balancer addresses allocated");
            }
        }
        crate::metrics::set_lb_pools(&alloc);
        let published = super::status_of(&alloc, &self.errors);
        crate::status::update(|st| st.lb = Some(published));
        self.last = Some(alloc);
        pools
    }
}

/// The status writes the allocation asks for: each Service whose
/// `status.loadBalancer.ingress` addresses differ from its allocation, with the
/// addresses it should list (empty: clear them). A pending Service loses addresses of
/// ours that its status still lists; a Service that is no longer a LoadBalancer (class
/// unset or ours) loses the pool addresses its status lists.
pub fn status_writes(
    snap: &Snapshot,
    alloc: &Allocation,
    pools: &[Pool],
) -> Vec<(ServiceRef, Vec<IpAddr>)> {
    let in_pool = |ip: &IpAddr| pools.iter().any(|p| p.contains(*ip));
    let mut out = Vec::new();
    for (r, svc) in snap.services.iter() {
        let current = status_ips(svc);
        let want: Vec<IpAddr> = match (alloc.assigned.get(r), alloc.pending.get(r)) {
            (Some(got), _) => got.iter().map(|a| a.ip).collect(),
            (None, Some(_)) if current.iter().any(in_pool) => Vec::new(),
            (None, None) if released(svc) && current.iter().any(in_pool) => Vec::new(),
            _ => continue,
        };
        let a: BTreeSet<&IpAddr> = current.iter().collect();
        let b: BTreeSet<&IpAddr> = want.iter().collect();
        if a != b {
            out.push((r.clone(), want));
        }
    }
    out
}

/// No longer a LoadBalancer, with no class of someone else's.
fn released(svc: &crate::source::SvcObj) -> bool {
    let spec = svc.spec.as_ref();
    !is_ours(svc)
        && spec.and_then(|s| s.type_.as_deref()) != Some("LoadBalancer")
        && spec
            .and_then(|s| s.load_balancer_class.as_deref())
            .is_none_or(|c| c == super::LB_CLASS)
}

/// The merge patch of the status subresource that makes `ips` the ingress addresses.
fn status_patch(ips: &[IpAddr]) -> serde_json::Value {
    let ingress = if ips.is_empty() {
        serde_json::Value::Null
    } else {
        ips.iter()
            .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
            .collect()
    };
    json!({"status": {"loadBalancer": {"ingress": ingress}}})
}

/// What the leader works from: the newest snapshot, the allocation over it and the
/// valid pools.
#[derive(Clone, Debug)]
struct Work {
    snap: Snapshot,
    alloc: Allocation,
    pools: Arc<Vec<Pool>>,
}

/// The agent's handle on the election task.
pub struct Writer {
    tx: tokio::sync::watch::Sender<Option<Work>>,
    leading: Arc<AtomicBool>,
    release: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
}

impl Writer {
    /// Hands the leader the newest snapshot and the allocation [`Ipam::observe`] made
    /// of it. Cheap: the snapshot's maps are shared.
    pub fn offer(&self, snap: &Snapshot, ipam: &Ipam, pools: Vec<Pool>) {
        let Some(alloc) = ipam.last.clone() else {
            return;
        };
        self.tx.send_replace(Some(Work {
            snap: snap.clone(),
            alloc,
            pools: Arc::new(pools),
        }));
    }

    /// Whether this agent led at its last election round.
    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// Hands the Lease over if this agent holds it (SIGTERM), waiting at most
    /// [`RELEASE_WITHIN`]; the election task ends.
    pub async fn release(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.release.send(done).await.is_ok() {
            let _ = tokio::time::timeout(RELEASE_WITHIN, wait).await;
        }
    }
}

/// Starts the election and the status writer as `identity` (this node's name) in the
/// client's default namespace (in a pod: the service account's).
pub fn spawn(client: Client, identity: String) -> Writer {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let namespace = client.default_namespace().to_owned();
    info!(
        lease = LEASE_NAME,
        namespace = %namespace,
        identity = %identity,
        lease_secs = LEASE_DURATION.as_secs(),
        renew_secs = RENEW_EVERY.as_secs(),
        "LB-IPAM: status writer elected through a Lease"
    );
    let leading = Arc::new(AtomicBool::new(false));
    let (release, release_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(run(
        client,
        namespace,
        identity,
        rx,
        leading.clone(),
        release_rx,
    ));
    Writer {
        tx,
        leading,
        release,
    }
}

/// The Lease as last watched or written: `None` when unknown (no watch yet, a watch
/// error, a lost race), `Some(None)` when it does not exist.
type Known = Option<Option<Lease>>;

async fn run(
    client: Client,
    namespace: String,
    identity: String,
    mut rx: tokio::sync::watch::Receiver<Option<Work>>,
    leading_flag: Arc<AtomicBool>,
    mut release_rx: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={LEASE_NAME}"));
    let mut events = watcher::watcher(leases.clone(), config)
        .default_backoff()
        .boxed();
    let mut known: Known = None;
    // The Lease seen during a relist, until its end.
    let mut relist: Option<Lease> = None;
    let mut watch_error_logged = false;
    let mut elector = Elector::new(identity);
    let mut written: BTreeMap<ServiceRef, (Vec<IpAddr>, Instant)> = BTreeMap::new();
    let mut next = Instant::now();
    let mut was_leading = false;
    let mut lease_error_logged = false;
    loop {
        let mut round = false;
        tokio::select! {
            () = tokio::time::sleep_until(next) => round = true,
            ev = events.next() => {
                match ev {
                    Some(Ok(watcher::Event::Apply(l))) => known = Some(Some(l)),
                    Some(Ok(watcher::Event::Delete(_))) => known = Some(None),
                    Some(Ok(watcher::Event::Init)) => relist = None,
                    Some(Ok(watcher::Event::InitApply(l))) => relist = Some(l),
                    Some(Ok(watcher::Event::InitDone)) => {
                        known = Some(relist.take());
                        watch_error_logged = false;
                    }
                    Some(Err(e)) => {
                        // Rounds read the Lease with a GET until the watch is back.
                        known = None;
                        if !watch_error_logged {
                            warn!(error = %e, lease = LEASE_NAME, "LB-IPAM: cannot watch the Lease; reading it every round instead");
                            watch_error_logged = true;
                        }
                    }
                    None => {}
                }
                // A follower acts on the change at once (a released Lease is taken
                // over now); the leader renews on its own schedule.
                round = !elector.leading(Instant::now()) && known.is_some();
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            done = release_rx.recv() => {
                release(&leases, &mut elector, &mut known).await;
                leading_flag.store(false, Ordering::Relaxed);
                crate::metrics::set_lb_ipam_leader(false);
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
        if round {
            let now = Instant::now();
            match elect(&leases, &mut elector, &mut known, now).await {
                Ok(()) => lease_error_logged = false,
                Err(e) if !lease_error_logged => {
                    warn!(error = %format!("{e:#}"), lease = LEASE_NAME, "LB-IPAM: the Lease could not be read or written; retrying");
                    lease_error_logged = true;
                }
                Err(e) => debug!(error = %format!("{e:#}"), "LB-IPAM: Lease"),
            }
            next = now + RENEW_EVERY;
            if let Some(t) = elector.expires() {
                // Never sooner than a moment from now: a takeover that lost a race
                // leaves the expiry in the past.
                next = next.min(t.max(now + Duration::from_millis(200)));
            }
        }
        let leading = elector.leading(Instant::now());
        if leading != was_leading {
            if leading {
                info!(
                    lease = LEASE_NAME,
                    "LB-IPAM: this agent leads; it writes the Services' load-balancer status"
                );
                written.clear();
                // Followers logged the pending reasons at debug: the new leader says
                // them once.
                if let Some(work) = rx.borrow().as_ref() {
                    for (service, why) in &work.alloc.pending {
                        warn!(service = %service, reason = %why, "load-balancer address pending");
                    }
                }
            } else {
                warn!(
                    lease = LEASE_NAME,
                    "LB-IPAM: this agent no longer leads; it stops writing"
                );
            }
            crate::metrics::set_lb_ipam_leader(leading);
            leading_flag.store(leading, Ordering::Relaxed);
            was_leading = leading;
        }
        if leading {
            let work = rx.borrow_and_update().clone();
            if let Some(work) = work {
                write_statuses(&client, &work, &mut written, &elector).await;
            }
        }
    }
}

/// The Lease as known, or read now.
async fn current(leases: &Api<Lease>, known: &mut Known) -> anyhow::Result<Option<Lease>> {
    use anyhow::Context;
    if let Some(l) = known {
        return Ok(l.clone());
    }
    let l = leases.get_opt(LEASE_NAME).await.context("get the Lease")?;
    *known = Some(l.clone());
    Ok(l)
}

/// One election round over the Lease as known (read when unknown): create, renew,
/// take over or wait.
async fn elect(
    leases: &Api<Lease>,
    elector: &mut Elector,
    known: &mut Known,
    now: Instant,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let lease = current(leases, known).await?;
    let pp = PostParams::default();
    let result = match elector.step(lease.as_ref(), now, Timestamp::now()) {
        Step::Wait => return Ok(()),
        Step::Create(l) => leases.create(&pp, &l).await,
        Step::Update(l) => leases.replace(LEASE_NAME, &pp, &l).await,
    };
    match result {
        Ok(l) => {
            *known = Some(Some(l));
            elector.wrote(now);
            Ok(())
        }
        // Someone else wrote it first: not an error, the next round reads it.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!("LB-IPAM: another agent wrote the Lease first");
            *known = None;
            Ok(())
        }
        Err(e) => {
            *known = None;
            Err(e).context("write the Lease")
        }
    }
}

/// SIGTERM: if we hold the Lease, hand it over (see [`Elector::released`]).
async fn release(leases: &Api<Lease>, elector: &mut Elector, known: &mut Known) {
    if !elector.leading(Instant::now()) {
        return;
    }
    let pp = PostParams::default();
    let r = match current(leases, known).await {
        Ok(Some(l))
            if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(&elector.me) =>
        {
            let l = elector.released(l, Timestamp::now());
            leases
                .replace(LEASE_NAME, &pp, &l)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => info!(
            lease = LEASE_NAME,
            "LB-IPAM: released the Lease; another agent takes over now"
        ),
        Err(e) => {
            warn!(error = %format!("{e:#}"), lease = LEASE_NAME, "LB-IPAM: could not release the Lease; another agent takes over when it expires")
        }
    }
}

async fn write_statuses(
    client: &Client,
    work: &Work,
    written: &mut BTreeMap<ServiceRef, (Vec<IpAddr>, Instant)>,
    elector: &Elector,
) {
    let writes = status_writes(&work.snap, &work.alloc, &work.pools);
    // Statuses seen back as written are confirmed.
    let pending: BTreeSet<&ServiceRef> = writes.iter().map(|(s, _)| s).collect();
    written.retain(|s, _| pending.contains(s));
    for (service, ips) in writes {
        if !elector.leading(Instant::now()) {
            return;
        }
        if written
            .get(&service)
            .is_some_and(|(w, t)| *w == ips && t.elapsed() < REWRITE_AFTER)
        {
            continue;
        }
        let api: Api<Service> = Api::namespaced(client.clone(), &service.namespace);
        let patch = Patch::Merge(status_patch(&ips));
        match api
            .patch_status(&service.name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                info!(service = %service, addresses = ?ips, "LB-IPAM: wrote status.loadBalancer.ingress");
                crate::metrics::lb_status_written();
                written.insert(service, (ips, Instant::now()));
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                debug!(service = %service, "LB-IPAM: the Service is gone");
            }
            Err(e) => {
                warn!(service = %service, error = %e, "LB-IPAM: could not write the load-balancer status; retrying with the next change or renewal");
            }
        }
    }
}

#[cfg(test)]
mod tests;
