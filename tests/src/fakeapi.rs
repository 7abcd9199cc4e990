//! A small fake Kubernetes API server for the agent's end-to-end tests.
//!
//! No real kube-apiserver can be installed on the test machines, so this one speaks just
//! enough of the real protocol for the three resources the agent watches, the way a
//! client-go or kube-rs watcher sees it:
//! - `GET /api/v1/services`, `GET /apis/discovery.k8s.io/v1/endpointslices` and
//!   `GET /api/v1/nodes` (with `fieldSelector=metadata.name=...`) list every object with
//!   the list's `resourceVersion`;
//! - the same paths with `watch=true&resourceVersion=RV` stream `ADDED`, `MODIFIED` and
//!   `DELETED` events after RV as chunked JSON lines, `BOOKMARK` events when
//!   `allowWatchBookmarks=true`, and end after `timeoutSeconds`;
//! - a watch from a resourceVersion older than the retained history gets the real
//!   apiserver's answer: HTTP 200 and one `ERROR` event with a 410 `Expired` Status;
//! - MetalLB's `IPAddressPool` and `L2Advertisement` (`/apis/metallb.io/v1beta1/...`,
//!   every namespace) the same way, unless [`FakeApi::set_served`] took their CRD away
//!   (then 404, as an apiserver without the CRD answers);
//! - `coordination.k8s.io/v1` Leases by name in a namespace: `GET` (404 when absent),
//!   `POST` (409 AlreadyExists) and `PUT` (409 Conflict when the body's
//!   `resourceVersion` is not the stored one), for the LB-IPAM leader election; and
//!   their list and watch in that namespace (`fieldSelector=metadata.name=...`);
//! - `PATCH .../services/NAME/status` with a JSON merge patch: only the patch's
//!   `status` is applied, as the status subresource does; counted per Service;
//! - anything else (the agent makes no other call) is answered 404.
//!
//! Test controls: [`FakeApi::apply`] and [`FakeApi::delete`] change objects (one global
//! resourceVersion counter, as etcd has), [`FakeApi::expire`] forgets the history and
//! ends every watch with a 410, [`FakeApi::drop_connections`] cuts every open
//! connection, [`FakeApi::end_watches`] ends every watch cleanly, and
//! [`FakeApi::stop`] / [`FakeApi::restart`] take the server off the air (connections
//! refused) and back on the same port. It listens on 127.0.0.1, or with
//! [`FakeApi::start_in_netns`] on an address of a lab's own network namespace (the L2
//! lab's agents run in namespaces of their own), and everything stops when it is dropped.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// How often an idle watch gets a bookmark (the real apiserver: about once a minute;
/// shorter here so that tests exercise them).
const BOOKMARK_EVERY: Duration = Duration::from_secs(2);

/// The resources this server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
    IPAddressPools,
    L2Advertisements,
    Leases,
}

impl Resource {
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Self::Services),
            "EndpointSlice" => Some(Self::EndpointSlices),
            "Node" => Some(Self::Nodes),
            "IPAddressPool" => Some(Self::IPAddressPools),
            "L2Advertisement" => Some(Self::L2Advertisements),
            "Lease" => Some(Self::Leases),
            _ => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
            Self::IPAddressPools => "IPAddressPool",
            Self::L2Advertisements => "L2Advertisement",
            Self::Leases => "Lease",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            Self::IPAddressPools | Self::L2Advertisements => "metallb.io/v1beta1",
            Self::Leases => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlices),
            "/api/v1/nodes" => Some(Self::Nodes),
            "/apis/metallb.io/v1beta1/ipaddresspools" => Some(Self::IPAddressPools),
            "/apis/metallb.io/v1beta1/l2advertisements" => Some(Self::L2Advertisements),
            _ => None,
        }
    }

    /// The resource a list or watch path names, and its namespace when the path has
    /// one (Leases: `/apis/coordination.k8s.io/v1/namespaces/NS/leases`).
    fn route(path: &str) -> Option<(Self, Option<String>)> {
        if let Some(r) = Self::from_path(path) {
            return Some((r, None));
        }
        let ns = path
            .strip_prefix("/apis/coordination.k8s.io/v1/namespaces/")?
            .strip_suffix("/leases")?;
        (!ns.is_empty() && !ns.contains('/')).then(|| (Self::Leases, Some(ns.to_owned())))
    }
}

