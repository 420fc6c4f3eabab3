//! Tally: authenticated requests and responses between devices and a server over TCP.
//!
//! # Layout
//!
//! - [`proto`]: the sans-IO protocol core, one file per section of `spec/PROTOCOL.md`.
//! - [`secrets`]: the server's key files (enrollment key, static key, store key).
//! - [`store`]: the SQLite identity store.
//! - [`config`]: the daemon's typed configuration (TOML file and flags).
//! - [`backend`]: what the daemon does with an authenticated REQUEST: the `Backend` trait,
//!   `echo`, the Unix socket backend (`spec/BACKEND.md`) and the HTTP backend.
//! - [`server`]: the daemon (tokio): accepting, enrollment, sessions, limits, takeover, shutdown.
//! - [`daemon`]: `tallyd serve` around the server: listener, notifications, signals, reload.
//! - [`control`]: the daemon's local control socket, used by admin commands and applications.
//! - [`client`]: the client library (tokio): enroll, connect, request, message, listen.
//! - [`systemd`]: readiness notification, watchdog, socket activation.
//! - [`logging`]: text, journald and JSON log output with a reloadable level.
//! - [`admin`]: operator commands that work while the daemon runs.
//! - [`wire`]: reading whole frames from a byte stream.
//! - [`bench`](mod@bench): the load tool behind `tally bench`.
//! - `src/bin/tallyd.rs`, `src/bin/tally.rs`: thin binaries over the above.

// One `unsafe` block in the crate: taking the socket systemd passes (src/systemd.rs).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod backend;
pub mod bench;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
mod driver;
pub mod logging;
pub mod proto;
pub mod secrets;
pub mod server;
pub mod store;
pub mod systemd;
pub mod wire;
