//! `healthCheckNodePort` servers: for every LoadBalancer Service with
//! `externalTrafficPolicy: Local`, an HTTP listener on its `spec.healthCheckNodePort`
//! that tells the cloud load balancer whether this node has a local endpoint.
//!
//! The answer follows kube-proxy's contract, which load balancers rely on: any method
//! and path; `200` when the node has local endpoints, else `503`;
//! `Content-Type: application/json`, `X-Content-Type-Options: nosniff`, and the body
//! `{"service":{"namespace":…,"name":…},"localEndpoints":N,"serviceProxyHealthy":B}`.
//!
//! [`HealthCheckServer::update`] is called after every sync with the wanted checks. It
//! opens listeners for new ports, closes those of removed ports, and changes the answer
//! of the others in place, so a load balancer's probe never finds the port closed
//! while its Service stays.
//!
//! A port that cannot be bound (another process owns it, the address is gone) fails
//! alone: the error names the Service and port, is logged and counted
//! (`svclb_healthcheck_bind_errors_total`), listed by [`HealthCheckServer::failures`],
//! and retried at the next update. The other ports keep working and `update` returns
//! `Ok`. It returns `Err` only when it had ports to open and could open none of them
//! while none is open either, i.e. the node serves no health check at all: that points
//! at a systemic problem (bind addresses, permissions) rather than one Service.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Result, bail};
use axum::{
    Router,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::oneshot,
};
use tracing::{debug, info, warn};

use crate::health::Health;

/// One Service's health check, as the agent computes it at each sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckEntry {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// How long `update` waits for a removed port's listener to close. Closing only has to
/// stop an accept loop on the same runtime, so this is a safety net, never a delay.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the handlers of one port read; shared so that updates need no rebinding.
type Shared = Arc<RwLock<HealthCheckEntry>>;

#[derive(Clone)]
struct HandlerState {
    entry: Shared,
    proxy_health: Option<Health>,
}

/// The body, with kube-proxy's field names.
#[derive(Serialize)]
struct Body<'a> {
    service: BodyService<'a>,
    #[serde(rename = "localEndpoints")]
    local_endpoints: usize,
    #[serde(rename = "serviceProxyHealthy")]
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct BodyService<'a> {
    namespace: &'a str,
    name: &'a str,
}

