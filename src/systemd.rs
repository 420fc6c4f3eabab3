//! Running under systemd: readiness and status notifications (`sd_notify`), the
//! watchdog, and socket activation (`LISTEN_FDS`). Each is a no-op outside systemd.
//!
//! Written against the documented protocols (sd_notify(3), sd_listen_fds(3)) rather than
//! a crate: a datagram to `$NOTIFY_SOCKET`, and file descriptor 3.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) to the service manager. Returns false when not run
/// by systemd (no `$NOTIFY_SOCKET`).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (Linux).
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// The interval at which to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if the watchdog
/// is enabled for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The listening socket systemd passed (`LISTEN_FDS=1`, `LISTEN_PID` = this process), if
/// any. The variables are removed so child processes do not inherit them.
pub fn listener_from_env() -> io::Result<Option<TcpListener>> {
    let pid = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<u32>().ok());
    if pid != Some(std::process::id()) || fds.unwrap_or(0) == 0 {
        return Ok(None);
    }
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if fds != Some(1) {
        return Err(io::Error::other(
            "systemd passed more than one socket; tallyd.socket must have one ListenStream=",
        ));
    }
    let listener = take_fd3();
    // Refuse anything that is not a listening TCP socket.
    listener
        .local_addr()
        .map_err(|e| io::Error::other(format!("file descriptor 3 is not a TCP socket: {e}")))?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

#[allow(unsafe_code)]
fn take_fd3() -> TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: sd_listen_fds(3): with LISTEN_PID equal to our pid and LISTEN_FDS=1, file
    // descriptor 3 is an open socket that systemd passed to this process and that nothing
    // else in it owns. It is taken exactly once: the variables were removed above.
    unsafe { TcpListener::from_raw_fd(3) }
}

/// Whether stderr goes to the journal (`$JOURNAL_STREAM`, set by systemd).
pub fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_systemd_means_no_op() {
        // The test runner is not started by systemd with these set for this pid.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!notify("READY=1").unwrap());
        }
        if std::env::var("LISTEN_PID").ok() != Some(std::process::id().to_string()) {
            assert!(listener_from_env().unwrap().is_none());
        }
    }
}
