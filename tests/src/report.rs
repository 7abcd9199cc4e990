//! What a client run measured. The `svclb-harness client` subcommand prints it as JSON;
//! the tests and the demo parse it back.
use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

/// How the client talks to its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Proto {
    /// connect, send one byte, read the reply until the server closes.
    Tcp,
    /// Unconnected UDP: sendto the target, recvfrom the reply (and its source).
    Udp,
    /// Connected UDP: connect, send, recv, getpeername.
    UdpConnected,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::UdpConnected => "udp-connected",
        })
    }
}

/// Every attempt ends up in exactly one of `backends` (a reply was read: keyed by the id
/// the server answered with) or `failures` (keyed by errno name), so
/// `attempts == ok + failed`, `ok == sum(backends)` and `failed == sum(failures)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReport {
    pub target: String,
    pub proto: String,
    pub attempts: u64,
    pub ok: u64,
    pub failed: u64,
    /// Reply id → number of replies.
    pub backends: BTreeMap<String, u64>,
    /// Errno name (`ECONNREFUSED`, `ENETUNREACH`, ...; `TIMEOUT` for a receive timeout,
    /// `EMPTY_REPLY` for a connection closed without an answer) → count.
    pub failures: BTreeMap<String, u64>,
    /// `<step>:<errno>` → count, where step is connect, send, recv or getpeername.
    pub failure_steps: BTreeMap<String, u64>,
    /// Source address of each UDP reply as recvfrom reported it → count.
    pub reply_sources: BTreeMap<String, u64>,
    /// getpeername() of each successful connected socket (TCP, connected UDP) → count.
    pub peer_names: BTreeMap<String, u64>,
    /// The first few failures in order, to tell a cold-start loss from a steady problem.
    #[serde(default)]
    pub failure_samples: Vec<FailureSample>,
    /// Slowest failed attempt, microseconds (0 when nothing failed).
    pub max_failure_us: u64,
    /// Slowest successful attempt, microseconds.
    pub max_ok_us: u64,
    /// Wall time of the whole run, milliseconds.
    pub elapsed_ms: u64,
    /// Client address as the backend saw it (IP only; servers started with
    /// `--with-peer`) → count.
    #[serde(default)]
    pub backend_saw: BTreeMap<String, u64>,
    /// With `--sport`: source port of each attempt → reply id, or `<step>:<errno>`.
    #[serde(default)]
    pub by_sport: BTreeMap<u16, String>,
    /// With `--timeline`: every attempt in order.
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
}

/// One attempt of a `--timeline` run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Wall-clock time (Unix epoch, ms) at which the attempt ended.
    pub unix_ms: u64,
    /// Wall-clock time (Unix epoch, µs) at which the attempt started, before its socket
    /// existed: the datapath chose the backend after this moment.
    #[serde(default)]
    pub start_unix_us: u64,
    /// Reply id, or `<step>:<errno>`.
    pub outcome: String,
}

/// How many failures [`ClientReport::failure_samples`] keeps.
pub const FAILURE_SAMPLES: usize = 20;

/// One failed attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureSample {
    /// 0-based attempt number.
    pub attempt: u64,
    /// When the attempt started, milliseconds after the run started.
    pub at_ms: u64,
    /// `<step>:<errno>`.
    pub error: String,
}

impl ClientReport {
    /// Replies from `id`.
    pub fn count(&self, id: &str) -> u64 {
        self.backends.get(id).copied().unwrap_or(0)
    }

    /// Failures with errno name `name`.
    pub fn failures_of(&self, name: &str) -> u64 {
        self.failures.get(name).copied().unwrap_or(0)
    }

    /// Checks the bookkeeping identities documented on the type.
    pub fn is_consistent(&self) -> bool {
        self.attempts == self.ok + self.failed
            && self.ok == self.backends.values().sum::<u64>()
            && self.failed == self.failures.values().sum::<u64>()
    }

    /// One line for logs: `300 attempts: a=101 b=99 c=100; failed 0`.
    pub fn summary(&self) -> String {
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let failures: Vec<String> = self
            .failure_steps
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{} {} {} attempts in {} ms: {}; failed {} {}",
            self.proto,
            self.target,
            self.attempts,
            self.elapsed_ms,
            backends.join(" "),
            self.failed,
            failures.join(" ")
        )
    }
}
