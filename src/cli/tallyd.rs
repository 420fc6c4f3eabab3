//! `tallyd`'s command line apart from the daemon itself: the flags every subcommand takes,
//! the daemon's flags and configuration, and the admin commands (each runs through the
//! running daemon's control socket, or on the state directory when none runs).
//! `src/bin/tallyd.rs` parses the command line and calls [`run_admin`] or the daemon.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::admin;
use crate::config::{ServerConfig, TakeoverPolicy};
use crate::logging::LogFormat;

/// The flags of every subcommand.
#[derive(Args, Clone)]
pub struct Global {
    /// TOML configuration file; flags override it. Re-read on SIGHUP.
    #[arg(long, short, global = true, env = "TALLYD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for keys and the identity store [default: $STATE_DIRECTORY, else ./tally-state].
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Directory holding the daemon's key files when they are not in the state
    /// directory (systemd's LoadCredential=). Admin commands need it only when the
    /// daemon is stopped: a running daemon answers them on its control socket.
    #[arg(long, global = true, env = "CREDENTIALS_DIRECTORY", value_name = "DIR")]
    pub credentials_dir: Option<PathBuf>,
}

/// The admin commands (every subcommand but `serve`).
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create the state directory, the keys and the store, then exit.
    Init,
    /// Print an enrollment token on stdout: the open token, or with --id issue a
    /// single-use token for one identity. --revoke ID withdraws an outstanding token;
    /// --rotate-open replaces the open token (the old one stops working).
    Token {
        /// Issue a token that can enroll only this identity (once; replaces an earlier one).
        #[arg(long, conflicts_with_all = ["revoke", "rotate_open"])]
        id: Option<String>,
        /// How long the token is valid: 90s, 30m, 12h, 3d [default: 3d].
        #[arg(long, requires = "id", value_parser = admin::parse_duration)]
        expires: Option<std::time::Duration>,
        /// Withdraw the outstanding token of this identity.
        #[arg(long, value_name = "ID", conflicts_with = "rotate_open")]
        revoke: Option<String>,
        /// Make a new open token; the old one stops working at once.
        #[arg(long)]
        rotate_open: bool,
    },
    /// List the outstanding per-identity tokens: id, issued, expires, state.
    Tokens {
        /// Print a JSON array (keys: id, issued, expires, state; times in Unix seconds).
        #[arg(long)]
        json: bool,
    },
    /// List identities: id, mode, created, last seen, revoked, queued messages, online.
    Identities {
        /// Print a JSON array (keys: id, mode, created, last_seen, revoked, online, peer, queued).
        #[arg(long)]
        json: bool,
    },
    /// Revoke an identity: refuse it from now on and close its live session.
    Revoke {
        /// The identity.
        id: String,
    },
    /// Delete an identity so its id can be enrolled again (a replaced device, or an
    /// enrollment whose confirmation was lost), and close its live session.
    Remove {
        /// The identity.
        id: String,
    },
    /// Print what the running daemon is and what it counted: version, uptime, listen
    /// address, store, backend, sessions, connections and what waits, enrollments,
    /// handshakes, refusals by reason, requests (the raw metrics: `metrics_listen`).
    Status {
        /// Print one JSON object of typed fields (numbers as numbers; refusals, requests,
        /// frames... as objects; keys in README, "Manage identities").
        #[arg(long)]
        json: bool,
    },
    /// List live sessions: id, peer, since, frames in and out.
    Sessions {
        /// Print a JSON array (keys: id, peer, since, frames_in, frames_out).
        #[arg(long)]
        json: bool,
    },
    /// Send a MESSAGE (or with --request a REQUEST, printing the device's answer) to a connected device;
    /// with --queue, queue it durably for a device that may be offline (printing its message id).
    Send {
        /// The identity.
        id: String,
        /// Send a REQUEST and print the device's response payload on stdout.
        #[arg(long)]
        request: bool,
        /// Seconds to wait for the device's answer.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Queue it: stored before this returns, delivered whenever the device holds a
        /// session, until it acknowledges or the TTL passes. Prints the message id.
        #[arg(long)]
        queue: bool,
        /// With --queue: how long it may wait for the device (e.g. 90s, 12h, 7d)
        /// [default: limits.queue_ttl].
        #[arg(long, requires = "queue", value_parser = admin::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// With --queue: wait this long for the outcome (e.g. 30s): the device's answer,
        /// or why it was not delivered.
        #[arg(long, requires = "queue", value_parser = admin::parse_duration)]
        wait: Option<std::time::Duration>,
        /// The payload; read from stdin when absent.
        data: Option<String>,
    },
    /// List the messages queued for a device (--purge: withdraw them, or one with --msg).
    Queue {
        /// The identity.
        id: String,
        /// Withdraw its queued messages (their senders are told: purged).
        #[arg(long)]
        purge: bool,
        /// With --purge: only this message id.
        #[arg(long, requires = "purge")]
        msg: Option<u64>,
        /// Print a JSON array (keys: msg_id, kind, bytes, queued, expires, origin).
        #[arg(long)]
        json: bool,
    },
    /// Print whether open enrollment is on; with on or off, turn it on or off for a whole
    /// fleet (one decision for every node, kept in the fleet's log). A single daemon's is
    /// `open_enrollment` in its configuration file.
    OpenEnrollment {
        /// on or off.
        set: Option<OnOff>,
    },
}