/// One change, kept for watches that resume from an older resourceVersion.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    type_: &'static str,
    object: Value,
}

/// What the tests can read back about the traffic the server saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// List requests per kind.
    pub lists: BTreeMap<String, u64>,
    /// Watch requests per kind.
    pub watches: BTreeMap<String, u64>,
    /// Watches answered with 410 Expired.
    pub expired: u64,
    /// Status patches per Service ("namespace/name").
    pub status_patches: BTreeMap<String, u64>,
    /// Lease creates and updates that succeeded, and those refused with 409.
    pub lease_writes: u64,
    pub lease_conflicts: u64,
    /// Lease GETs by name.
    pub lease_reads: u64,
}

impl Counters {
    pub fn lists_of(&self, kind: &str) -> u64 {
        self.lists.get(kind).copied().unwrap_or(0)
    }

    /// Every status patch, of every Service.
    pub fn status_patches_total(&self) -> u64 {
        self.status_patches.values().sum()
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Resource, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410.
    oldest_rv: u64,
    /// Bumped to end every open watch (with a 410 when `expired_epoch` is newer than
    /// the watch).
    epoch: u64,
    expired_epoch: u64,
    counters: Counters,
    /// Open connections, to cut them.
    conns: BTreeMap<u64, TcpStream>,
    next_conn: u64,
    stopping: bool,
    /// Kinds whose CRD is "not installed": answered 404.
    unserved: std::collections::BTreeSet<Resource>,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running server. Dropping it stops the listener and every connection.
pub struct FakeApi {
    addr: SocketAddr,
    /// The network namespace the listener lives in (`None`: the test's own).
    netns: Option<String>,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Starts on a free port of 127.0.0.1.
    pub fn start() -> Result<Self> {
        Self::start_on(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)), None)
    }

    /// Starts on a free port of `ip` in network namespace `netns` (which must have that
    /// address): a socket stays in the namespace it was made in, so the server is
    /// reachable from wherever that namespace is, and from nowhere else.
    pub fn start_in_netns(netns: &str, ip: std::net::IpAddr) -> Result<Self> {
        Self::start_on(SocketAddr::new(ip, 0), Some(netns.to_owned()))
    }

