//! Harness for svc-lb's privileged end-to-end tests and for the demo.
//!
//! Everything here builds a small, private lab on the local machine and tears it down
//! again, even when a test panics:
//! - [`netns`]: network namespaces, veth pairs and addresses;
//! - [`topology`]: one client namespace (no default route) wired to N backend
//!   namespaces;
//! - [`cgroup`]: a cgroup v2 child directory that the client processes join, so that
//!   the agent's socket programs see exactly their sockets and nobody else's;
//! - [`bpffs`]: a private pin directory on bpffs;
//! - [`agent`]: the real agent binary as a child process, with its log watched for
//!   `sync applied` lines;
//! - [`procs`]: backend servers and clients, both run through the `svclb-harness`
//!   binary (see `src/bin/svclb-harness.rs`) because they must live in other network
//!   namespaces and cgroups than the test process itself;
//! - [`manifests`]: Service and EndpointSlice documents as `kubectl get -o yaml` prints
//!   them;
//! - [`lab`]: all of the above in one guard, in the right teardown order;
//! - [`twonode`]: the external-path lab: an external client, two nodes each running an
//!   agent in its own namespace, and pods behind each node.
//!
//! Every name this process creates starts with [`names::run_prefix`], so a leftover
//! check can find exactly this run's objects.
pub mod agent;
pub mod bench;
pub mod bpffs;
pub mod bpfquery;
pub mod cgroup;
pub mod checks;
pub mod client;
pub mod cmd;
pub mod demo;
pub mod errno;
pub mod fakeapi;
pub mod l2lab;
pub mod lab;
pub mod manifests;
pub mod metrics;
pub mod names;
pub mod netns;
pub mod podlab;
pub mod procs;
pub mod report;
pub mod serve;
pub mod tempdir;
pub mod topology;
pub mod twonode;

pub use lab::{Bins, Lab};
pub use report::{ClientReport, Proto};

/// A test's literal IP address; a typo in a test panics at once.
pub fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("test address")
}

/// A test's literal socket address; a typo in a test panics at once.
pub fn sa(s: &str) -> std::net::SocketAddr {
    s.parse().expect("test socket address")
}
