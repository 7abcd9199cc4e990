//! Read-only views of the datapath for operators: `svc-lb list`, `conntrack`, `trace`
//! (socket path) and `trace --external` (`exttrace`), `status`, and the data the
//! metrics endpoint exports. Everything here reads the pinned maps (or a fake of them
//! in tests), so it works whether the agent runs or not.
pub mod conntrack;
pub mod exttrace;
pub mod list;
pub mod names;
pub mod status;
pub mod trace;
pub mod view;

#[cfg(test)]
mod tests;