    fn start_on(bind: SocketAddr, netns: Option<String>) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            cond: Condvar::new(),
        });
        let listener = in_ns(netns.as_deref(), || {
            TcpListener::bind(bind).with_context(|| format!("bind the fake API server on {bind}"))
        })?;
        let addr = listener.local_addr().context("fake API server address")?;
        let acceptor = Some(spawn_acceptor(listener, shared.clone()));
        Ok(Self {
            addr,
            netns,
            shared,
            acceptor,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
current-context: fake
",
            url = self.url()
        );
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
    }

    /// Creates or replaces an object (a Service, EndpointSlice or Node as JSON). The
    /// server sets `resourceVersion`, `uid` and `creationTimestamp` as the apiserver does.
    pub fn apply(&self, object: Value) -> Result<()> {
        let mut st = self.shared.lock();
        store(&mut st, object, true)?;
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Deletes an object; a no-op when it does not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let Some(resource) = Resource::from_kind(kind) else {
            bail!("the fake API server does not serve kind {kind:?}");
        };
        let ns = if resource == Resource::Nodes {
            ""
        } else {
            namespace
        };
        let mut st = self.shared.lock();
        let removed = st
            .objects
            .entry(resource)
            .or_default()
            .remove(&(ns.to_owned(), name.to_owned()));
        if let Some(mut object) = removed {
            st.rv += 1;
            let rv = st.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.history.push(Change {
                rv,
                resource,
                type_: "DELETED",
                object,
            });
        }
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Forgets the change history (as etcd compaction and a watch-cache restart do) and
    /// ends every open watch with an in-stream 410 Expired. A watcher can then only
    /// resume by relisting.
    pub fn expire(&self) {
        let mut st = self.shared.lock();
        // Move past every version a client has seen, so that resuming from it is
        // "too old" even for a client that got a bookmark a moment ago.
        st.rv += 1;
        st.oldest_rv = st.rv;
        st.history.clear();
        st.epoch += 1;
        st.expired_epoch = st.epoch;
        drop(st);
        self.shared.cond.notify_all();
    }

    /// Like [`FakeApi::expire`], but `objects` are applied first without any watch
    /// event: as if they changed while the history that held the change was compacted
    /// away. Only a relist can see them.
    pub fn expire_with(&self, objects: &[Value]) -> Result<()> {
        // One critical section: no watch thread can send anything in between.
        let mut st = self.shared.lock();
        for o in objects {
            store(&mut st, o.clone(), false)?;
        }
        st.rv += 1;
        st.oldest_rv = st.rv;
        st.history.clear();
        st.epoch += 1;
        st.expired_epoch = st.epoch;
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Cuts every open connection (a network blip or an apiserver restart); watches
    /// can resume from their last resourceVersion.
    pub fn drop_connections(&self) {
        let mut st = self.shared.lock();
        st.epoch += 1;
        for (_, c) in std::mem::take(&mut st.conns) {
            let _ = c.shutdown(Shutdown::Both);
        }
        drop(st);
        self.shared.cond.notify_all();
    }

    /// Ends every open watch cleanly, as the apiserver does when a watch reaches its
    /// `timeoutSeconds` or when it sheds load: the chunked stream is closed without an
    /// error and the connection stays usable. Watchers resume from their last
    /// resourceVersion.
    pub fn end_watches(&self) {
        self.shared.lock().epoch += 1;
        self.shared.cond.notify_all();
    }

    /// Takes the server off the air: the port is closed (connections are refused) and
    /// every open connection is cut. The objects are kept.
    pub fn stop(&mut self) {
        self.shared.lock().stopping = true;
        self.drop_connections();
        // Wake the acceptor, which then sees `stopping` and closes the listener.
        let addr = self.addr;
        let _ = in_ns(self.netns.as_deref(), || {
            Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
        });
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }

    /// Back on the air on the same port, after [`FakeApi::stop`].
    pub fn restart(&mut self) -> Result<()> {
        if self.acceptor.is_some() {
            bail!("the fake API server is running");
        }
        self.shared.lock().stopping = false;
        // The port was ours a moment ago; std sets SO_REUSEADDR on listeners, so a
        // connection in TIME_WAIT does not block the bind. Retry briefly anyway.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match in_ns(self.netns.as_deref(), || Ok(TcpListener::bind(self.addr)))? {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("fakeapi: rebind {}: {e}; retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).with_context(|| format!("rebind {}", self.addr)),
            }
        };
        self.acceptor = Some(spawn_acceptor(listener, self.shared.clone()));
        Ok(())
    }

    /// Installs (`true`) or removes the CRD of a MetalLB kind: while it is removed,
    /// lists and watches of the kind get 404.
    pub fn set_served(&self, kind: &str, served: bool) -> Result<()> {
        let Some(resource) = Resource::from_kind(kind) else {
            bail!("the fake API server does not serve kind {kind:?}");
        };
        let mut st = self.shared.lock();
        if served {
            st.unserved.remove(&resource);
        } else {
            st.unserved.insert(resource);
        }
        st.epoch += 1;
        drop(st);
        self.shared.cond.notify_all();
        Ok(())
    }

    /// The stored object, as a GET would return it.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = Resource::from_kind(kind)?;
        let ns = if resource == Resource::Nodes {
            ""
        } else {
            namespace
        };
        self.shared
            .lock()
            .objects
            .get(&resource)?
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn counters(&self) -> Counters {
        self.shared.lock().counters.clone()
    }

    /// Open client connections right now.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().conns.len()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop();
        }
    }
}

