//! The heartbeat's wire format, and its authentication when the nodes share a key
//! (`--l2-heartbeat-key-file`).
//!
//! Without a key a heartbeat is `svclb-l2-hb1 <node name>`: anyone who can send to the
//! port can keep a dead node "alive" and so keep its addresses unanswered. With a key it
//! is `svclb-l2-hb2 `, the sender's wall clock in milliseconds (8 bytes, big endian), the
//! node name, and an HMAC-SHA256 tag over all of that. A receiver takes it only when
//! - the tag verifies (constant-time, `ring::hmac`): the sender holds the key;
//! - the sender's clock is within [`MAX_SKEW`] of its own: an old capture is useless
//!   to a receiver that never heard the sender;
//! - its time is later than the last one taken from that node: a replay, however
//!   fast, never extends a node's life past its last real heartbeat.
//!
//! Nodes with a key ignore unkeyed heartbeats and the other way round, so a mixed
//! configuration shows as dead peers (logged, and counted by reason), never as a
//! forged one taken.
use std::{
    collections::HashMap,
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use ring::hmac;

const MAGIC_V1: &[u8] = b"svclb-l2-hb1 ";
const MAGIC_V2: &[u8] = b"svclb-l2-hb2 ";
const TAG_LEN: usize = 32;
/// A key shorter than this is refused: HMAC-SHA256 wants at least 128 bits of secret.
const MIN_KEY_LEN: usize = 16;
/// How far a peer's clock may be from ours. Generous, because nodes whose clocks drift
/// further would all see each other dead and all announce every address: with NTP,
/// nodes are within milliseconds; a node minutes off is logged with its skew.
pub const MAX_SKEW: Duration = Duration::from_secs(10);
/// The largest key file taken. One key per line, two lines during a rotation: a few
/// hundred bytes. The file is read again at every heartbeat, so something else mounted
/// at its path (a log, a device) is refused by its size instead of read 5 times a second.
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

/// The nodes' shared heartbeat keys, one per line of the key file (a mounted Secret):
/// the first signs, every one verifies. One line is the steady state; two lines let an
/// operator rotate the key without any node taking another for dead (README, "L2
/// announcement"). The Debug form never shows a key, so that configuration dumps and
/// logs cannot leak one.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<Vec<u8>>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lens: Vec<String> = self
            .0
            .iter()
            .map(|k| format!("<{} bytes>", k.len()))
            .collect();
        write!(f, "Key({})", lens.join(", "))
    }
}

impl Key {
    /// The keys of a key file. Each line is taken without surrounding whitespace, since
    /// `echo`/`kubectl create secret --from-file` often add a newline that other nodes'
    /// copies may not have; blank lines are skipped.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let raw = read_key_file(path)
            .with_context(|| format!("--l2-heartbeat-key-file {}", path.display()))?;
        Self::from_bytes(&raw)
            .with_context(|| format!("--l2-heartbeat-key-file {}", path.display()))
    }

    pub fn from_bytes(raw: &[u8]) -> Result<Self> {
        let mut keys = Vec::new();
        for (i, line) in raw.split(|b| *b == b'\n').enumerate() {
            let key = line.trim_ascii();
            if key.is_empty() {
                continue;
            }
            if key.len() < MIN_KEY_LEN {
                bail!(
                    "the key on line {} has {} bytes; at least {MIN_KEY_LEN} are needed (for \
                     example `openssl rand -base64 32`)",
                    i + 1,
                    key.len()
                );
            }
            keys.push(key.to_vec());
        }
        if keys.is_empty() {
            bail!("no key in it (one key per line, at least {MIN_KEY_LEN} bytes each)");
        }
        Ok(Self(keys))
    }

    /// How many keys verify (the first of them also signs); never 0.
    pub fn count(&self) -> usize {
        self.0.len()
    }
}

/// The content of the key file at `path`, at most [`MAX_KEY_FILE_BYTES`]: a larger file
/// or anything but a regular file is an error, and no more than the limit is ever read.
pub fn read_key_file(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    // O_NONBLOCK: a FIFO at the path must not block the heartbeat's thread in open().
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .context("open")?;
    let meta = file.metadata().context("stat")?;
    if !meta.is_file() {
        bail!("not a regular file");
    }
    let too_big = || {
        anyhow::anyhow!(
            "more than {MAX_KEY_FILE_BYTES} bytes; a key file holds one key per line (two \
             during a rotation)"
        )
    };
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(too_big());
    }
    let mut raw = Vec::new();
    // The file may grow between the stat and the read.
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut raw)
        .context("read")?;
    if raw.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(too_big());
    }
    Ok(raw)
}

