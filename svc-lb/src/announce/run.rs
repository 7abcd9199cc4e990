//! The announcement task: sends and hears the heartbeat, recomputes which addresses this
//! node wins every heartbeat interval and whenever the agent's view changes, and keeps
//! one [`Responder`] per interface in step.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tokio::{net::UdpSocket, sync::watch};
use tracing::{error, info, warn};

use super::{
    NodeView, Target, assign,
    heartbeat::{self, Codec, Rejected},
    liveness::{Liveness, Timing},
    responder::Responder,
};

/// How often each kind of refused heartbeat is logged at most: a flood of forgeries
/// must not flood the log too (the metric counts every one).
const REJECT_LOG_EVERY: Duration = Duration::from_secs(60);
/// Gratuitous ARP / unsolicited NA after a takeover: at once, then after these delays,
/// in case the first ones were lost.
const REPEATS: [Duration; 2] = [Duration::from_millis(250), Duration::from_millis(1000)];

/// `--l2-announce` and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's name (`--node-name`): its Node object and its heartbeat's name.
    pub me: String,
    /// `--l2-heartbeat-port`: UDP, on every node's InternalIP.
    pub port: u16,
    /// `--l2-heartbeat-interval`.
    pub interval: Duration,
    /// `--l2-heartbeat-key-file`, read at start: heartbeats are authenticated with it
    /// (see [`heartbeat`]).
    pub key: Option<heartbeat::Key>,
    /// The same file, read again at every heartbeat: a Secret's new content (a key
    /// rotation) is taken without a restart.
    pub key_file: Option<PathBuf>,
}

/// What the agent tells the task after each sync.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inputs {
    pub targets: Vec<Target>,
    pub nodes: Vec<NodeView>,
    /// The external path's devices: where targets without interfaces are answered.
    pub default_ifaces: Vec<String>,
}

/// Binds the heartbeat socket (an error stops the agent's start: the port is taken)
/// and starts the task on a thread of its own, so that a long sync never delays a
/// heartbeat (peers would take this node for dead). The agent sends it [`Inputs`].
pub fn spawn(cfg: Config) -> Result<watch::Sender<Inputs>> {
    let sock = match std::net::UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, cfg.port)))
    {
        Ok(s) => s,
        // No IPv6 in this namespace: IPv4 peers only.
        Err(_) => std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], cfg.port)))
            .with_context(|| format!("--l2-heartbeat-port {}: bind UDP", cfg.port))?,
    };
    sock.set_nonblocking(true).context("heartbeat socket")?;
    info!(
        node = %cfg.me,
        port = cfg.port,
        interval_ms = cfg.interval.as_millis() as u64,
        authenticated = cfg.key.is_some(),
        "L2 announcement on: heartbeat listening"
    );
    if cfg.key.is_none() {
        warn!(
            "L2 announcement: the heartbeat is not authenticated (no --l2-heartbeat-key-file): \
             anyone who can send to its port can keep a dead node alive"
        );
    }
    for r in Rejected::ALL {
        crate::metrics::l2_heartbeats_rejected(r.label(), 0);
    }
    // The series exist from the start, so that "announcing nothing" reads as 0.
    crate::metrics::set_l2_announced(0, 0);
    let (tx, rx) = watch::channel(Inputs::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the L2 announcement runtime")?;
    std::thread::Builder::new()
        .name("l2-announce".into())
        .spawn(move || {
            rt.block_on(async move {
                let r = UdpSocket::from_std(sock)
                    .context("heartbeat socket")
                    .map(|sock| run(cfg, sock, rx));
                let r = match r {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    error!(error = %format!("{e:#}"), "L2 announcement stopped");
                }
            });
        })
        .context("start the L2 announcement thread")?;
    Ok(tx)
}

struct State {
    cfg: Config,
    liveness: Liveness,
    responders: BTreeMap<String, Responder>,
    owned: BTreeMap<String, BTreeSet<IpAddr>>,
    repeats: Vec<(Instant, String, Vec<IpAddr>)>,
    warned_no_node: bool,
    last_live: Vec<String>,
}