/// Runs `f` in network namespace `ns`, or here.
fn in_ns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match ns {
        Some(ns) => crate::netns::in_netns(ns, f),
        None => f(),
    }
}

/// Stores an object with a new resourceVersion; with `record`, as a watch event too.
fn store(st: &mut State, mut object: Value, record: bool) -> Result<()> {
    let kind = object["kind"].as_str().unwrap_or_default().to_owned();
    let Some(resource) = Resource::from_kind(&kind) else {
        bail!("the fake API server does not serve kind {kind:?}");
    };
    let ns = if resource == Resource::Nodes {
        String::new()
    } else {
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    };
    let name = object["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?
        .to_owned();
    st.rv += 1;
    let rv = st.rv;
    // An update keeps the object's identity, as the apiserver does.
    let old_uid = st
        .objects
        .get(&resource)
        .and_then(|m| m.get(&(ns.clone(), name.clone())))
        .map(|o| o["metadata"]["uid"].clone());
    let meta = object["metadata"]
        .as_object_mut()
        .context("object without metadata")?;
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    let uid = old_uid.unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{rv:012}")));
    meta.entry("uid").or_insert(uid);
    meta.entry("creationTimestamp")
        .or_insert_with(|| json!("2025-01-15T09:30:00Z"));
    if resource != Resource::Nodes {
        meta.insert("namespace".into(), json!(ns));
    }
    object["apiVersion"] = json!(resource.api_version());
    let existed = st
        .objects
        .entry(resource)
        .or_default()
        .insert((ns, name), object.clone())
        .is_some();
    if record {
        st.history.push(Change {
            rv,
            resource,
            type_: if existed { "MODIFIED" } else { "ADDED" },
            object,
        });
    }
    Ok(())
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if shared.lock().stopping {
                break;
            }
            let Ok(stream) = conn else { continue };
            let id = {
                let mut st = shared.lock();
                st.next_conn += 1;
                let id = st.next_conn;
                if let Ok(c) = stream.try_clone() {
                    st.conns.insert(id, c);
                }
                id
            };
            let shared = shared.clone();
            std::thread::spawn(move || {
                let _ = serve_connection(&stream, &shared);
                let _ = stream.shutdown(Shutdown::Both);
                shared.lock().conns.remove(&id);
            });
        }
        // Dropping the listener closes the port.
    })
}

/// One HTTP request: method, path and query.
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(reader: &mut BufReader<&TcpStream>) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    // Lease writes and status patches have a body.
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_owned(),
        query,
        body,
    }))
}

fn write_json(mut w: &TcpStream, code: u16, reason: &str, body: &Value) -> Result<()> {
    let text = body.to_string();
    write!(
        w,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    w.flush()?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn serve_connection(stream: &TcpStream, shared: &Shared) -> Result<()> {
    let mut reader = BufReader::new(stream);
    while let Some(req) = read_request(&mut reader)? {
        let watch = matches!(
            req.query.get("watch").map(String::as_str),
            Some("true" | "1")
        );
        if let Some((resource, _)) = Resource::route(&req.path)
            && req.method == "GET"
            && shared.lock().unserved.contains(&resource)
        {
            let msg = format!(
                "the server could not find the requested resource ({})",
                req.path
            );
            write_json(stream, 404, "Not Found", &status(404, "NotFound", &msg))?;
            continue;
        }
        if let Some((code, reason, body)) = serve_write(shared, &req) {
            write_json(stream, code, reason, &body)?;
            continue;
        }
        if let Some((resource, ns)) = Resource::route(&req.path)
            && req.method == "GET"
        {
            let name_filter = req
                .query
                .get("fieldSelector")
                .and_then(|f| f.strip_prefix("metadata.name="))
                .map(str::to_owned);
            if watch {
                let filter = (ns.as_deref(), name_filter.as_deref());
                serve_watch(stream, shared, resource, &req, filter)?;
            } else {
                let filter = (ns.as_deref(), name_filter.as_deref());
                serve_list(stream, shared, resource, filter)?;
            }
            continue;
        }
        write_json(
            stream,
            404,
            "Not Found",
            &status(
                404,
                "NotFound",
                &format!("{} {} is not served here", req.method, req.path),
            ),
        )?;
    }
    Ok(())
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (k, v) in fields {
        if v.is_null() {
            if let Some(t) = target.as_object_mut() {
                t.remove(k);
            }
        } else {
            merge_patch(&mut target[k], v);
        }
    }
}

/// Lease requests and Service status patches: `Some((code, reason, body))`, or `None`
/// when `req` is neither.
fn serve_write(shared: &Shared, req: &Request) -> Option<(u16, &'static str, Value)> {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "services", name, "status"] if req.method == "PATCH" => {
            Some(patch_status(shared, ns, name, &req.body))
        }
        [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
            rest @ ..,
        ] if !(req.method == "GET" && rest.is_empty()) => Some(lease(
            shared,
            &req.method,
            ns,
            rest.first().copied(),
            &req.body,
        )),
        _ => None,
    }
}

