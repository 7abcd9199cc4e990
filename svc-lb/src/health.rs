//! Health endpoints on `--health-addr` (default: `0.0.0.0:10256` in Kubernetes mode, so
//! that cloud load balancers can probe every node's addresses as they probe kube-proxy;
//! `127.0.0.1:10256` in manifest mode). They follow kube-proxy's `ProxyHealthServer`
//! (pkg/proxy/healthcheck/proxy_health.go):
//! - `/healthz`: 200 when the maps are open, the proxy is not stale and this Node is
//!   eligible; else 503. Body `{"lastUpdated":…,"currentTime":…,"nodeEligible":…}`.
//! - `/livez`: the same without node eligibility (body without `nodeEligible`).
//! - `/readyz`: the initial sync has been applied to the maps and the programs are
//!   attached (ours; kube-proxy has none).
//!
//! Stale: a change reached the agent (a new snapshot) more than [`STALE_AFTER`] ago and
//! no sync has been applied since. Not eligible: the Node has a `deletionTimestamp` or
//! the `ToBeDeletedByClusterAutoscaler` taint, so load balancers drain it first.
//!
//! They are separate from the metrics server on purpose: probes must keep working when
//! metrics are disabled or slow to scrape, and need no bpffs reads.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::api::core::v1::Node;
use tokio::net::TcpListener;

/// The default `--health-addr` in Kubernetes mode (kube-proxy's `--healthz-bind-address`).
pub const DEFAULT_HEALTH_ADDR_KUBE: &str = "0.0.0.0:10256";
/// The default `--health-addr` in manifest mode.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:10256";

/// How long a received change may wait for its sync before the proxy counts as
/// unhealthy: kube-proxy's health timeout, 2 × its default `--sync-period` of 30 s.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// The taint the cluster autoscaler puts on a Node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// `--health-addr`: an address, or `off` (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthAddr(pub Option<SocketAddr>);

/// Parses `--health-addr`.
pub fn parse_addr(s: &str) -> Result<HealthAddr, String> {
    if s == "off" {
        return Ok(HealthAddr(None));
    }
    s.parse()
        .map(|a| HealthAddr(Some(a)))
        .map_err(|e| format!("{s:?} is not ADDR:PORT or \"off\": {e}"))
}

/// Sync timing and node eligibility (kube-proxy's `lastUpdated`, `oldestPendingQueued`
/// and `nodeEligible`).
#[derive(Clone, Copy, Debug)]
struct SyncState {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

impl Default for SyncState {
    fn default() -> Self {
        // Eligible until a Node says otherwise, as kube-proxy starts.
        Self {
            last_updated: None,
            oldest_pending: None,
            node_eligible: true,
        }
    }
}

/// Shared flags and sync state the agent updates as it runs. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct Health {
    loaded: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    sync: Arc<Mutex<SyncState>>,
}

/// What the health of the proxy is at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Loaded and not stale (kube-proxy's `IsHealthy`).
    pub proxy_healthy: bool,
    pub node_eligible: bool,
    /// kube-proxy's `lastUpdated`: `now` when healthy, else the last applied sync
    /// (`None`: never).
    pub last_updated: Option<SystemTime>,
    pub now: SystemTime,
}

impl Health {
    /// The maps are open and the previous agent's state adopted. The programs may still
    /// be in the verifier (the first sync overlaps it); `/readyz` waits for them through
    /// [`Health::set_ready`], while liveness only needs an agent that can write the maps.
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Relaxed);
    }

    /// The initial sync is applied and the programs are attached.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn with<T>(&self, f: impl FnOnce(&mut SyncState) -> T) -> T {
        // The state is a few plain values, whole after any panic: keep using it.
        let mut st = self
            .sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut st)
    }

    /// A change reached the agent at `now` and waits for its sync (kube-proxy's
    /// `QueuedUpdate`): only the oldest pending change counts.
    pub fn queued_at(&self, now: SystemTime) {
        self.with(|st| {
            st.oldest_pending.get_or_insert(now);
        });
    }

    /// A sync was applied at `now` (kube-proxy's `Updated`).
    pub fn updated_at(&self, now: SystemTime) {
        self.with(|st| {
            st.oldest_pending = None;
            st.last_updated = Some(now);
        });
    }

    /// Follows this Node (kube-proxy's `SyncNode`): not eligible once it has a
    /// `deletionTimestamp` or the cluster autoscaler's to-be-deleted taint. `None` (no
    /// Node object, manifest mode) leaves it as it is.
    pub fn sync_node(&self, node: Option<&Node>) {
        let Some(node) = node else {
            return;
        };
        let eligible = node_eligible(node);
        self.with(|st| st.node_eligible = eligible);
    }

    /// The health at `now`.
    pub fn report(&self, now: SystemTime) -> Report {
        let st = self.with(|st| *st);
        let fresh = st.oldest_pending.is_none_or(|t| {
            now.duration_since(t)
                .map_or(true, |waited| waited < STALE_AFTER)
        });
        let proxy_healthy = self.is_loaded() && fresh;
        Report {
            proxy_healthy,
            node_eligible: st.node_eligible,
            last_updated: if proxy_healthy {
                Some(now)
            } else {
                st.last_updated
            },
            now,
        }
    }

    /// `serviceProxyHealthy` of the healthCheckNodePort answers: ready and not stale.
    /// Node eligibility is left out, as kube-proxy's `IsHealthy` leaves it out.
    pub fn service_proxy_healthy(&self) -> bool {
        self.is_ready() && self.report(SystemTime::now()).proxy_healthy
    }
}

