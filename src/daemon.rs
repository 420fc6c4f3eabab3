//! `tallyd serve` around [`crate::server::run`]: the listener (passed by systemd or
//! bound), the control socket, readiness/status/watchdog notifications, and signals:
//! SIGTERM and SIGINT drain and stop, SIGHUP reloads limits and the log level.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ServerConfig;
use crate::logging::LogHandle;
use crate::server::ServerState;
use crate::{backend, control, server, systemd};

/// Runs the daemon until SIGTERM or SIGINT. `creds` holds the key files if they are not in
/// the state directory (systemd's `$CREDENTIALS_DIRECTORY`). `reload` re-reads the
/// configuration for SIGHUP.
pub async fn serve(
    config: ServerConfig,
    creds: Option<std::path::PathBuf>,
    reload: impl Fn() -> anyhow::Result<ServerConfig> + Send + 'static,
    log: LogHandle,
) -> anyhow::Result<()> {
    let mut config = config;
    let reserved = metrics_fds(&config);
    fit_fd_limit(&mut config.limits, reserved, true);
    let backend = backend::from_spec(&config.backend)?;
    // The port first: a start that cannot have it (in use) creates nothing, no keys in
    // a new state directory among them.
    let listener = match systemd::listener_from_env().context("socket activation")? {
        Some(std) => {
            info!("using the socket passed by systemd");
            if config.listen != ServerConfig::default().listen {
                warn!(listen = %config.listen, "listen is ignored: systemd passed the socket (set the address in the socket unit's ListenStream=)");
            }
            tokio::net::TcpListener::from_std(std)?
        }
        None => {
            listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?
        }
    };
    let (state, secrets) = ServerState::open(&config, creds.as_deref(), backend)?;
    if let Some(fleet) = &state.fleet {
        fleet.advertise(listener.local_addr()?).await;
    }
    let control_listener = control::bind(&config.state_dir).context("control socket")?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics_listen)"))?,
        ),
        None => None,
    };
    // Until a device is enrolled, every start says how to get a token: a first start
    // that failed after creating the keys (a port in use) must not lose the hint.
    let enrolled = state.store.count().context("identity store")?;
    if secrets.created || enrolled == 0 {
        print_enrollment_hint(&config, secrets.created);
    }
    // Under the daemon's tracker: stopped and awaited by `server::run` once the sessions
    // drained (admin commands keep working while they do).
    state.tasks.spawn(control::serve(
        control_listener,
        state.clone(),
        state.stop.clone(),
    ));
    // Why the last SIGHUP did not reload, until one does: kept in STATUS=.
    let reload_failed = Arc::new(std::sync::Mutex::new(None));
    if let Some(listener) = metrics_listener {
        state.tasks.spawn(crate::server::metrics::serve(
            listener,
            state.clone(),
            state.stop.clone(),
        ));
    }
    state.tasks.spawn(report(
        state.clone(),
        state.stop.clone(),
        reload_failed.clone(),
    ));
    let _ = systemd::notify(&format!("READY=1\nSTATUS={}", status(0, None)));
    let socket = config.state_dir.join(control::SOCKET);
    let shutdown = signals(state.clone(), config, reload, log, reload_failed);
    let result = server::run(listener, Arc::clone(&state), shutdown).await;
    let _ = std::fs::remove_file(socket);
    Ok(result?)
}

/// The accept queue's length: a flood of connections fills a short one, and then the
/// kernel drops devices' connection attempts, which retry only a second later. The
/// kernel caps it at `net.core.somaxconn` (4096 on current kernels; the shipped
/// `tallyd.socket` asks for the same with `Backlog=`).
const BACKLOG: u32 = 4096;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// File descriptors the daemon needs besides its TCP connections: the listener, the
/// control socket and its clients, SQLite's files on two connections, the journal,
/// backend connections.
const FD_HEADROOM: u64 = 128;