fn not_found(what: &str) -> (u16, &'static str, Value) {
    (
        404,
        "Not Found",
        status(404, "NotFound", &format!("{what} not found")),
    )
}

fn patch_status(shared: &Shared, ns: &str, name: &str, body: &[u8]) -> (u16, &'static str, Value) {
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return (
            400,
            "Bad Request",
            status(400, "BadRequest", "the patch is not JSON"),
        );
    };
    let mut st = shared.lock();
    let key = (ns.to_owned(), name.to_owned());
    let Some(mut object) = st
        .objects
        .get(&Resource::Services)
        .and_then(|m| m.get(&key))
        .cloned()
    else {
        return not_found(&format!("services \"{name}\""));
    };
    // The status subresource takes the status and ignores the rest.
    if let Some(s) = patch.get("status") {
        merge_patch(&mut object["status"], s);
    }
    *st.counters
        .status_patches
        .entry(format!("{ns}/{name}"))
        .or_default() += 1;
    let stored = store(&mut st, object, true).map(|()| {
        st.objects
            .get(&Resource::Services)
            .and_then(|m| m.get(&key))
            .cloned()
            .unwrap_or_default()
    });
    drop(st);
    shared.cond.notify_all();
    match stored {
        Ok(o) => (200, "OK", with_type(Resource::Services, o)),
        Err(e) => (
            500,
            "Internal Server Error",
            status(500, "InternalError", &format!("{e:#}")),
        ),
    }
}

fn lease(
    shared: &Shared,
    method: &str,
    ns: &str,
    name: Option<&str>,
    body: &[u8],
) -> (u16, &'static str, Value) {
    let mut st = shared.lock();
    let stored = |st: &State, name: &str| {
        st.objects
            .get(&Resource::Leases)
            .and_then(|m| m.get(&(ns.to_owned(), name.to_owned())))
            .cloned()
    };
    let sent: Option<Value> = serde_json::from_slice(body).ok();
    if method == "GET" {
        st.counters.lease_reads += 1;
    }
    let out = match (method, name) {
        ("GET", Some(name)) => match stored(&st, name) {
            Some(o) => (200, "OK", with_type(Resource::Leases, o)),
            None => not_found(&format!("leases.coordination.k8s.io \"{name}\"")),
        },
        ("POST", None) | ("PUT", Some(_)) => {
            let Some(mut obj) = sent else {
                return (
                    400,
                    "Bad Request",
                    status(400, "BadRequest", "the body is not JSON"),
                );
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
                return (
                    422,
                    "Unprocessable Entity",
                    status(422, "Invalid", "no metadata.name"),
                );
            };
            let current = stored(&st, &name);
            let refused = match (method, &current) {
                ("POST", Some(_)) => Some(("AlreadyExists", "already exists")),
                ("PUT", None) => {
                    return not_found(&format!("leases.coordination.k8s.io \"{name}\""));
                }
                ("PUT", Some(c))
                    if c["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"] =>
                {
                    Some((
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ))
                }
                _ => None,
            };
            if let Some((reason, msg)) = refused {
                st.counters.lease_conflicts += 1;
                return (409, "Conflict", status(409, reason, msg));
            }
            obj["kind"] = json!("Lease");
            obj["metadata"]["namespace"] = json!(ns);
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            match store(&mut st, obj, true) {
                Ok(()) => {
                    st.counters.lease_writes += 1;
                    let o = stored(&st, &name).unwrap_or_default();
                    if method == "POST" {
                        (201, "Created", with_type(Resource::Leases, o))
                    } else {
                        (200, "OK", with_type(Resource::Leases, o))
                    }
                }
                Err(e) => (
                    500,
                    "Internal Server Error",
                    status(500, "InternalError", &format!("{e:#}")),
                ),
            }
        }
        _ => (
            405,
            "Method Not Allowed",
            status(405, "MethodNotAllowed", method),
        ),
    };
    drop(st);
    out
}

