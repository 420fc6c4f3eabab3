//! The daemon's local control socket: `<state_dir>/tallyd.sock`, mode 0600.
//!
//! Admin commands (`tallyd identities`, `tallyd token`, `tallyd revoke`) run as separate
//! processes. While a daemon runs they do everything through this socket: the daemon
//! changes its store and its in-memory key index, closes live sessions at once, and makes
//! tokens with its own keys (which the operator's shell may not have: systemd
//! credentials). When it does not answer but holds the state directory's lock, they
//! refuse; with no daemon, they use the store directly. The protocol is one JSON object
//! per line in each direction, one request per connection.

mod server;
mod wire;

pub use server::{bind, serve};
pub use wire::{
    call, parse_request, ControlError, ControlRequest, ControlResponse, FleetConfirmation, SOCKET,
};