/// Why a datagram on the heartbeat port was not taken (the metric's `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Not a heartbeat of either version.
    Malformed,
    /// A heartbeat without a key while this node has one, or the other way round.
    KeyMismatch,
    /// The tag does not verify: another key, or a forgery.
    BadTag,
    /// The sender's clock is further than [`MAX_SKEW`] from this node's.
    Skew,
    /// Older than the last heartbeat taken from this node: a replay or reordering.
    Stale,
    /// The very heartbeat last taken from this node, again: a node sends each heartbeat
    /// to every address of its peers (IPv4 and IPv6), so this is normal on a dual-stack
    /// segment, and neither counted nor logged (a replayed copy extends nothing either).
    Duplicate,
}

impl Rejected {
    /// The reasons counted in the metric ([`Rejected::Duplicate`] is not).
    pub const ALL: [Self; 5] = [
        Self::Malformed,
        Self::KeyMismatch,
        Self::BadTag,
        Self::Skew,
        Self::Stale,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::KeyMismatch => "key_mismatch",
            Self::BadTag => "bad_tag",
            Self::Skew => "clock_skew",
            Self::Stale => "replay",
            Self::Duplicate => "duplicate",
        }
    }
}

/// Builds and checks heartbeats for one node.
pub struct Codec {
    /// Empty without a key; else the signing key first, then the other accepted ones.
    keys: Vec<hmac::Key>,
    /// The sender's time of the last heartbeat taken from each node (keyed mode only).
    last: HashMap<String, u64>,
}

impl Codec {
    pub fn new(key: Option<&Key>) -> Self {
        let mut c = Self {
            keys: Vec::new(),
            last: HashMap::new(),
        };
        c.set_key(key);
        c
    }

    /// Takes new keys (a reloaded key file). The replay state stays: a heartbeat signed
    /// with the new key is still not taken if it is older than the last one taken.
    pub fn set_key(&mut self, key: Option<&Key>) {
        self.keys = key
            .map(|k| {
                k.0.iter()
                    .map(|k| hmac::Key::new(hmac::HMAC_SHA256, k))
                    .collect()
            })
            .unwrap_or_default();
    }

    pub fn keyed(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The heartbeat `me` sends now.
    pub fn encode(&self, me: &str, now: SystemTime) -> Vec<u8> {
        let Some(key) = self.keys.first() else {
            return [MAGIC_V1, me.as_bytes()].concat();
        };
        let mut msg = [MAGIC_V2, &unix_ms(now).to_be_bytes(), me.as_bytes()].concat();
        let tag = hmac::sign(key, &msg);
        msg.extend_from_slice(tag.as_ref());
        msg
    }

    /// The sender's node name, if the datagram is a heartbeat this node takes at `now`.
    pub fn decode(&mut self, msg: &[u8], now: SystemTime) -> Result<String, Rejected> {
        if let Some(name) = msg.strip_prefix(MAGIC_V1) {
            if self.keyed() {
                return Err(Rejected::KeyMismatch);
            }
            return node_name(name);
        }
        let Some(body) = msg.strip_prefix(MAGIC_V2) else {
            return Err(Rejected::Malformed);
        };
        if !self.keyed() {
            return Err(Rejected::KeyMismatch);
        }
        if body.len() < 8 + 1 + TAG_LEN {
            return Err(Rejected::Malformed);
        }
        let (signed, tag) = msg.split_at(msg.len() - TAG_LEN);
        if !self
            .keys
            .iter()
            .any(|k| hmac::verify(k, signed, tag).is_ok())
        {
            return Err(Rejected::BadTag);
        }
        let (ms, name) = body[..body.len() - TAG_LEN].split_at(8);
        let mut sent = [0u8; 8];
        sent.copy_from_slice(ms);
        let sent = u64::from_be_bytes(sent);
        let name = node_name(name)?;
        if unix_ms(now).abs_diff(sent) > MAX_SKEW.as_millis() as u64 {
            return Err(Rejected::Skew);
        }
        match self.last.get_mut(&name) {
            Some(last) if sent == *last => Err(Rejected::Duplicate),
            Some(last) if sent < *last => Err(Rejected::Stale),
            Some(last) => {
                *last = sent;
                Ok(name)
            }
            None => {
                self.last.insert(name.clone(), sent);
                Ok(name)
            }
        }
    }

    /// Forgets the replay state of nodes [`crate::announce::liveness`] pruned; a node that
    /// comes back later is held to [`MAX_SKEW`] again.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.last.retain(|n, _| keep(n));
    }

    /// How far a heartbeat's clock is from `now`, for the log line of a [`Rejected::Skew`]
    /// (whose tag verified, so the number is the peer's).
    pub fn skew_ms(msg: &[u8], now: SystemTime) -> Option<i128> {
        let body = msg.strip_prefix(MAGIC_V2)?;
        let sent = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
        Some(i128::from(sent) - i128::from(unix_ms(now)))
    }
}