fn with_type(resource: Resource, mut object: Value) -> Value {
    object["kind"] = json!(resource.kind());
    object["apiVersion"] = json!(resource.api_version());
    object
}

/// A list's or watch's filter: the namespace (of a namespaced path) and the
/// `metadata.name` field selector.
type Filter<'a> = (Option<&'a str>, Option<&'a str>);

fn serve_list(
    stream: &TcpStream,
    shared: &Shared,
    resource: Resource,
    (namespace, name): Filter<'_>,
) -> Result<()> {
    let mut st = shared.lock();
    *st.counters
        .lists
        .entry(resource.kind().to_owned())
        .or_default() += 1;
    let items: Vec<Value> = st
        .objects
        .get(&resource)
        .into_iter()
        .flat_map(|m| m.iter())
        .filter(|((ns, n), _)| {
            name.is_none_or(|want| n == want) && namespace.is_none_or(|want| ns == want)
        })
        .map(|(_, o)| with_type(resource, o.clone()))
        .collect();
    let body = json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": { "resourceVersion": st.rv.to_string() },
        "items": items,
    });
    drop(st);
    write_json(stream, 200, "OK", &body)
}

fn chunk(mut w: &TcpStream, line: &Value) -> std::io::Result<()> {
    let text = format!("{line}\n");
    write!(w, "{:x}\r\n{text}\r\n", text.len())?;
    w.flush()
}

fn end_chunks(mut w: &TcpStream) {
    let _ = write!(w, "0\r\n\r\n");
    let _ = w.flush();
}

