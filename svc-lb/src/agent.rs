//! The agent: source → model → plan → datapath.