fn answer(state: &HandlerState) -> Response {
    // A poisoned lock only means a writer panicked mid-update; the entry is still a
    // whole value (it is replaced, never edited in place), so keep answering.
    let entry = state
        .entry
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let healthy = state
        .proxy_health
        .as_ref()
        .is_none_or(Health::service_proxy_healthy);
    let body = Body {
        service: BodyService {
            namespace: &entry.namespace,
            name: &entry.name,
        },
        local_endpoints: entry.local_endpoints,
        service_proxy_healthy: healthy,
    };
    let status = if entry.local_endpoints > 0 && healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    match serde_json::to_string(&body) {
        Ok(json) => (
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
            json,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn router(state: HandlerState) -> Router {
    // A fallback answers every method and path, as kube-proxy does: load balancers
    // are configured with all sorts of paths ("/", "/healthz").
    Router::new()
        .fallback(
            |axum::extract::State(s): axum::extract::State<HandlerState>| async move { answer(&s) },
        )
        .with_state(state)
}

/// A listener that tells `update` when the server let go of it (the port is closed).
struct TrackedListener {
    inner: TcpListener,
    _closed: oneshot::Sender<()>,
}

impl axum::serve::Listener for TrackedListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    fn accept(&mut self) -> impl Future<Output = (Self::Io, Self::Addr)> + Send {
        axum::serve::Listener::accept(&mut self.inner)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One bound address of a port.
struct Running {
    addr: SocketAddr,
    /// Dropping or sending stops accepting; open connections finish gracefully.
    stop: oneshot::Sender<()>,
    /// Resolves when the listening socket is closed.
    closed: oneshot::Receiver<()>,
}

struct PortServer {
    entry: Shared,
    listeners: Vec<Running>,
}

/// The `healthCheckNodePort` listeners of this node.
pub struct HealthCheckServer {
    bind_addrs: Vec<IpAddr>,
    /// The addresses were not given: `[::]` may be skipped where IPv6 is off.
    default_addrs: bool,
    proxy_health: Option<Health>,
    ports: BTreeMap<u16, PortServer>,
    failures: BTreeMap<u16, String>,
}

/// Binds one listening socket. IPv6 sockets are IPv6-only so that `[::]:P` and
/// `0.0.0.0:P` can both be bound, as separate listeners.
fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            let on: libc::c_int = 1;
            // SAFETY: a valid socket fd and a pointer to an int that outlives the call.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_V6ONLY,
                    std::ptr::from_ref(&on).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            s
        }
    };
    // As every HTTP server does: a port whose previous listener left connections in
    // TIME_WAIT can be bound again at once.
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

impl HealthCheckServer {
    /// Listeners go on each of `bind_addrs` (the node's addresses, for
    /// `--nodeport-addresses`), or on `0.0.0.0` and `[::]` when the list is empty.
    pub fn new(bind_addrs: Vec<IpAddr>) -> Self {
        let default_addrs = bind_addrs.is_empty();
        let mut bind_addrs = if default_addrs {
            vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ]
        } else {
            bind_addrs
        };
        bind_addrs.sort_unstable();
        bind_addrs.dedup();
        Self {
            bind_addrs,
            default_addrs,
            proxy_health: None,
            ports: BTreeMap::new(),
            failures: BTreeMap::new(),
        }
    }

    /// Reports `serviceProxyHealthy` from the agent's health
    /// ([`Health::service_proxy_healthy`]: the initial sync is applied and no change has
    /// waited longer than the staleness bound; node eligibility is left out, as in
    /// kube-proxy); while it is false every check answers 503, as kube-proxy does.
    /// Without it the proxy counts as healthy.
    pub fn with_proxy_health(mut self, health: Health) -> Self {
        self.proxy_health = Some(health);
        self
    }

    /// Ports with at least one open listener.
    pub fn open_ports(&self) -> Vec<u16> {
        self.ports.keys().copied().collect()
    }

    /// The addresses a port is served on.
    pub fn local_addrs(&self, port: u16) -> Vec<SocketAddr> {
        self.ports
            .get(&port)
            .map(|p| p.listeners.iter().map(|l| l.addr).collect())
            .unwrap_or_default()
    }

    /// Ports the last update could not open, with the reason (they are retried at the
    /// next update).
    pub fn failures(&self) -> &BTreeMap<u16, String> {
        &self.failures
    }

    /// Makes the listeners match `checks` (healthCheckNodePort → Service and local
    /// endpoints). See the module documentation for the error rules.
    pub async fn update(&mut self, checks: BTreeMap<u16, HealthCheckEntry>) -> Result<()> {
        // Close the ports that are gone first, so that a port moving between Services
        // in one update is a plain answer change below, not a rebind.
        let removed: Vec<u16> = self
            .ports
            .keys()
            .filter(|p| !checks.contains_key(p))
            .copied()
            .collect();
        for port in removed {
            if let Some(server) = self.ports.remove(&port) {
                close_port(port, server).await;
            }
        }
        self.failures.clear();
        let mut wanted_new = 0usize;
        let mut opened = 0usize;
        for (port, entry) in checks {
            if let Some(server) = self.ports.get(&port) {
                let mut cur = server
                    .entry
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if *cur != entry {
                    debug!(
                        port,
                        service = %format!("{}/{}", entry.namespace, entry.name),
                        local_endpoints = entry.local_endpoints,
                        "health check answer updated"
                    );
                    *cur = entry;
                }
                continue;
            }
            wanted_new += 1;
            let service = format!("{}/{}", entry.namespace, entry.name);
            match self.open_port(port, entry) {
                Ok(server) => {
                    info!(
                        port,
                        service = %service,
                        addrs = ?server.listeners.iter().map(|l| l.addr).collect::<Vec<_>>(),
                        "opened health check node port"
                    );
                    opened += 1;
                    self.ports.insert(port, server);
                }
                Err(e) => {
                    let msg = format!("healthCheckNodePort {port} of Service {service}: {e:#}");
                    warn!(port, service = %service, error = %format!("{e:#}"), "could not open health check node port; retrying at the next sync");
                    crate::metrics::healthcheck_bind_failed();
                    self.failures.insert(port, msg);
                }
            }
        }
        crate::metrics::set_healthcheck_ports(self.ports.len());
        if wanted_new > 0 && opened == 0 && self.ports.is_empty() {
            let all: Vec<&str> = self.failures.values().map(String::as_str).collect();
            bail!(
                "no health check node port could be opened: {}",
                all.join("; ")
            );
        }
        Ok(())
    }

    fn open_port(&self, port: u16, entry: HealthCheckEntry) -> Result<PortServer> {
        if port == 0 {
            bail!("port 0 is not a valid node port");
        }
        let entry: Shared = Arc::new(RwLock::new(entry));
        let state = HandlerState {
            entry: entry.clone(),
            proxy_health: self.proxy_health.clone(),
        };
        let mut bound = Vec::with_capacity(self.bind_addrs.len());
        for ip in &self.bind_addrs {
            let addr = SocketAddr::new(*ip, port);
            match bind_listener(addr) {
                Ok(l) => bound.push((addr, l)),
                Err(e)
                    if self.default_addrs
                        && ip.is_ipv6()
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                        ) =>
                {
                    // IPv6 is off on this node: the IPv4 wildcard is all there is.
                    debug!(port, error = %e, "IPv6 unavailable; health check on IPv4 only");
                }
                // Dropping `bound` closes what this port already opened, so that a retry
                // (or the port's other owner) finds it free.
                Err(e) => bail!("bind {addr}: {e}"),
            }
        }
        if bound.is_empty() {
            bail!("no address to bind");
        }
        let listeners = bound
            .into_iter()
            .map(|(addr, inner)| {
                let (stop, stop_rx) = oneshot::channel::<()>();
                let (closed_tx, closed) = oneshot::channel();
                let listener = TrackedListener {
                    inner,
                    _closed: closed_tx,
                };
                let app = router(state.clone());
                tokio::spawn(async move {
                    let shutdown = async move {
                        // Sent or dropped: either way, stop.
                        let _ = stop_rx.await;
                    };
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                    {
                        warn!(%addr, error = %e, "health check server stopped");
                    }
                });
                Running { addr, stop, closed }
            })
            .collect();
        Ok(PortServer { entry, listeners })
    }
}