/// Whether a Node may take load-balancer traffic (see [`Health::sync_node`]).
pub fn node_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    !node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// RFC 3339 (kube-proxy prints Go's `time.Time` default format; the field names and
/// meaning are the same). Never updated: the zero time, as Go's zero value.
fn timestamp(t: Option<SystemTime>) -> String {
    t.and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok())
        .map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), |t| t.to_string())
}

/// The JSON body of `/healthz` (`with_node`) or `/livez`.
pub fn body(r: &Report, with_node: bool) -> String {
    let mut v = serde_json::json!({
        "lastUpdated": timestamp(r.last_updated),
        "currentTime": timestamp(Some(r.now)),
    });
    if with_node {
        v["nodeEligible"] = serde_json::Value::Bool(r.node_eligible);
    }
    v.to_string()
}

fn json_answer(ok: bool, body: String) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

fn answer(ok: bool, what: &'static str) -> (StatusCode, String) {
    if ok {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not {what}\n"))
    }
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|State(h): State<Health>| async move {
                let r = h.report(SystemTime::now());
                json_answer(r.proxy_healthy && r.node_eligible, body(&r, true))
            }),
        )
        .route(
            "/livez",
            get(|State(h): State<Health>| async move {
                let r = h.report(SystemTime::now());
                json_answer(r.proxy_healthy, body(&r, false))
            }),
        )
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move { answer(h.is_ready(), "synced") }),
        )
        .with_state(health)
}

/// Binds the address now, so that the caller can tell a port in use at start-up.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the health endpoint on {addr}"))
}

/// Serves the endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, health: Health) -> Result<()> {
    axum::serve(listener, router(health))
        .await
        .context("health endpoint server")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get_status(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out.lines().next().unwrap_or_default().to_owned()
    }

    fn node(yaml: &str) -> Node {
        serde_yaml::from_str(yaml).expect("node yaml")
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(secs)
    }

    #[test]
    fn stale_only_while_a_change_waits_longer_than_the_bound() {
        let h = Health::default();
        assert!(!h.report(at(0)).proxy_healthy, "not loaded yet");
        h.set_loaded();
        // Nothing pending: healthy however old the last sync (a quiet cluster).
        assert!(h.report(at(0)).proxy_healthy);
        h.updated_at(at(10));
        assert!(h.report(at(10_000)).proxy_healthy);
        // A change waits: healthy until the bound, then not.
        h.queued_at(at(100));
        h.queued_at(at(150)); // the oldest pending change counts
        assert!(h.report(at(159)).proxy_healthy);
        let late = h.report(at(160));
        assert!(!late.proxy_healthy);
        assert_eq!(
            late.last_updated,
            Some(at(10)),
            "the real last sync when unhealthy"
        );
        // The sync lands: healthy again, lastUpdated is now.
        h.updated_at(at(161));
        let r = h.report(at(170));
        assert!(r.proxy_healthy);
        assert_eq!(r.last_updated, Some(at(170)));
    }

    #[test]
    fn node_eligibility_follows_deletion_and_autoscaler_taint() {
        let plain =
            node("metadata: {name: n1}\nspec: {taints: [{key: other, effect: NoSchedule}]}");
        let tainted = node(
            "metadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1', effect: NoSchedule}]}",
        );
        let deleted = node("metadata: {name: n1, deletionTimestamp: '2025-01-15T09:30:00Z'}");
        assert!(node_eligible(&plain));
        assert!(!node_eligible(&tainted));
        assert!(!node_eligible(&deleted));
        let h = Health::default();
        h.set_loaded();
        assert!(
            h.report(at(0)).node_eligible,
            "eligible until a Node says otherwise"
        );
        h.sync_node(Some(&tainted));
        let r = h.report(at(0));
        assert!(!r.node_eligible && r.proxy_healthy);
        h.sync_node(None);
        assert!(
            !h.report(at(0)).node_eligible,
            "no Node object keeps the last state"
        );
        h.sync_node(Some(&plain));
        assert!(h.report(at(0)).node_eligible);
    }

    #[test]
    fn bodies_have_kube_proxys_fields() {
        let r = Report {
            proxy_healthy: false,
            node_eligible: false,
            last_updated: None,
            now: at(1_700_000_000),
        };
        let v: serde_json::Value = serde_json::from_str(&body(&r, true)).unwrap();
        assert_eq!(v["lastUpdated"], "0001-01-01T00:00:00Z");
        assert_eq!(v["currentTime"], "2023-11-14T22:13:20Z");
        assert_eq!(v["nodeEligible"], false);
        let v: serde_json::Value = serde_json::from_str(&body(&r, false)).unwrap();
        assert!(v.get("nodeEligible").is_none());
    }

    #[tokio::test]
    async fn probes_follow_the_flags() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::default();
        let server = tokio::spawn(serve(listener, health.clone()));
        assert_eq!(
            get_status(addr, "/healthz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(
            get_status(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        health.set_loaded();
        assert_eq!(get_status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        assert_eq!(
            get_status(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(get_status(addr, "/livez").await, "HTTP/1.1 200 OK");
        health.set_ready();
        assert_eq!(get_status(addr, "/readyz").await, "HTTP/1.1 200 OK");
        // A Node about to be deleted: /healthz fails, /livez does not.
        health.sync_node(Some(&node(
            "metadata: {name: n1, deletionTimestamp: '2025-01-15T09:30:00Z'}",
        )));
        assert_eq!(
            get_status(addr, "/healthz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(get_status(addr, "/livez").await, "HTTP/1.1 200 OK");
        // A change pending for longer than the bound: both fail.
        health.queued_at(SystemTime::now() - STALE_AFTER);
        assert_eq!(
            get_status(addr, "/livez").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert!(!health.service_proxy_healthy());
        assert_eq!(get_status(addr, "/nope").await, "HTTP/1.1 404 Not Found");
        server.abort();
    }
}