async fn run(cfg: Config, sock: UdpSocket, mut rx: watch::Receiver<Inputs>) -> Result<()> {
    let v6_socket = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut st = State {
        liveness: Liveness::new(Timing::from_interval(cfg.interval), Instant::now()),
        cfg,
        responders: BTreeMap::new(),
        owned: BTreeMap::new(),
        repeats: Vec::new(),
        warned_no_node: false,
        last_live: Vec::new(),
    };
    let mut codec = Codec::new(st.cfg.key.as_ref());
    let mut key_file = st.cfg.key_file.clone().map(KeyFile::new);
    let mut logged: BTreeMap<&'static str, Instant> = BTreeMap::new();
    let mut buf = [0u8; 512];
    let mut pruned = Instant::now();
    // Nothing is decided before the agent's first sync has told us the Nodes and
    // targets (the channel's initial value is empty, not "no Nodes").
    let mut have_inputs = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(kf) = &mut key_file
                    && let Some(key) = kf.changed()
                {
                    codec.set_key(Some(&key));
                }
                let inputs = rx.borrow().clone();
                let msg = codec.encode(&st.cfg.me, SystemTime::now());
                for peer in inputs.nodes.iter().filter(|n| n.name != st.cfg.me) {
                    for ip in &peer.addresses {
                        let to = match (*ip, v6_socket) {
                            (IpAddr::V4(a), true) => IpAddr::V6(a.to_ipv6_mapped()),
                            (IpAddr::V6(_), false) => continue,
                            (ip, _) => ip,
                        };
                        // A peer that is down answers with ICMP errors; the heartbeat
                        // is best effort by design.
                        let _ = sock.send_to(&msg, SocketAddr::new(to, st.cfg.port)).await;
                    }
                }
                if pruned.elapsed() > Duration::from_secs(60) {
                    st.liveness.prune(Instant::now());
                    codec.retain(|n| st.liveness.knows(n));
                    pruned = Instant::now();
                }
                if have_inputs {
                    st.recompute(&inputs);
                    st.send_repeats();
                }
            }
            r = sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    let now = SystemTime::now();
                    match codec.decode(&buf[..n], now) {
                        Ok(name) => st.liveness.heard(&name, Instant::now()),
                        Err(Rejected::Duplicate) => {}
                        Err(why) => {
                            crate::metrics::l2_heartbeats_rejected(why.label(), 1);
                            let due = logged
                                .get(why.label())
                                .is_none_or(|t| t.elapsed() >= REJECT_LOG_EVERY);
                            if due {
                                logged.insert(why.label(), Instant::now());
                                warn!(
                                    %from,
                                    reason = why.label(),
                                    skew_ms = Codec::skew_ms(&buf[..n], now).map(|s| s as i64),
                                    keyed = codec.keyed(),
                                    "L2 announcement: heartbeat refused (logged once a minute per reason)"
                                );
                            }
                        }
                    }
                }
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    // The agent is gone.
                    return Ok(());
                }
                let inputs = rx.borrow_and_update().clone();
                have_inputs = true;
                st.recompute(&inputs);
            }
        }
    }
}

/// The key file as last read, so that a change is noticed (a Secret volume swaps its
/// files atomically; the kubelet takes up to a minute or so to do it on every node).
struct KeyFile {
    path: PathBuf,
    last: Option<Vec<u8>>,
}

impl KeyFile {
    fn new(path: PathBuf) -> Self {
        let last = heartbeat::read_key_file(&path).ok();
        Self { path, last }
    }

