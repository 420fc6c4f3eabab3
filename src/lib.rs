//! Tally: authenticated requests and responses between devices and a server over TCP.
//!
//! # What to use
//!
//! - [`client`] (feature `client`, the default): what a device needs: enroll, connect,
//!   request, message, answer the server's requests.
//! - [`proto`] (always): the sans-IO protocol core, one file per section of
//!   `spec/PROTOCOL.md`, for spec readers and other drivers. With
//!   `default-features = false` it is all that is built, and the crate is `#![no_std]`
//!   (it needs `alloc`): for firmware.
//! - `server` (feature `server`): the daemon as a library: `server::run` with a
//!   `config::ServerConfig` and a `backend::Backend` of your own.
//!
//! The feature `cli` builds the binaries `tallyd` and `tally`. Modules hidden from these
//! docs (store, control socket, admin commands, systemd, logging, the load tool) serve
//! the binaries and the tests; they are not API and may change at any time.

// One `unsafe` block in the crate: taking the socket systemd passes (src/systemd.rs).
#![deny(unsafe_code)]
#![warn(missing_docs)]
// Without the `std` feature: the protocol core alone, on `core` + `alloc`.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod proto;

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
mod credential_file;
#[cfg(feature = "client")]
mod driver;
#[cfg(feature = "client")]
mod random;
#[cfg(feature = "client")]
#[doc(hidden)]
pub mod wire;

#[cfg(feature = "server")]
pub mod backend;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod config_keys;
#[cfg(feature = "server")]
pub mod server;

// The daemon's and the binaries' parts: public for `src/bin/` and `tests/`, not API.
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod admin;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod bench;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod cli;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod conformance;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod control;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod daemon;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod generate;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod logging;
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod output;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod secrets;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod store;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod systemd;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod tokens;