async fn close_port(port: u16, server: PortServer) {
    for l in server.listeners {
        let _ = l.stop.send(());
        // Err means the listener was dropped, which is what we wait for.
        if tokio::time::timeout(CLOSE_TIMEOUT, l.closed).await.is_err() {
            warn!(port, addr = %l.addr, "health check listener did not close in time");
        }
    }
    info!(port, "closed health check node port");
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A port that was free a moment ago on 127.0.0.1.
    fn free_port() -> u16 {
        std::net::TcpListener::bind((LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("an ephemeral port")
    }

    struct Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    async fn get(port: u16, method: &str, path: &str) -> std::io::Result<Answer> {
        let mut s = tokio::net::TcpStream::connect((LOCALHOST, port)).await?;
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await?;
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .expect("a status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(Answer {
            status,
            headers,
            body: body.to_owned(),
        })
    }

    fn check(ns: &str, name: &str, n: usize) -> HealthCheckEntry {
        HealthCheckEntry {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            local_endpoints: n,
        }
    }

    #[tokio::test]
    async fn answers_like_kube_proxy_and_follows_updates() {
        let port = free_port();
        let mut hc = HealthCheckServer::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([(port, check("shop", "web", 2))]))
            .await
            .expect("update");
        assert_eq!(hc.open_ports(), vec![port]);
        assert_eq!(hc.local_addrs(port), vec![SocketAddr::new(LOCALHOST, port)]);

        for (method, path) in [("GET", "/"), ("GET", "/healthz"), ("HEAD", "/x/y")] {
            let a = get(port, method, path).await.expect("request");
            assert_eq!(a.status, 200, "{method} {path}");
            assert_eq!(a.header("content-type"), Some("application/json"));
            assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        }
        let a = get(port, "GET", "/").await.expect("request");
        let v: serde_json::Value = serde_json::from_str(&a.body).expect("json body");
        assert_eq!(
            v,
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true
            })
        );

        // No local endpoint any more: 503 with the same body shape, same listener.
        hc.update(BTreeMap::from([(port, check("shop", "web", 0))]))
            .await
            .expect("update");
        let a = get(port, "GET", "/").await.expect("request");
        assert_eq!(a.status, 503);
        assert_eq!(a.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_str(&a.body).expect("json body");
        assert_eq!(v["localEndpoints"], 0);
        assert_eq!(v["service"]["name"], "web");

        // The port moves to another Service: the answer changes, no rebind needed.
        hc.update(BTreeMap::from([(port, check("shop", "cart", 1))]))
            .await
            .expect("update");
        let a = get(port, "GET", "/").await.expect("request");
        assert_eq!(a.status, 200);
        let v: serde_json::Value = serde_json::from_str(&a.body).expect("json body");
        assert_eq!(v["service"]["name"], "cart");
        assert_eq!(v["localEndpoints"], 1);
    }

    #[tokio::test]
    async fn an_unready_proxy_answers_503() {
        let port = free_port();
        let health = Health::default();
        let mut hc = HealthCheckServer::new(vec![LOCALHOST]).with_proxy_health(health.clone());
        hc.update(BTreeMap::from([(port, check("a", "b", 3))]))
            .await
            .expect("update");
        let a = get(port, "GET", "/").await.expect("request");
        assert_eq!(a.status, 503);
        assert!(
            a.body.contains(r#""serviceProxyHealthy":false"#),
            "{}",
            a.body
        );
        health.set_loaded();
        health.set_ready();
        let a = get(port, "GET", "/").await.expect("request");
        assert_eq!(a.status, 200);
        assert!(
            a.body.contains(r#""serviceProxyHealthy":true"#),
            "{}",
            a.body
        );
        // A Node being deleted does not change it (kube-proxy's IsHealthy ignores the
        // Node too); a change pending for longer than the staleness bound does.
        let deleted: k8s_openapi::api::core::v1::Node =
            serde_yaml::from_str("metadata: {name: n1, deletionTimestamp: '2025-01-15T09:30:00Z'}")
                .expect("node");
        health.sync_node(Some(&deleted));
        assert_eq!(get(port, "GET", "/").await.expect("request").status, 200);
        health.queued_at(std::time::SystemTime::now() - crate::health::STALE_AFTER);
        let a = get(port, "GET", "/").await.expect("request");
        assert_eq!(a.status, 503);
        assert!(
            a.body.contains(r#""serviceProxyHealthy":false"#),
            "{}",
            a.body
        );
    }

    #[tokio::test]
    async fn removing_a_port_closes_its_listener() {
        let (p1, p2) = (free_port(), free_port());
        let mut hc = HealthCheckServer::new(vec![LOCALHOST]);
        hc.update(BTreeMap::from([
            (p1, check("a", "one", 1)),
            (p2, check("a", "two", 1)),
        ]))
        .await
        .expect("update");
        assert_eq!(get(p1, "GET", "/").await.expect("p1").status, 200);
        hc.update(BTreeMap::from([(p2, check("a", "two", 1))]))
            .await
            .expect("update");
        assert_eq!(hc.open_ports(), vec![p2]);
        let err = get(p1, "GET", "/").await.err().expect("p1 must be closed");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        // The port is free again: another process could take it.
        std::net::TcpListener::bind((LOCALHOST, p1)).expect("p1 released");
        assert_eq!(get(p2, "GET", "/").await.expect("p2").status, 200);

        // Dropping the server closes everything.
        drop(hc);
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::net::TcpListener::bind((LOCALHOST, p2)).expect("p2 released on drop");
    }

    #[tokio::test]
    async fn a_busy_port_fails_alone_and_is_retried() {
        let busy = std::net::TcpListener::bind((LOCALHOST, 0)).expect("occupy a port");
        let busy_port = busy.local_addr().expect("addr").port();
        let good = free_port();
        let mut hc = HealthCheckServer::new(vec![LOCALHOST]);
        let checks = BTreeMap::from([
            (busy_port, check("shop", "blocked", 1)),
            (good, check("shop", "web", 1)),
        ]);
        hc.update(checks.clone())
            .await
            .expect("one port working is not an error");
        assert_eq!(hc.open_ports(), vec![good]);
        let why = hc.failures().get(&busy_port).expect("a failure");
        assert!(
            why.contains("shop/blocked") && why.contains(&busy_port.to_string()),
            "{why}"
        );
        assert_eq!(get(good, "GET", "/").await.expect("good").status, 200);

        // Once the other owner lets go, the next update opens it.
        drop(busy);
        hc.update(checks).await.expect("update");
        assert!(hc.failures().is_empty(), "{:?}", hc.failures());
        assert_eq!(
            hc.open_ports(),
            vec![busy_port.min(good), busy_port.max(good)]
        );
        assert_eq!(
            get(busy_port, "GET", "/").await.expect("retried").status,
            200
        );
    }

    #[tokio::test]
    async fn nothing_to_serve_at_all_is_an_error() {
        let busy = std::net::TcpListener::bind((LOCALHOST, 0)).expect("occupy a port");
        let port = busy.local_addr().expect("addr").port();
        let mut hc = HealthCheckServer::new(vec![LOCALHOST]);
        let err = hc
            .update(BTreeMap::from([(port, check("ns", "only", 1))]))
            .await
            .expect_err("nothing could be opened");
        assert!(format!("{err:#}").contains("ns/only"), "{err:#}");
        // An empty set is not an error.
        hc.update(BTreeMap::new()).await.expect("empty");
        assert!(hc.failures().is_empty());
    }

    #[tokio::test]
    async fn default_addresses_serve_both_families_on_one_port() {
        let port = free_port();
        let mut hc = HealthCheckServer::new(Vec::new());
        hc.update(BTreeMap::from([(port, check("a", "b", 1))]))
            .await
            .expect("update");
        let addrs = hc.local_addrs(port);
        assert!(
            addrs.contains(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
            "{addrs:?}"
        );
        assert_eq!(get(port, "GET", "/").await.expect("v4").status, 200);
        // Where the kernel has IPv6, [::] must be served too (IPv6-only, beside 0.0.0.0).
        let v6_on = std::path::Path::new("/proc/net/if_inet6").exists();
        assert_eq!(addrs.len(), if v6_on { 2 } else { 1 }, "{addrs:?}");
        if v6_on {
            let mut s = tokio::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port))
                .await
                .expect("v6 connect");
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        }
    }
}