/// `on` or `off`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Default, Clone)]
pub struct ServeArgs {
    /// Address to listen on, unless systemd passes a socket [default: $TALLYD_LISTEN, else
    /// 127.0.0.1:7420].
    #[arg(long, global = true)]
    pub listen: Option<std::net::SocketAddr>,
    /// Log filter: error, warn, info, debug, trace [default: info; RUST_LOG overrides].
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Log output: text (journald style under systemd) or json [default: text].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// When an identity with a live session connects again: replace the old session, or reject the new one.
    #[arg(long, global = true, value_enum)]
    pub takeover: Option<TakeoverPolicy>,
    /// Which session modes devices may use: required (encrypted only), allowed (both), off (authenticated only) [default: required].
    #[arg(long, global = true, value_enum)]
    pub encryption: Option<crate::config::EncryptionPolicy>,
    /// Accept only per-identity tokens, not the open enrollment token.
    #[arg(long, global = true)]
    pub no_open_enrollment: bool,
    /// Serve `GET /metrics` (Prometheus) on this address [default: off].
    #[arg(long, global = true)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl ServeArgs {
    /// The daemon-only flags given.
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("--listen", self.listen.is_some()),
            ("--log-level", self.log_level.is_some()),
            ("--log-format", self.log_format.is_some()),
            ("--takeover", self.takeover.is_some()),
            ("--encryption", self.encryption.is_some()),
            ("--no-open-enrollment", self.no_open_enrollment),
            ("--metrics-listen", self.metrics_listen.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }
}

impl AdminCommand {
    /// The subcommand as typed.
    pub fn name(&self) -> &'static str {
        match self {
            AdminCommand::Init => "init",
            AdminCommand::Token { .. } => "token",
            AdminCommand::Tokens { .. } => "tokens",
            AdminCommand::Identities { .. } => "identities",
            AdminCommand::Revoke { .. } => "revoke",
            AdminCommand::Remove { .. } => "remove",
            AdminCommand::Sessions { .. } => "sessions",
            AdminCommand::Status { .. } => "status",
            AdminCommand::Send { .. } => "send",
            AdminCommand::Queue { .. } => "queue",
            AdminCommand::OpenEnrollment { .. } => "open-enrollment",
        }
    }
}

