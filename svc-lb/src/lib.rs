//! svc-lb: a Kubernetes Service load balancer on eBPF.
//!
//! The pipeline is `source → model → plan → datapath`:
//! - [`source`] produces Kubernetes objects (from a manifest directory or the API);
//! - [`model`] turns them into the desired frontends and backends (pure);
//! - [`plan`] diffs current against desired into ordered map operations (pure);
//! - [`datapath`] applies those operations to the pinned BPF maps (the only aya user).
pub mod agent;
pub mod announce;
pub mod cli;
pub mod datapath;
#[doc(hidden)]
pub mod fuzzing;
pub mod hcnp;
pub mod health;
pub mod inspect;
pub mod lbipam;
pub mod maglev;
pub mod mem;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod portrange;
pub mod source;
pub mod status;