    /// The new keys when the file's content changed and holds valid keys. A file that
    /// cannot be read (missing, not a regular file, over [`heartbeat::MAX_KEY_FILE_BYTES`])
    /// or holds no valid key is reported once per content and changes nothing: the node
    /// keeps its keys, rather than going unkeyed or silent.
    fn changed(&mut self) -> Option<heartbeat::Key> {
        let raw = match heartbeat::read_key_file(&self.path) {
            Ok(raw) => raw,
            Err(e) => {
                if self.last.is_some() {
                    warn!(file = %self.path.display(), error = %format!("{e:#}"), "L2 announcement: heartbeat key file not read; keeping the keys in use");
                    self.last = None;
                }
                return None;
            }
        };
        if self.last.as_ref() == Some(&raw) {
            return None;
        }
        self.last = Some(raw.clone());
        match heartbeat::Key::from_bytes(&raw) {
            Ok(key) => {
                info!(file = %self.path.display(), keys = key.count(), "L2 announcement: heartbeat keys reloaded (the first one signs)");
                Some(key)
            }
            Err(e) => {
                warn!(file = %self.path.display(), error = %e, "L2 announcement: new heartbeat key file refused; keeping the keys in use");
                None
            }
        }
    }
}

impl State {
    fn recompute(&mut self, inputs: &Inputs) {
        let now = Instant::now();
        let me = self.cfg.me.clone();
        if !inputs.nodes.iter().any(|n| n.name == me) {
            if !self.warned_no_node {
                warn!(node = %me, "L2 announcement: no Node object named after this node (--node-name); announcing nothing");
                self.warned_no_node = true;
            }
        } else {
            self.warned_no_node = false;
        }
        let live_fn = |n: &str| {
            if n == me {
                self.liveness.self_ready(now)
            } else {
                self.liveness.is_live(n, now)
            }
        };
        let live: Vec<String> = inputs
            .nodes
            .iter()
            .filter(|n| live_fn(&n.name))
            .map(|n| n.name.clone())
            .collect();
        if live != self.last_live {
            info!(live = ?live, "L2 announcement: live nodes changed");
            crate::metrics::set_l2_live_nodes(live.len());
            self.last_live = live;
        }
        let want = assign(
            &inputs.targets,
            &inputs.nodes,
            &me,
            &inputs.default_ifaces,
            live_fn,
        );
        let ifaces: BTreeSet<String> = want.keys().chain(self.owned.keys()).cloned().collect();
        for iface in ifaces {
            let ips = want.get(&iface).cloned().unwrap_or_default();
            let old = self.owned.get(&iface).cloned().unwrap_or_default();
            if ips == old {
                continue;
            }
            for ip in old.difference(&ips) {
                info!(%ip, iface = %iface, "L2 announcement: released");
                crate::metrics::l2_released();
            }
            if ips.is_empty() {
                self.responders.remove(&iface);
                self.owned.remove(&iface);
                continue;
            }
            if !self.responders.contains_key(&iface) {
                match Responder::start(&iface) {
                    Ok(r) => {
                        self.responders.insert(iface.clone(), r);
                    }
                    Err(e) => {
                        error!(iface = %iface, error = %format!("{e:#}"), "L2 announcement: cannot start the responder");
                        continue;
                    }
                }
            }
            let Some(r) = self.responders.get(&iface) else {
                continue;
            };
            let new = r.set(ips.clone());
            for ip in &new {
                info!(%ip, iface = %iface, "L2 announcement: announcing");
                crate::metrics::l2_taken_over();
            }
            if !new.is_empty() {
                if let Err(e) = r.announce(&new) {
                    warn!(iface = %iface, error = %format!("{e:#}"), "L2 announcement: gratuitous ARP/NA not sent");
                }
                for d in REPEATS {
                    self.repeats.push((now + d, iface.clone(), new.clone()));
                }
            }
            self.owned.insert(iface, ips);
        }
        let winners: BTreeMap<IpAddr, &str> =
            super::winners(&inputs.targets, &inputs.nodes, live_fn)
                .into_iter()
                .map(|(n, ip)| (ip, n))
                .collect();
        let announcers = inputs
            .targets
            .iter()
            .map(|t| crate::status::L2Announcer {
                ip: t.ip.to_string(),
                service: t.service.to_string(),
                node: winners.get(&t.ip).map(|n| (*n).to_owned()),
            })
            .collect();
        let mine: BTreeSet<IpAddr> = self.owned.values().flatten().copied().collect();
        crate::metrics::set_l2_announced(
            mine.iter().filter(|ip| ip.is_ipv4()).count(),
            mine.iter().filter(|ip| ip.is_ipv6()).count(),
        );
        crate::status::update(|st| {
            st.l2_announcing = self
                .owned
                .iter()
                .flat_map(|(i, ips)| ips.iter().map(move |ip| format!("{ip} on {i}")))
                .collect();
            st.l2_announcers = announcers;
        });
    }