/// Descriptors the metrics port takes at most: its connections
/// ([`server::metrics::MAX_METRICS_CONNECTIONS`]), if `metrics_listen` is set.
fn metrics_fds(config: &ServerConfig) -> u64 {
    match config.metrics_listen {
        Some(_) => server::metrics::MAX_METRICS_CONNECTIONS as u64,
        None => 0,
    }
}

/// Makes `max_connections` fit the open-file limit: raises the soft `RLIMIT_NOFILE` to
/// the hard limit first (if `raise`), then clamps `max_connections` to what fits with
/// [`FD_HEADROOM`] and `reserved` more (the metrics port's connections), saying why,
/// and `max_delayed_refusals` to what is left. Past the limit `accept` fails and every
/// new device times out; this way the excess gets ERROR BUSY instead.
fn fit_fd_limit(limits: &mut crate::config::Limits, reserved: u64, raise: bool) {
    let soft = if raise {
        raise_fd_limit()
    } else {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    };
    if let Some(soft) = soft {
        fit_into(limits, soft, reserved);
    }
}

/// [`fit_fd_limit`] for a soft limit of `soft` descriptors, `reserved` of them for the
/// metrics port.
fn fit_into(limits: &mut crate::config::Limits, soft: u64, reserved: u64) {
    let fit = soft.saturating_sub(FD_HEADROOM + reserved).max(1);
    if limits.max_connections as u64 > fit {
        warn!(
            configured = limits.max_connections,
            clamped = fit,
            open_file_limit = soft,
            reserved_for_metrics = reserved,
            "limits.max_connections does not fit the open-file limit (RLIMIT_NOFILE) with {FD_HEADROOM} descriptors of headroom (and those reserved for metrics_listen's connections); clamped. Raise LimitNOFILE= (systemd) or `ulimit -n`"
        );
        limits.max_connections = fit as usize;
    }
    // Parked refusals take what is left; they yield to connections, not the reverse.
    let spare = fit - limits.max_connections as u64;
    if limits.max_delayed_refusals as u64 > spare {
        let why = if spare == 0 {
            "refused strangers are answered at once (no refusal delay): limits.max_connections takes every descriptor the open-file limit (RLIMIT_NOFILE) leaves. Lower it, or raise LimitNOFILE= (systemd) or `ulimit -n`"
        } else {
            "limits.max_delayed_refusals does not fit the open-file limit (RLIMIT_NOFILE) beside limits.max_connections; clamped. Raise LimitNOFILE= (systemd) or `ulimit -n`"
        };
        if spare > 0
            && limits.max_delayed_refusals == crate::config::Limits::default().max_delayed_refusals
        {
            // The default, not the operator's number: sized to what there is, quietly.
            info!(
                max_delayed_refusals = spare,
                open_file_limit = soft,
                "limits.max_delayed_refusals sized to the open-file limit (RLIMIT_NOFILE)"
            );
        } else {
            warn!(
                configured = limits.max_delayed_refusals,
                clamped = spare,
                open_file_limit = soft,
                "{why}"
            );
        }
        limits.max_delayed_refusals = spare as usize;
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, logging what it did; returns the
/// soft limit in force (`None`: unlimited).
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current == lim.maximum {
        return lim.current;
    }
    // An unlimited hard limit cannot be the soft one for files: take the kernel's usual
    // ceiling (fs.nr_open) instead.
    let target = lim.maximum.unwrap_or(1 << 20);
    let raised = Rlimit {
        current: Some(target),
        maximum: lim.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            info!(from = %shown(lim.current), to = target, "raised the open-file limit (RLIMIT_NOFILE) to its hard limit");
        }
        Err(e) => {
            warn!(error = %e, soft = %shown(lim.current), hard = %shown(lim.maximum), "cannot raise the open-file limit (RLIMIT_NOFILE)")
        }
    }
    getrlimit(Resource::Nofile).current
}

/// A resource limit as the log shows it.
fn shown(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".into(), |n| n.to_string())
}