fn serve_watch(
    stream: &TcpStream,
    shared: &Shared,
    resource: Resource,
    req: &Request,
    (namespace, name): Filter<'_>,
) -> Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let mut w = stream;
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    w.flush()?;
    let end = Instant::now() + timeout;
    let mut st = shared.lock();
    *st.counters
        .watches
        .entry(resource.kind().to_owned())
        .or_default() += 1;
    let epoch = st.epoch;
    // resourceVersion 0 or absent means "from now" here; the watcher always passes the
    // version of its list or of its last event.
    let mut sent_rv = if from == 0 { st.rv } else { from };
    if from != 0 && from < st.oldest_rv {
        st.counters.expired += 1;
        let oldest = st.oldest_rv;
        drop(st);
        let _ = chunk(
            w,
            &json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from} ({oldest})"))}),
        );
        end_chunks(w);
        return Ok(());
    }
    let mut last_bookmark = Instant::now();
    loop {
        if st.epoch != epoch || st.stopping {
            let expired = st.expired_epoch > epoch;
            if expired {
                st.counters.expired += 1;
            }
            drop(st);
            if expired {
                let _ = chunk(
                    w,
                    &json!({"type": "ERROR", "object": status(410, "Expired", "the watch cache was reset")}),
                );
            }
            end_chunks(w);
            return Ok(());
        }
        let pending: Vec<Change> = st
            .history
            .iter()
            .filter(|c| c.rv > sent_rv && c.resource == resource)
            .filter(|c| name.is_none_or(|want| c.object["metadata"]["name"] == *want))
            .filter(|c| namespace.is_none_or(|want| c.object["metadata"]["namespace"] == *want))
            .cloned()
            .collect();
        let now_rv = st.rv;
        drop(st);
        for c in pending {
            let ev = json!({"type": c.type_, "object": with_type(resource, c.object)});
            if chunk(w, &ev).is_err() {
                return Ok(());
            }
            sent_rv = sent_rv.max(c.rv);
        }
        if bookmarks && last_bookmark.elapsed() >= BOOKMARK_EVERY {
            last_bookmark = Instant::now();
            sent_rv = sent_rv.max(now_rv);
            let ev = json!({"type": "BOOKMARK", "object": {
                "kind": resource.kind(),
                "apiVersion": resource.api_version(),
                "metadata": {"resourceVersion": sent_rv.to_string()},
            }});
            if chunk(w, &ev).is_err() {
                return Ok(());
            }
        }
        if Instant::now() >= end {
            end_chunks(w);
            return Ok(());
        }
        st = shared.lock();
        // Changes may have come in while unlocked; sleep only if none did.
        if st.rv == now_rv && st.epoch == epoch && !st.stopping {
            let wait = BOOKMARK_EVERY
                .min(end.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(10));
            st = shared
                .cond
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request on a fresh connection; reads until the server closes or 500 ms of
    /// silence (an open watch).
    fn get(addr: SocketAddr, target: &str) -> (String, String) {
        let mut s = TcpStream::connect(addr).expect("connect");
        write!(
            s,
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            // A plain response is complete once its Content-Length is in.
            let text = String::from_utf8_lossy(&out);
            if let Some((head, body)) = text.split_once("\r\n\r\n")
                && let Some(len) = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|l| l.trim().parse::<usize>().ok())
                && body.len() >= len
            {
                break;
            }
        }
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    }

    fn svc(name: &str) -> Value {
        json!({"kind": "Service", "metadata": {"name": name, "namespace": "ns"}, "spec": {"clusterIP": "10.96.0.1"}})
    }

    #[test]
    fn lists_watches_and_expires() {
        let api = FakeApi::start().expect("start");
        api.apply(svc("a")).expect("apply");
        let (line, body) = get(api.addr(), "/api/v1/services?limit=500");
        assert_eq!(line, "HTTP/1.1 200 OK");
        let list: Value = serde_json::from_str(&body).expect("a list");
        assert_eq!(list["items"][0]["metadata"]["name"], "a");
        assert_eq!(list["items"][0]["kind"], "Service");
        let rv: u64 = list["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("rv");

        api.apply(svc("b")).expect("apply");
        api.delete("Service", "ns", "a").expect("delete");
        // A watch from the list's version replays both changes, then idles.
        let (_, body) = get(
            api.addr(),
            &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
        );
        assert!(body.contains(r#""type":"ADDED""#), "{body}");
        assert!(body.contains(r#""type":"DELETED""#), "{body}");

        api.expire();
        let (_, body) = get(
            api.addr(),
            &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
        );
        assert!(body.contains(r#""code":410"#), "{body}");
        // The earlier watch may still be open: it is ended with a 410 too.
        assert!(api.counters().expired >= 1);
        assert_eq!(api.counters().lists_of("Service"), 1);

        let (line, _) = get(api.addr(), "/api/v1/pods");
        assert_eq!(line, "HTTP/1.1 404 Not Found");
    }

    #[test]
    fn stop_refuses_and_restart_serves_the_same_objects() {
        let mut api = FakeApi::start().expect("start");
        api.apply(json!({"kind": "Node", "metadata": {"name": "n1"}}))
            .expect("apply");
        api.apply(json!({"kind": "Node", "metadata": {"name": "n2"}}))
            .expect("apply");
        api.stop();
        assert!(TcpStream::connect(api.addr()).is_err());
        api.restart().expect("restart");
        let (_, body) = get(api.addr(), "/api/v1/nodes?fieldSelector=metadata.name%3Dn2");
        let list: Value = serde_json::from_str(&body).expect("a list");
        assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
        assert_eq!(list["items"][0]["metadata"]["name"], "n2");
    }

    #[test]
    fn end_watches_closes_the_stream_without_an_error() {
        let api = FakeApi::start().expect("start");
        let addr = api.addr();
        let watch = std::thread::spawn(move || {
            get(addr, "/api/v1/services?watch=true&resourceVersion=100")
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while !api.counters().watches.contains_key("Service") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        api.end_watches();
        let (line, body) = watch.join().expect("the watch thread");
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert!(body.ends_with("0\r\n\r\n"), "{body:?}");
        assert!(!body.contains("ERROR"), "{body:?}");
        assert_eq!(api.counters().expired, 0);
    }

    /// One request with a JSON body on a fresh connection: status line and body.
    fn send(addr: SocketAddr, method: &str, target: &str, body: &Value) -> (String, Value) {
        let mut s = TcpStream::connect(addr).expect("connect");
        let text = body.to_string();
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )
        .expect("write");
        // The server answers every request on a connection until the client stops
        // sending: end ours so that the answer ends with EOF.
        s.shutdown(Shutdown::Write).expect("shutdown");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or_default().to_owned(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    #[test]
    fn leases_refuse_stale_writes_and_status_patches_touch_only_the_status() {
        let api = FakeApi::start().expect("start");
        let path = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
        let (line, _) = send(api.addr(), "GET", &format!("{path}/l"), &Value::Null);
        assert_eq!(line, "HTTP/1.1 404 Not Found");
        let lease = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "n1"}});
        let (line, created) = send(api.addr(), "POST", path, &lease);
        assert_eq!(line, "HTTP/1.1 201 Created");
        let (line, _) = send(api.addr(), "POST", path, &lease);
        assert_eq!(line, "HTTP/1.1 409 Conflict", "a second create");
        // An update from the version read wins once; the same version again is stale.
        let mut update = created.clone();
        update["spec"]["holderIdentity"] = json!("n2");
        let (line, _) = send(api.addr(), "PUT", &format!("{path}/l"), &update);
        assert_eq!(line, "HTTP/1.1 200 OK");
        let (line, _) = send(api.addr(), "PUT", &format!("{path}/l"), &update);
        assert_eq!(line, "HTTP/1.1 409 Conflict", "a stale update");
        let (_, got) = send(api.addr(), "GET", &format!("{path}/l"), &Value::Null);
        assert_eq!(got["spec"]["holderIdentity"], "n2");
        let c = api.counters();
        assert_eq!((c.lease_writes, c.lease_conflicts), (2, 2));

        api.apply(svc("a")).expect("apply");
        let patch = json!({"spec": {"clusterIP": "10.96.9.9"}, "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}});
        let (line, got) = send(
            api.addr(),
            "PATCH",
            "/api/v1/namespaces/ns/services/a/status",
            &patch,
        );
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert_eq!(
            got["status"]["loadBalancer"]["ingress"][0]["ip"],
            "192.0.2.1"
        );
        assert_eq!(
            got["spec"]["clusterIP"], "10.96.0.1",
            "the spec is not the status's"
        );
        let clear = json!({"status": {"loadBalancer": {"ingress": null}}});
        send(
            api.addr(),
            "PATCH",
            "/api/v1/namespaces/ns/services/a/status",
            &clear,
        );
        let stored = api.get("Service", "ns", "a").expect("stored");
        assert_eq!(stored["status"]["loadBalancer"], json!({}));
        assert_eq!(api.counters().status_patches_total(), 2);

        api.set_served("IPAddressPool", false).expect("unserve");
        let (line, _) = get(api.addr(), "/apis/metallb.io/v1beta1/ipaddresspools");
        assert_eq!(line, "HTTP/1.1 404 Not Found");
        api.set_served("IPAddressPool", true).expect("serve");
        let (line, _) = get(api.addr(), "/apis/metallb.io/v1beta1/ipaddresspools");
        assert_eq!(line, "HTTP/1.1 200 OK");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("metadata.name%3Dnode-1"),
            "metadata.name=node-1"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
    }
}
