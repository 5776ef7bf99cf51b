//! sandboxd keeps per-chat agent sandboxes (Docker containers) in the state its clients declare.
//!
//! # Layout
//! - [`domain`]: identifiers, phases, the frozen container spec, input validation.
//! - [`planner`]: the pure core, `plan(desired, observed, now) -> actions`. No I/O.
//! - [`store`]: SQLite adapter: desired state, observed status, event log, chat storage's
//!   metadata.
//! - [`storage`]: chat storage on the host: a file system per workspace, sized to its quota;
//!   crash-safe writes of a chat's files.
//! - [`backend`]: the seam between sandboxd and a container engine: the `Backend` trait
//!   (lifecycle) with its optional capabilities, the data plane's `SandboxIo`, one error
//!   with typed kinds, one hardening translation; the engines behind it: `docker`,
//!   `podman`, `swarm` (one-replica services through a manager), and an in-memory `fake`
//!   for tests.
//! - [`controller`]: the level-triggered loop that runs the planner and executes actions.
//! - [`pool`]: warm starts: pre-started members claimed by new chats (mounts and env bound at
//!   claim time through mount propagation and a wrapper entrypoint).
//! - [`dataplane`]: exec, files and watch on running sandboxes, beside the loop: finds the
//!   container in the store and talks to the engine (`backend::io`).
//! - [`egress`]: egress policy as host firewall rules (pure rendering and diff; `iptables`).
//! - [`http`]: the thin axum API; its desired-state routes write desired state and read
//!   status and never call Docker; its data-plane routes call [`dataplane`].
//! - [`metrics`]: Prometheus metrics served at `/metrics`.
//! - [`config`]: typed settings from YAML and `APP_*` environment overrides.
//! - [`context`]: what the long-lived parts share (store, settings, metrics, status), built
//!   once.
//! - [`app`]: wiring in one place; [`cli`]: the command line.

pub mod app;
pub mod backend;
pub mod cli;
pub mod config;
pub mod context;
pub mod controller;
pub mod dataplane;
pub mod domain;
pub mod egress;
pub mod http;
pub mod metrics;
pub mod planner;
pub mod pool;
pub mod resume;
pub mod storage;
pub mod store;
pub mod telemetry;