/// The limits that differ, as `name old -> new`, comma-separated (times in seconds).
fn changed_limits(old: &crate::config::Limits, new: &crate::config::Limits) -> String {
    let mut out = Vec::new();
    macro_rules! compare {
        (count: $($f:ident),*; seconds: $($d:ident),*) => {
            // Every field, or this does not compile: a new limit is not left out.
            let crate::config::Limits { $($f: _,)* $($d: _,)* } = new;
            $(if old.$f != new.$f {
                out.push(format!("{} {} -> {}", stringify!($f), old.$f, new.$f));
            })*
            $(if old.$d != new.$d {
                out.push(format!(
                    "{} {}s -> {}s",
                    stringify!($d),
                    old.$d.as_secs_f64(),
                    new.$d.as_secs_f64()
                ));
            })*
        };
    }
    compare!(
        count: max_connections, max_unauthenticated, max_unauthenticated_per_source,
            new_connections_per_source, max_enrollments_in_progress, enrollments_per_second,
            max_delayed_refusals, max_frame_len, max_in_flight, server_requests_in_flight,
            queue_max_messages, queue_max_bytes, deliveries_in_flight;
        seconds: first_frame_timeout, handshake_timeout, refusal_delay, keepalive,
            drain_timeout, backend_timeout, queue_ttl, queue_max_ttl
    );
    out.join(", ")
}

/// Says how to get an enrollment token, without printing one: stdout is the journal
/// under systemd, and a token is a secret.
fn print_enrollment_hint(config: &ServerConfig, created: bool) {
    if created {
        println!(
            "First start: created keys in {}.",
            config.state_dir.display()
        );
    } else {
        println!("No device is enrolled yet.");
    }
    let dir = config.state_dir.display();
    if config.open_enrollment {
        println!(
            "Get the open enrollment token with `tallyd --state-dir {dir} token`, or issue one per device \
             with `tallyd --state-dir {dir} token --id <DEVICE-ID>` (recommended in production; see README)."
        );
    } else {
        println!(
            "Open enrollment is off: issue one token per device with `tallyd --state-dir {dir} token --id <DEVICE-ID>`."
        );
    }
}

/// Why the last reload failed, if it did.
type ReloadFailed = Arc<std::sync::Mutex<Option<String>>>;

/// The STATUS= line: live sessions, and a failed reload until one succeeds.
fn status(sessions: usize, reload_failed: Option<&str>) -> String {
    let s = if sessions == 1 { "" } else { "s" };
    match reload_failed {
        None => format!("{sessions} live session{s}"),
        Some(why) => format!(
            "{sessions} live session{s}; configuration NOT reloaded ({why}); running on the previous one"
        ),
    }
}

/// Sends STATUS= when the number of live sessions changes, and WATCHDOG=1 if enabled.
async fn report(state: Arc<ServerState>, stop: CancellationToken, reload_failed: ReloadFailed) {
    let watchdog = systemd::watchdog_interval();
    let tick = watchdog.map_or(Duration::from_secs(1), |w| w.min(Duration::from_secs(1)));
    let mut last = 0;
    let mut last_ping = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let n = state.registry.len();
        if n != last {
            last = n;
            let note = reload_failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let _ = systemd::notify(&format!("STATUS={}", status(n, note.as_deref())));
        }
        if let Some(w) = watchdog {
            if last_ping.elapsed() >= w {
                let _ = systemd::notify("WATCHDOG=1");
                last_ping = tokio::time::Instant::now();
            }
        }
    }
}

