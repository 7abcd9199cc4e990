//! Health endpoints on `--health-addr` (default 127.0.0.1:10256, kube-proxy's port):
//! - `/healthz`: the process is alive and the datapath (programs and maps) is loaded;
//! - `/readyz`: the initial sync has been applied to the maps and the programs are
//!   attached.
//!
//! They are separate from the metrics server on purpose: probes must keep working when
//! metrics are disabled or slow to scrape, and need no bpffs reads.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context, Result};
use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::net::TcpListener;

/// The default `--health-addr`.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:10256";

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

/// Shared flags the agent raises as it comes up. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct Health {
    loaded: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
}

impl Health {
    /// The eBPF object is loaded and the maps are open.
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
            get(|State(h): State<Health>| async move { answer(h.is_loaded(), "loaded") }),
        )
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move { answer(h.is_ready(), "synced") }),
        )
        .with_state(health)
}

/// Binds the address now, so that a port already in use fails the start-up instead of
/// leaving the agent without probes.
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
        health.set_ready();
        assert_eq!(get_status(addr, "/readyz").await, "HTTP/1.1 200 OK");
        assert_eq!(get_status(addr, "/nope").await, "HTTP/1.1 404 Not Found");
        server.abort();
    }
}