    fn send_repeats(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.repeats)
            .into_iter()
            .partition(|(t, _, _)| *t <= now);
        self.repeats = later;
        for (_, iface, ips) in due {
            let Some(r) = self.responders.get(&iface) else {
                continue;
            };
            let still: Vec<IpAddr> = ips
                .into_iter()
                .filter(|ip| self.owned.get(&iface).is_some_and(|o| o.contains(ip)))
                .collect();
            if !still.is_empty()
                && let Err(e) = r.announce(&still)
            {
                warn!(iface = %iface, error = %format!("{e:#}"), "L2 announcement: gratuitous ARP/NA not sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heartbeats signed by `tx` as node `name` at `ms`, as `rx` takes them.
    fn takes(tx: &Codec, rx: &mut Codec, name: &str, ms: u64) -> bool {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms);
        rx.decode(&tx.encode(name, at), at).is_ok()
    }

    /// An invalid key file at reload (a short key, no key, a file over the size limit, a
    /// directory, no file) changes nothing: the node goes on signing with the keys in
    /// use, and its peers go on taking its heartbeats; a valid file afterwards is taken.
    #[test]
    fn an_invalid_key_file_at_reload_keeps_the_keys_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let good = "good-key-0123456789abcdef";
        std::fs::write(&path, good).unwrap();
        let key = heartbeat::Key::from_file(&path).unwrap();
        let mut file = KeyFile::new(path.clone());
        let mut me = Codec::new(Some(&key));
        let mut peer = Codec::new(Some(&key));
        assert!(file.changed().is_none(), "unchanged content is no reload");

        let big = "k".repeat(heartbeat::MAX_KEY_FILE_BYTES as usize + 1);
        let bad: [&dyn Fn(); 5] = [
            &|| std::fs::write(&path, "short\n").unwrap(),
            &|| std::fs::write(&path, "\n \n").unwrap(),
            &|| std::fs::write(&path, &big).unwrap(),
            &|| {
                std::fs::remove_file(&path).unwrap();
                std::fs::create_dir(&path).unwrap();
            },
            &|| std::fs::remove_dir(&path).unwrap(),
        ];
        for (i, make) in bad.iter().enumerate() {
            make();
            for _ in 0..2 {
                if let Some(k) = file.changed() {
                    me.set_key(Some(&k));
                    panic!("bad file {i} was taken");
                }
            }
            assert!(
                takes(&me, &mut peer, "node-a", 100 * (i as u64 + 1)),
                "after bad file {i} the peer no longer takes this node's heartbeat"
            );
        }

        let new = "new-key-0123456789abcdef";
        std::fs::write(&path, format!("{new}\n{good}\n")).unwrap();
        let k = file
            .changed()
            .expect("a valid file after the bad ones is taken");
        assert_eq!(k.count(), 2);
        me.set_key(Some(&k));
        let stale = Codec::new(Some(&heartbeat::Key::from_bytes(good.as_bytes()).unwrap()));
        let mut only_new = Codec::new(Some(&heartbeat::Key::from_bytes(new.as_bytes()).unwrap()));
        assert!(
            takes(&me, &mut only_new, "node-a", 1000),
            "signs with the new key"
        );
        assert!(
            takes(&stale, &mut me, "node-b", 1000),
            "verifies with the old one too"
        );
    }
}