/// Completes on SIGTERM or SIGINT (after STOPPING=1); handles SIGHUP meanwhile.
async fn signals(
    state: Arc<ServerState>,
    mut current: ServerConfig,
    reload: impl Fn() -> anyhow::Result<ServerConfig>,
    log: LogHandle,
    reload_failed: ReloadFailed,
) {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); break; }
            _ = int.recv() => { info!("SIGINT received"); break; }
            _ = hup.recv() => {
                let _ = systemd::notify("RELOADING=1");
                // READY=1 ends the reload either way (systemd waits for it); STATUS= says
                // whether it took, and keeps saying so until a reload does.
                let why = match reload() {
                    Ok(new) => {
                        apply(&state, &mut current, new, &log);
                        None
                    }
                    Err(e) => {
                        warn!("configuration not reloaded, keeping the running one: {e:#}");
                        Some(format!("{e:#}"))
                    }
                };
                let n = state.registry.len();
                let line = status(n, why.as_deref());
                *reload_failed.lock().unwrap_or_else(|e| e.into_inner()) = why;
                let _ = systemd::notify(&format!("READY=1\nSTATUS={line}"));
            }
        }
    }
    let n = state.registry.len();
    let _ = systemd::notify(&format!("STOPPING=1\nSTATUS=draining {n} live sessions"));
}

/// Applies what can change at run time; reports what needs a restart.
fn apply(state: &ServerState, current: &mut ServerConfig, new: ServerConfig, log: &LogHandle) {
    let restart_needed: Vec<&str> = [
        ("listen", current.listen != new.listen),
        ("state_dir", current.state_dir != new.state_dir),
        ("backend", current.backend != new.backend),
        ("takeover", current.takeover != new.takeover),
        ("encryption", current.encryption != new.encryption),
        (
            "open_enrollment",
            current.open_enrollment != new.open_enrollment,
        ),
        ("log_format", current.log_format != new.log_format),
        (
            "metrics_listen",
            current.metrics_listen != new.metrics_listen,
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect();
    if !restart_needed.is_empty() {
        warn!(settings = %restart_needed.join(", "), "these changed settings take effect only after a restart");
    }
    if let Err(e) = log.set_level(&new.log_level) {
        warn!("log_level {:?} not applied: {e}", new.log_level);
    }
    let mut new = new;
    // The metrics port is the one bound at start (metrics_listen needs a restart).
    let reserved = metrics_fds(current);
    fit_fd_limit(&mut new.limits, reserved, false);
    state.set_limits(new.limits.clone());
    let changed = changed_limits(&current.limits, &new.limits);
    info!(
        limits = if changed.is_empty() { "unchanged" } else { changed.as_str() },
        log_level = %new.log_level,
        "configuration reloaded; limits apply to new connections and sessions"
    );
    *current = ServerConfig {
        limits: new.limits,
        log_level: new.log_level,
        ..current.clone()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn fitted(max_connections: usize, max_delayed: usize, soft: u64) -> (usize, usize) {
        let mut l = Limits {
            max_connections,
            max_delayed_refusals: max_delayed,
            ..Limits::default()
        };
        fit_into(&mut l, soft, 0);
        (l.max_connections, l.max_delayed_refusals)
    }

    #[test]
    fn connections_then_parked_refusals_fit_the_open_file_limit() {
        // systemd's LimitNOFILE=65536 (the shipped unit): the defaults fit.
        assert_eq!(fitted(10_000, 10_000, 65_536), (10_000, 10_000));
        // A hard limit of 20,000: parked refusals get what connections leave.
        assert_eq!(fitted(10_000, 10_000, 20_000), (10_000, 9_872));
        // systemd's default 1024: connections first, no parking left.
        assert_eq!(fitted(10_000, 10_000, 1024), (896, 0));
        assert_eq!(fitted(500, 10_000, 1024), (500, 396));
    }

    #[test]
    fn metrics_connections_are_counted_in_the_open_file_limit() {
        let mut l = Limits::default();
        let reserved = crate::server::metrics::MAX_METRICS_CONNECTIONS as u64;
        fit_into(&mut l, 1024, reserved);
        assert_eq!(l.max_connections as u64, 1024 - FD_HEADROOM - reserved);
        assert_eq!(l.max_delayed_refusals, 0);
        let with = ServerConfig {
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..ServerConfig::default()
        };
        assert_eq!(metrics_fds(&with), reserved);
        assert_eq!(metrics_fds(&ServerConfig::default()), 0);
    }
}