/// `tallyd send --queue`: prints the message id (stdout), then with --wait the outcome.
fn send_queued(
    dir: &std::path::Path,
    id: &str,
    request: bool,
    payload: &[u8],
    ttl: Option<std::time::Duration>,
    wait: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    use admin::QueuedSend;
    match admin::enqueue(dir, id, request, payload, ttl, wait)? {
        QueuedSend::Queued(msg_id) => {
            println!("{msg_id}");
            match wait {
                None => eprintln!("queued for {id} as message {msg_id}"),
                Some(w) => anyhow::bail!(
                    "message {msg_id} is still queued for {id} after {}s (it stays queued; `tallyd queue {id}` lists it)",
                    w.as_secs_f64()
                ),
            }
        }
        QueuedSend::Acknowledged(msg_id, status, body) => {
            eprintln!("{id} acknowledged message {msg_id}");
            if status != crate::proto::Status::OK {
                anyhow::bail!(
                    "{id} answered message {msg_id} with status {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            if request {
                crate::output::payload_to_stdout(&body)?;
            } else {
                println!("{msg_id}");
            }
        }
        QueuedSend::Failed(msg_id, outcome, reason) => anyhow::bail!(
            "message {msg_id} for {id}: {outcome}{}",
            reason.map(|r| format!(": {r}")).unwrap_or_default()
        ),
    }
    Ok(())
}

/// Says which nodes of a fleet confirmed a revocation or removal.
fn confirmed(fleet: &Option<crate::control::FleetConfirmation>) {
    let Some(f) = fleet else { return };
    if f.missing.is_empty() {
        println!("confirmed by every node of the fleet ({})", f.nodes);
    } else {
        eprintln!(
            "warning: not confirmed yet by {} of the fleet's {} nodes: {} (a node that cannot read it fences itself; `tallyd status` on it says why)",
            f.missing.len(),
            f.nodes,
            f.missing.join(", ")
        );
    }
}

fn format(json: bool) -> admin::Format {
    if json {
        admin::Format::Json
    } else {
        admin::Format::Table
    }
}

/// The configuration file, then the flags over it.
pub fn load_config(global: &Global, serve: &ServeArgs) -> anyhow::Result<ServerConfig> {
    let mut config = match &global.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    if let Some(dir) = &global.state_dir {
        config.state_dir = dir.clone();
    }
    if let Some(listen) = serve.listen {
        config.listen = listen;
    }
    if let Some(level) = &serve.log_level {
        config.log_level = level.clone();
    }
    if let Some(format) = serve.log_format {
        config.log_format = format;
    }
    if let Some(t) = serve.takeover {
        config.takeover = t;
    }
    if let Some(e) = serve.encryption {
        config.encryption = e;
    }
    if serve.no_open_enrollment {
        config.open_enrollment = false;
    }
    if let Some(addr) = serve.metrics_listen {
        config.metrics_listen = Some(addr);
    }
    config.validate()?;
    Ok(config)
}

/// Runs admin command `command`.
pub fn run_admin(global: &Global, command: AdminCommand) -> anyhow::Result<()> {
    let config = load_config(global, &ServeArgs::default())?;
    let dir = &config.state_dir;
    let creds = global.credentials_dir.clone();
    let store = config.store_location()?;
    // The admin commands that work without a daemon open the SQLite file of the state
    // directory; a fleet's identities are changed through one of its daemons, which
    // tells the others.
    let offline = !matches!(
        command,
        AdminCommand::Init
            | AdminCommand::Sessions { .. }
            | AdminCommand::Status { .. }
            | AdminCommand::Send { .. }
            | AdminCommand::Queue { .. }
            | AdminCommand::OpenEnrollment { .. }
    );
    if store.is_shared() && offline && !crate::secrets::state_dir_in_use(dir) {
        anyhow::bail!(
            "store = {store} is a fleet's database: admin commands go through a running tallyd of the fleet, and none runs with state directory {}. Start one (`tallyd --config ...`), or give the --state-dir (or --config) of one that runs",
            dir.display()
        );
    }
    match command {
        AdminCommand::Init => {
            let created = admin::init(
                dir,
                creds.as_deref(),
                &store,
                config.store_password_file.as_deref(),
            )?;
            let what = if created {
                "initialised"
            } else {
                "already initialised"
            };
            eprintln!("{}: {what}", dir.display());
        }
        AdminCommand::Token {
            id: Some(id),
            expires,
            ..
        } => {
            let lifetime = expires.unwrap_or(crate::tokens::DEFAULT_TOKEN_LIFETIME);
            let issued = admin::issue_token(dir, creds.as_deref(), &id, lifetime)?;
            println!("{}", *issued.token);
            let replaced = if issued.replaced {
                format!("; the token issued for {id} before no longer works")
            } else {
                String::new()
            };
            eprintln!(
                "token for {id}: single use, valid until {} UTC{replaced}",
                admin::format_time(issued.expires)
            );
        }
        AdminCommand::Token {
            revoke: Some(id), ..
        } => {
            if admin::revoke_token(dir, creds.as_deref(), &id)? {
                eprintln!("{id}: token revoked");
            } else {
                anyhow::bail!("{id} has no outstanding token");
            }
        }
        AdminCommand::Token { rotate_open, .. } => {
            let open = admin::open_token(dir, creds.as_deref(), rotate_open)?;
            println!("{}", *open.token);
            if rotate_open {
                eprintln!("open token rotated: the previous open token no longer enrolls anything");
            }
            match open.open {
                Some(false) if store.is_shared() => eprintln!("warning: open enrollment is off for this fleet: devices are refused with this token until `tallyd open-enrollment on`; issue per-identity tokens instead (`tallyd token --id DEVICE-ID`)"),
                Some(false) => eprintln!("warning: open enrollment is off in the running tallyd (open_enrollment = false, or --no-open-enrollment): devices are refused with this token; issue per-identity tokens instead (`tallyd token --id DEVICE-ID`)"),
                None if !config.open_enrollment => eprintln!("warning: open enrollment is off in this configuration (open_enrollment = false): devices are refused with this token; issue per-identity tokens instead (`tallyd token --id DEVICE-ID`)"),
                _ => {}
            }
        }
        AdminCommand::Tokens { json } => {
            print!("{}", admin::tokens(dir, creds.as_deref(), format(json))?)
        }
        AdminCommand::Identities { json } => print!(
            "{}",
            admin::identities(dir, creds.as_deref(), format(json))?
        ),
        AdminCommand::Revoke { id } => {
            let r = admin::revoke(dir, creds.as_deref(), &id)?;
            let state = if r.newly {
                "revoked"
            } else {
                "was already revoked"
            };
            let session = match r.session_closed {
                Some(true) => "its live session was closed",
                Some(false) => "it had no live session",
                None => "tallyd is not running",
            };
            println!("{id}: {state}; {session}");
            confirmed(&r.fleet);
        }
        AdminCommand::Remove { id } => {
            let (existed, closed, fleet) = admin::remove(dir, creds.as_deref(), &id)?;
            if !existed {
                anyhow::bail!("no identity {id}");
            }
            let session = match closed {
                Some(true) => "its live session was closed",
                Some(false) => "it had no live session",
                None => "tallyd is not running",
            };
            println!("{id}: removed, and can be enrolled again; {session}");
            confirmed(&fleet);
        }
        AdminCommand::Sessions { json } => print!("{}", admin::sessions(dir, format(json))?),
        AdminCommand::OpenEnrollment { set } => {
            let set = set.map(|s| s == OnOff::On);
            let (open, fleet) = admin::open_enrollment(dir, set)?;
            let state = if open { "on" } else { "off" };
            match (fleet, set) {
                (true, Some(_)) => println!(
                    "open enrollment is {state} for the whole fleet (every node applies it as it hears of it)"
                ),
                (true, None) => println!("open enrollment is {state} for the whole fleet"),
                (false, _) => println!(
                    "open enrollment is {state} (open_enrollment in this daemon's configuration)"
                ),
            }
        }
        AdminCommand::Status { json } => print!("{}", admin::status(dir, format(json))?),
        AdminCommand::Queue {
            id,
            purge,
            msg,
            json,
        } => {
            if purge {
                let n = admin::purge(dir, &id, msg)?;
                println!("{id}: {n} queued message(s) withdrawn");
            } else {
                print!("{}", admin::queue(dir, &id, format(json))?);
            }
        }
        AdminCommand::Send {
            id,
            request,
            timeout,
            queue,
            ttl,
            wait,
            data,
        } => {
            let payload = match data {
                Some(d) => d.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                    buf
                }
            };
            if queue {
                return send_queued(dir, &id, request, &payload, ttl, wait);
            }
            let timeout = std::time::Duration::try_from_secs_f64(timeout)?;
            match admin::send(dir, &id, request, &payload, timeout)? {
                None => eprintln!("sent to {id}"),
                Some((crate::proto::Status::OK, body)) => crate::output::payload_to_stdout(&body)?,
                Some((status, body)) => {
                    anyhow::bail!(
                        "{id} answered with status {status}: {}",
                        String::from_utf8_lossy(&body)
                    )
                }
            }
        }
    }
    Ok(())
}