fn node_name(raw: &[u8]) -> Result<String, Rejected> {
    match std::str::from_utf8(raw) {
        Ok(s) if !s.is_empty() => Ok(s.to_owned()),
        _ => Err(Rejected::Malformed),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    // A clock before 1970 reads as 0: its heartbeats then fail the skew check.
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_bytes(&[b'a' + b; 32]).unwrap()
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 + ms)
    }

    #[test]
    fn unkeyed_heartbeat_is_the_version_one_format() {
        let mut c = Codec::new(None);
        let msg = c.encode("node-a", at(0));
        assert_eq!(msg, b"svclb-l2-hb1 node-a");
        assert_eq!(c.decode(&msg, at(0)), Ok("node-a".to_owned()));
        assert_eq!(c.decode(b"svclb-l2-hb1 ", at(0)), Err(Rejected::Malformed));
        assert_eq!(c.decode(b"hello", at(0)), Err(Rejected::Malformed));
    }

    #[test]
    fn keyed_heartbeat_round_trips_and_needs_the_same_key() {
        let k = key(7);
        let tx = Codec::new(Some(&k));
        let mut rx = Codec::new(Some(&k));
        let msg = tx.encode("node-a", at(0));
        assert!(msg.starts_with(MAGIC_V2));
        assert_eq!(rx.decode(&msg, at(5)), Ok("node-a".to_owned()));
        let mut other = Codec::new(Some(&key(8)));
        assert_eq!(other.decode(&msg, at(5)), Err(Rejected::BadTag));
    }

    #[test]
    fn keyed_and_unkeyed_nodes_ignore_each_other() {
        let k = key(1);
        let mut keyed = Codec::new(Some(&k));
        let mut plain = Codec::new(None);
        let from_plain = plain.encode("node-p", at(0));
        let from_keyed = keyed.encode("node-k", at(0));
        assert_eq!(keyed.decode(&from_plain, at(0)), Err(Rejected::KeyMismatch));
        assert_eq!(plain.decode(&from_keyed, at(0)), Err(Rejected::KeyMismatch));
    }

    #[test]
    fn any_changed_byte_fails_the_tag() {
        let k = key(3);
        let msg = Codec::new(Some(&k)).encode("node-a", at(0));
        for i in MAGIC_V2.len()..msg.len() {
            let mut bad = msg.clone();
            bad[i] ^= 0x01;
            let mut rx = Codec::new(Some(&k));
            assert_eq!(rx.decode(&bad, at(0)), Err(Rejected::BadTag), "byte {i}");
        }
        // Another name under the old tag: the forger's only move without the key.
        let mut forged = msg.clone();
        let name_at = MAGIC_V2.len() + 8;
        forged[name_at..name_at + 6].copy_from_slice(b"node-b");
        let mut rx = Codec::new(Some(&k));
        assert_eq!(rx.decode(&forged, at(0)), Err(Rejected::BadTag));
        let mut rx = Codec::new(Some(&k));
        assert_eq!(
            rx.decode(&msg[..msg.len() - 1], at(0)),
            Err(Rejected::BadTag)
        );
        assert_eq!(rx.decode(&msg[..20], at(0)), Err(Rejected::Malformed));
    }

    #[test]
    fn replays_never_extend_a_life_and_old_captures_are_refused() {
        let k = key(9);
        let tx = Codec::new(Some(&k));
        let mut rx = Codec::new(Some(&k));
        let first = tx.encode("node-a", at(0));
        let second = tx.encode("node-a", at(200));
        assert_eq!(rx.decode(&first, at(1)), Ok("node-a".to_owned()));
        assert_eq!(rx.decode(&second, at(201)), Ok("node-a".to_owned()));
        // The node died after `second`: replaying either keeps nothing alive.
        assert_eq!(rx.decode(&second, at(900)), Err(Rejected::Duplicate));
        assert_eq!(rx.decode(&first, at(900)), Err(Rejected::Stale));
        // A receiver that never heard the node refuses a capture older than the skew.
        let mut fresh = Codec::new(Some(&k));
        let late = at(200) + MAX_SKEW + Duration::from_millis(1);
        assert_eq!(fresh.decode(&second, late), Err(Rejected::Skew));
        assert_eq!(
            Codec::skew_ms(&second, late),
            Some(-(MAX_SKEW.as_millis() as i128) - 1)
        );
        // Clocks ahead are refused alike; within the skew they are taken.
        let ahead = tx.encode("node-b", at(0) + MAX_SKEW + Duration::from_secs(1));
        assert_eq!(fresh.decode(&ahead, at(0)), Err(Rejected::Skew));
        let near = tx.encode("node-b", at(0) + MAX_SKEW - Duration::from_secs(1));
        assert_eq!(fresh.decode(&near, at(0)), Ok("node-b".to_owned()));
    }

    #[test]
    fn pruned_nodes_lose_their_replay_state() {
        let k = key(2);
        let tx = Codec::new(Some(&k));
        let mut rx = Codec::new(Some(&k));
        let msg = tx.encode("node-a", at(0));
        assert!(rx.decode(&msg, at(0)).is_ok());
        rx.retain(|n| n != "node-a");
        assert_eq!(rx.decode(&msg, at(0)), Ok("node-a".to_owned()));
    }

    #[test]
    fn short_keys_are_refused_and_debug_hides_the_key() {
        let err = Key::from_bytes(b"short").unwrap_err().to_string();
        assert!(err.contains("5 bytes"), "{err}");
        let k = Key::from_bytes(b"0123456789abcdef-secret").unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(shown, "Key(<23 bytes>)");
        let two = Key::from_bytes(b"0123456789abcdef-secret\n0123456789abcdef-second\n").unwrap();
        assert_eq!(format!("{two:?}"), "Key(<23 bytes>, <23 bytes>)");
        let err = Key::from_bytes(b"0123456789abcdef-secret\nshort\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2 has 5 bytes"), "{err}");
        let err = Key::from_bytes(b"\n  \n").unwrap_err().to_string();
        assert!(err.contains("no key"), "{err}");
    }

    /// The rotation the README describes: `OLD`, then `OLD NEW`, then `NEW OLD`, then
    /// `NEW`, one node after the other; at every step each node takes every other
    /// node's heartbeat.
    #[test]
    fn a_rotation_one_node_at_a_time_never_refuses_a_peer() {
        let old = "old-key-0123456789abcdef";
        let new = "new-key-0123456789abcdef";
        let steps = [
            old.to_owned(),
            format!("{old}\n{new}"),
            format!("{new}\n{old}"),
            new.to_owned(),
        ];
        let mut files = [0usize; 3];
        let mut codecs: Vec<Codec> = (0..3)
            .map(|_| Codec::new(Some(&Key::from_bytes(steps[0].as_bytes()).unwrap())))
            .collect();
        let mut ms = 0;
        for (step, content) in steps.iter().enumerate().skip(1) {
            for node in 0..3 {
                files[node] = step;
                let key = Key::from_bytes(content.as_bytes()).unwrap();
                codecs[node].set_key(Some(&key));
                ms += 100;
                for from in 0..3 {
                    let msg = codecs[from].encode(&format!("node-{from}"), at(ms));
                    for to in (0..3).filter(|to| *to != from) {
                        assert_eq!(
                            codecs[to].decode(&msg, at(ms)),
                            Ok(format!("node-{from}")),
                            "step {step}: node-{to} (file {}) refused node-{from} (file {})",
                            files[to],
                            files[from]
                        );
                    }
                }
            }
        }
        // Skipping the middle step splits the nodes: `OLD` alone does not take `NEW`.
        let mut stale = Codec::new(Some(&Key::from_bytes(old.as_bytes()).unwrap()));
        let msg = codecs[0].encode("node-0", at(ms + 100));
        assert_eq!(stale.decode(&msg, at(ms + 100)), Err(Rejected::BadTag));
    }

    #[test]
    fn key_file_is_trimmed_so_a_trailing_newline_does_not_split_the_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"c2VjcmV0LWtleS1mb3ItdGhlLW5vZGVz\n").unwrap();
        std::fs::write(&b, b"c2VjcmV0LWtleS1mb3ItdGhlLW5vZGVz").unwrap();
        assert_eq!(Key::from_file(&a).unwrap(), Key::from_file(&b).unwrap());
        assert_eq!(Key::from_file(&a).unwrap().count(), 1);
        let missing = dir.path().join("missing");
        let err = format!("{:#}", Key::from_file(&missing).unwrap_err());
        assert!(err.contains("--l2-heartbeat-key-file"), "{err}");
    }

    #[test]
    fn key_files_over_the_limit_or_not_regular_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let line = b"0123456789abcdef0123456789abcdef\n";
        let fits = dir.path().join("fits");
        let big = dir.path().join("big");
        let n = MAX_KEY_FILE_BYTES as usize / line.len();
        std::fs::write(&fits, line.repeat(n)).unwrap();
        std::fs::write(&big, line.repeat(n + 1)).unwrap();
        assert_eq!(Key::from_file(&fits).unwrap().count(), n);
        let err = format!("{:#}", Key::from_file(&big).unwrap_err());
        assert!(
            err.contains("--l2-heartbeat-key-file") && err.contains("more than 4096 bytes"),
            "{err}"
        );
        let err = format!("{:#}", Key::from_file(dir.path()).unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
    }
}
