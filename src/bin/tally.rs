//! `tally`: the Tally client. Enroll a device, send requests and messages, listen.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, CommandFactory, Parser, Subcommand};

use tally::client::{self, Client, ClientOptions, Incoming, LinkEvent};
use tally::proto::credential::{Credential, EnrollmentToken};
use tally::proto::frame::EnrollMode;
use tally::proto::{ErrorCode, Id, Status};

/// Tally client: authenticated requests to a tallyd server.
#[derive(Parser)]
#[command(version, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this device with an enrollment token and write its credential file (mode 0600).
    ///
    /// The token (from `tallyd token`) is a secret: it is read from --token-file, else
    /// from $TALLY_TOKEN, else from stdin, never from the command line, where other local
    /// users could read it in /proc.
    Enroll {
        /// File holding the enrollment token ("-" for stdin).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The token itself. Visible to other local users in the process list: prefer
        /// --token-file or $TALLY_TOKEN.
        #[arg(long, hide = true, conflicts_with = "token_file")]
        token: Option<String>,
        /// The identity to enroll: 1-64 of A-Z a-z 0-9 . _ - : @
        #[arg(long)]
        id: String,
        /// Server address.
        #[arg(long, env = "TALLY_SERVER", default_value = "127.0.0.1:7420")]
        server: String,
        /// Where to write the credential.
        #[arg(long, default_value = "tally.cred")]
        out: PathBuf,
        /// Overwrite an existing credential file.
        #[arg(long)]
        force: bool,
    },
    /// Send one REQUEST (DATA, or stdin if DATA is absent) and write the response payload to stdout.
    ///
    /// If a `tally listen` of the same identity runs (this user's, same server and key),
    /// the request goes through its session instead of taking it over; otherwise it
    /// makes a session of its own.
    Request {
        #[command(flatten)]
        conn: ConnArgs,
        /// Make a session of its own even if a `tally listen` of this identity runs (that
        /// listener's session is taken over: it reconnects 10 s to 10 min later).
        #[arg(long)]
        direct: bool,
        /// The request payload; read from stdin when absent.
        data: Option<String>,
    },
    /// Send one one-way MESSAGE (DATA, or stdin if DATA is absent).
    ///
    /// Through the session of a running `tally listen` of the same identity, as `tally
    /// request`.
    Message {
        #[command(flatten)]
        conn: ConnArgs,
        /// Make a session of its own even if a `tally listen` of this identity runs (that
        /// listener's session is taken over).
        #[arg(long)]
        direct: bool,
        /// The message payload; read from stdin when absent.
        data: Option<String>,
    },
    /// Load-test a running tallyd (echo backend), side by side with a baseline echo server.
    Bench(BenchArgs),
    /// Check an implementation against the rules of spec/PROTOCOL.md that the other end
    /// can observe: one line per rule, with its section; exit 1 if any failed.
    #[command(subcommand)]
    Conformance(Conformance),
    /// Keep a session open, print what the server sends (one line each) and answer its requests.
    Listen {
        #[command(flatten)]
        conn: ConnArgs,
        /// Answer server requests with their own payload.
        #[arg(long, conflicts_with = "exec")]
        echo: bool,
        /// Answer each server request by running this shell command: the request payload on
        /// its stdin, $TALLY_ID set; exit 0 answers OK with its stdout, another exit status
        /// answers status 2 (BACKEND_ERROR) with its stderr. Without --echo or --exec,
        /// requests are answered with status 4 (REFUSED).
        #[arg(long, value_name = "COMMAND")]
        exec: Option<String>,
        /// At most N handlers (--exec commands) run at once. Server requests beyond them
        /// wait, in order of arrival, for one to finish; when 64 already wait, a request
        /// is answered at once with status 1 (UNAVAILABLE) and a reason, and the sender
        /// may try again. (tallyd holds at most limits.server_requests_in_flight, 32 by
        /// default, unanswered requests per device itself.)
        #[arg(long, value_name = "N", default_value_t = 4,
              value_parser = clap::value_parser!(u16).range(1..=1024))]
        max_handlers: u16,
        /// Exit when the session ends. By default a lost session is made again (the
        /// server restarted, the network was cut) after a jittered, growing delay: from
        /// about 1 s up to 60 s, and from 10 s up to 10 min after a takeover by another
        /// connection of this identity or a refusal; it stops only when the identity is
        /// revoked or removed.
        #[arg(long)]
        no_reconnect: bool,
        /// Do not offer this session to `tally request` and `tally message`. By default
        /// they send through it (a Unix socket of mode 0600 in $XDG_RUNTIME_DIR/tally/,
        /// else /tmp/tally-UID/, removed at exit) instead of taking it over, and a second
        /// `tally listen` of the identity is refused while this one runs.
        #[arg(long)]
        no_share: bool,
    },
}

#[derive(Subcommand)]
enum Conformance {
    /// Play a client, honest and not, against a server at ADDR: enrollment, handshake,
    /// each refusal of 8.3 provoked on purpose, unknown id vs wrong key, takeover,
    /// close. It enrolls ids named `conformance-...` with the open token.
    Server {
        /// The server, host:port.
        addr: String,
        /// File holding the server's open enrollment token ("-": stdin; else
        /// $TALLY_TOKEN, else stdin).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The credential of an identity the operator revoked: also checks that revoked
        /// looks like unknown (spec 7.5).
        #[arg(long, value_name = "FILE")]
        revoked_cred: Option<PathBuf>,
        /// Seconds to wait for each answer (a server may delay refusals, spec 13.10).
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Run the checks' sessions in the authenticated mode (HELLO) instead of the
        /// encrypted mode (SEALED_HELLO), for a server whose policy is "off".
        #[arg(long)]
        authenticated: bool,
    },
    /// Play a server that misbehaves in each way a client must refuse, run the client
    /// under test once per case, and report what it accepted.
    ///
    /// --exec is run with `sh -c`, `{cred}` replaced by a credential file for this
    /// tool's address and `{payload}` by a payload: it must send that REQUEST, print the
    /// RESPONSE's payload and exit 0 only if it got one (e.g. `tally request --retries 0
    /// --cred {cred} {payload}`). --enroll-exec gets `{server}`, `{id}`, `{out}` and the
    /// token on stdin (e.g. `tally enroll --token-file - --server {server} --id {id} --out
    /// {out}`).
    Client {
        /// Where to listen for the client under test.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// The request command (see above).
        #[arg(long)]
        exec: String,
        /// The enrollment command (see above).
        #[arg(long)]
        enroll_exec: Option<String>,
        /// Seconds one case may take before the client is killed.
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
}

/// The session mode(s) `tally bench` measures tallyd in.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SessionArg {
    Encrypted,
    Authenticated,
    Both,
}

#[derive(Args)]
struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "throughput")]
    mode: tally::bench::Mode,
    /// tallyd address.
    #[arg(long, env = "TALLY_SERVER", default_value = "127.0.0.1:7420")]
    server: String,
    /// Enrollment token, to enroll the bench identities missing from --cred-dir.
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the bench identities' credentials are kept between runs.
    #[arg(long, default_value = "tally-bench-creds")]
    cred_dir: PathBuf,
    /// tallyd's session mode: encrypted (SEALED_HELLO), authenticated (HELLO), or both,
    /// measured side by side in one run as `tally` and `tally-auth` (the daemon's policy
    /// must be "allowed" for both).
    #[arg(long, value_enum, default_value = "encrypted")]
    session: SessionArg,
    /// Address of the plain TCP echo server (`cargo run --release --features cli --example
    /// bench_plain`), measured in the same run: the summary gives every target's rate as
    /// a fraction of its rate, and its CPU per request as a multiple of its CPU.
    #[arg(long)]
    plain: Option<String>,
    /// Address of the structural twin (`--example bench_echo`: tallyd's old structure,
    /// a task per request, without the protocol), measured in the same run.
    #[arg(long)]
    twin: Option<String>,
    /// Address of the in-process TLS 1.3 PSK echo server (`--features bench-tls
    /// --example bench_tls_psk`), measured in the same run.
    #[cfg(feature = "bench-tls")]
    #[arg(long)]
    tls_psk: Option<String>,
    /// Another target: `NAME=plain:ADDR` (an echo, or a tunnel to one such as spiped's
    /// client end), `NAME=tls-psk:ADDR` (stunnel) or `NAME=tally:ADDR` (another tallyd
    /// serving the same identities, such as an older build started on the same
    /// `--state-dir`: before and after in one run; `tally-auth:` for its authenticated
    /// mode, the only one a build before the encrypted mode speaks), then `@PID,PID...` for the server
    /// processes whose CPU counts (else the one listening on ADDR's port). Repeatable.
    #[arg(long, value_name = "NAME=KIND:ADDR[@PIDS]")]
    peer: Vec<String>,
    /// Connections (throughput, idle) or workers (reconnect).
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// Request payload in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Seconds per measurement (idle: seconds the sessions are held).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Measurements per target, alternating; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The tallyd process: its CPU time per request (throughput, reconnect, flood) and
    /// its memory per session (idle). By default the process listening on --server's
    /// port, if it is on this machine.
    #[arg(long)]
    daemon_pid: Option<u32>,
    /// Flood mode: what the attackers do.
    #[arg(long, value_enum, default_value = "idle")]
    attack: tally::bench::flood::Attack,
    /// Flood mode: attacker connections held at once (bounded by this process's open-file
    /// limit, raised to its hard limit).
    #[arg(long, default_value_t = 1000)]
    attackers: usize,
    /// Flood mode: loopback addresses the attackers come from (127.0.1.1 ..., default
    /// 200); idle mode: the addresses the sessions come from (127.0.0.2 ..., default 1:
    /// the default address; more when one address's ports are not enough).
    #[arg(long)]
    sources: Option<u8>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConnArgs {
    /// The credential file written by `tally enroll`.
    #[arg(long, default_value = "tally.cred")]
    cred: PathBuf,
    /// Keepalive interval in seconds. By default the interval the server announces in
    /// the handshake; a longer value is shortened to the server's.
    #[arg(long)]
    keepalive: Option<f64>,
    /// The largest session frame this device accepts, in bytes (256 to 16777216); the
    /// server is told in the handshake and sends nothing longer.
    #[arg(long, default_value_t = tally::proto::DEFAULT_MAX_FRAME_LEN,
          value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    max_frame_len: u32,
    /// Retries when the server is busy or the connection fails before it answers
    /// (jittered exponential backoff from 0.2 s up to 5 s; each retry is reported).
    #[arg(long, default_value_t = 4)]
    retries: u32,
    /// Run the session in the authenticated mode: payloads in the clear, each frame
    /// tagged (HELLO). By default it is encrypted (SEALED_HELLO); a server that refuses
    /// the mode says MODE_REFUSED, and tally never switches on its own (spec 7.8).
    #[arg(long, env = "TALLY_AUTHENTICATE_ONLY")]
    authenticate_only: bool,
}

impl ConnArgs {
    /// The credential file, read and checked, and the client options of these flags.
    fn credential_and_options(&self) -> anyhow::Result<(Credential, ClientOptions)> {
        let text = read_credential(&self.cred)?;
        let cred = Credential::from_file(&text).with_context(|| self.cred.display().to_string())?;
        let default = client::Retry::default();
        let mut opts = ClientOptions::default()
            .with_max_frame_len(self.max_frame_len)
            .with_retry(client::Retry::new(
                self.retries,
                default.initial_delay,
                default.max_delay,
            ));
        if let Some(secs) = self.keepalive {
            opts = opts.with_keepalive(Duration::try_from_secs_f64(secs).context("--keepalive")?);
        }
        if self.authenticate_only {
            opts.mode = tally::proto::Mode::Authenticated;
        }
        Ok((cred, opts))
    }
}

/// A session of our own.
async fn connect(
    cred: &Credential,
    opts: ClientOptions,
) -> anyhow::Result<(Client, tokio::sync::mpsc::Receiver<Incoming>)> {
    Client::connect(cred, opts)
        .await
        .with_context(|| format!("session with {} as {}", cred.server, cred.id))
}

/// `tally listen`'s socket for `tally request` and `tally message`: refused if another
/// listener of the identity runs; without it (a runtime directory that cannot be used),
/// the listener runs and says so.
fn offer_session(cred: &Credential) -> anyhow::Result<Option<client::share::ShareSocket>> {
    match client::share::ShareSocket::bind(cred) {
        Ok(socket) => Ok(Some(socket)),
        Err(e) if e.is_in_use() => Err(e.into()),
        Err(e) => {
            tracing::warn!("not offering this session to `tally request` and `tally message` (they will take it over): {e}");
            Ok(None)
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn payload(data: Option<String>) -> anyhow::Result<Bytes> {
    Ok(match data {
        Some(d) => Bytes::from(d),
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            Bytes::from(buf)
        }
    })
}

fn write_credential(path: &Path, cred: &Credential, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!(
            "{} exists; use --force to overwrite it (its identity would be lost)",
            path.display()
        );
    }
    tally::secrets::write_secret_file(path, cred.to_file().as_bytes())?;
    Ok(())
}

fn printable(b: &[u8]) -> String {
    tally::output::one_line(b)
}

async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    use tally::bench::{self, Kind, Load, Measurement, Mode, Target};
    let token = a.token.as_deref().map(EnrollmentToken::parse).transpose()?;
    let creds = bench::credentials(&a.cred_dir, a.connections, &a.server, token.as_ref()).await?;
    let load = Load {
        mode: a.mode,
        connections: a.connections,
        payload: a.payload,
        depth: a.depth,
        duration: Duration::try_from_secs_f64(a.duration)?,
        sources: a.sources.unwrap_or(1),
        progress: !a.json,
    };
    let daemon_pid = a.daemon_pid.or_else(|| bench::listener_pid(&a.server));
    let first_mode = match a.session {
        SessionArg::Authenticated => tally::proto::Mode::Authenticated,
        SessionArg::Encrypted | SessionArg::Both => tally::proto::Mode::Encrypted,
    };
    let creds = std::sync::Arc::new(creds);
    let tally_target = Target {
        name: match a.session {
            SessionArg::Authenticated => "tally-auth".into(),
            _ => "tally".into(),
        },
        kind: Kind::Tally(creds.clone(), first_mode),
        pids: daemon_pid.into_iter().collect(),
    };
    if a.mode == Mode::Flood {
        let flood = bench::flood::Flood {
            attack: a.attack,
            attackers: a.attackers,
            sources: a.sources.unwrap_or(200),
            duration: load.duration,
            token,
            daemon_pid,
        };
        let r = bench::flood::run(&tally_target, a.connections, &flood).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        println!(
            "flood {:?}: {} attacker connections from {} addresses, {:.0} opened/s, daemon CPU {} per attacker connection",
            r.attack,
            r.attackers,
            a.sources.unwrap_or(200),
            r.attack_conns_per_sec,
            r.server_cpu_us_per_attack_conn
                .map_or("(give --daemon-pid)".into(), |c| format!("{c:.1} us"))
        );
        println!(
            "{:<8} {:>9} {:>9} {:>10} {:>10}",
            "devices", "attempts", "success", "p50 us", "p99 us"
        );
        for (name, d) in [("calm", &r.calm), ("flood", &r.flood)] {
            println!(
                "{:<8} {:>9} {:>8.2}% {:>10} {:>10}",
                name, d.attempts, d.success_pct, d.p50_us, d.p99_us
            );
        }
        println!(
            "p99 under flood / calm: {:.2}; recovery after the flood: {} ms",
            r.p99_ratio, r.recovery_ms
        );
        return Ok(());
    }
    let mut targets = vec![tally_target.clone()];
    if a.session == SessionArg::Both {
        targets.push(Target {
            name: "tally-auth".into(),
            kind: Kind::Tally(creds, tally::proto::Mode::Authenticated),
            pids: tally_target.pids.clone(),
        });
    }
    if a.mode != Mode::Idle {
        let found = |name: &str, addr: String, kind: Kind| Target {
            name: name.into(),
            pids: bench::listener_pid(&addr).into_iter().collect(),
            kind,
        };
        if let Some(addr) = a.plain {
            targets.insert(0, found("plain", addr.clone(), Kind::Plain(addr)));
        }
        if let Some(addr) = a.twin {
            targets.push(found("twin", addr.clone(), Kind::Plain(addr)));
        }
        #[cfg(feature = "bench-tls")]
        if let Some(addr) = a.tls_psk {
            let ctx = bench::tls::client_context()?;
            targets.push(found("tls-psk", addr.clone(), Kind::TlsPsk(addr, ctx)));
        }
        for p in &a.peer {
            targets.push(peer(p, &tally_target)?);
        }
    }
    let mut runs: Vec<Vec<Measurement>> = vec![Vec::new(); targets.len()];
    for _ in 0..a.rounds.max(1) {
        for (t, ms) in targets.iter().zip(runs.iter_mut()) {
            ms.push(bench::measure(t, &load).await?);
        }
    }
    let med = |ms: &[Measurement], f: &dyn Fn(&Measurement) -> Option<f64>| -> Option<f64> {
        let xs: Vec<f64> = ms.iter().filter_map(f).collect();
        (!xs.is_empty()).then(|| bench::median(xs))
    };
    let plain = targets.iter().position(|t| t.name == "plain");
    let plain_rate = plain.and_then(|i| med(&runs[i], &|m| Some(m.per_sec)));
    let plain_cpu = plain.and_then(|i| med(&runs[i], &|m| m.server_cpu_us));
    let rows: Vec<serde_json::Value> = targets
        .iter()
        .zip(&runs)
        .map(|(t, ms)| {
            let rate = med(ms, &|m| Some(m.per_sec));
            let cpu = med(ms, &|m| m.server_cpu_us);
            serde_json::json!({
                "target": t.name,
                "pids": t.pids,
                "per_sec": rate,
                "p50_us": med(ms, &|m| Some(m.p50_us as f64)),
                "p99_us": med(ms, &|m| Some(m.p99_us as f64)),
                "p999_us": med(ms, &|m| Some(m.p999_us as f64)),
                "server_cpu_us": cpu,
                "rate_over_plain": rate.zip(plain_rate).map(|(a, b)| a / b),
                "cpu_over_plain": cpu.zip(plain_cpu).map(|(a, b)| a / b),
                "rss_per_session": med(ms, &|m| m.rss_per_session.map(|r| r as f64)),
                "rounds": ms,
            })
        })
        .collect();
    let summary = serde_json::json!({
        "mode": a.mode, "connections": a.connections, "payload": a.payload, "depth": a.depth,
        "duration_s": a.duration, "rounds": a.rounds, "targets": rows,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let unit = if a.mode == Mode::Reconnect {
        "reconnects/s"
    } else {
        "requests/s"
    };
    println!(
        "mode {:?}, {} connections, {} B payload, depth {}, {} s x {} rounds, interleaved (medians)",
        a.mode, a.connections, a.payload, a.depth, a.duration, a.rounds
    );
    if a.mode == Mode::Idle {
        let per = rows[0]["rss_per_session"].as_f64().unwrap_or(0.0);
        println!(
            "daemon resident memory per idle session: {:.0} bytes ({:.2} KiB) at {} sessions",
            per,
            per / 1024.0,
            a.connections
        );
        return Ok(());
    }
    println!(
        "{:<10} {:>13} {:>8} {:>8} {:>9} {:>12} {:>8} {:>8}",
        "target", unit, "p50 us", "p99 us", "p99.9 us", "CPU us/op", "x rate", "x CPU"
    );
    let num = |v: &serde_json::Value, f: &dyn Fn(f64) -> String| v.as_f64().map_or("-".into(), f);
    for r in &rows {
        println!(
            "{:<10} {:>13} {:>8} {:>8} {:>9} {:>12} {:>8} {:>8}",
            r["target"].as_str().unwrap_or(""),
            num(&r["per_sec"], &|x| format!("{x:.0}")),
            num(&r["p50_us"], &|x| format!("{x:.0}")),
            num(&r["p99_us"], &|x| format!("{x:.0}")),
            num(&r["p999_us"], &|x| format!("{x:.0}")),
            num(&r["server_cpu_us"], &|x| format!("{x:.2}")),
            num(&r["rate_over_plain"], &|x| format!("{x:.3}")),
            num(&r["cpu_over_plain"], &|x| format!("{x:.3}")),
        );
    }
    if plain.is_none() {
        println!("(give --plain ADDR for the ratios against a plain TCP echo)");
    }
    Ok(())
}

/// `NAME=KIND:ADDR[@PID,PID...]`; a `tally` peer uses the credentials of `tally`.
fn peer(spec: &str, tally: &tally::bench::Target) -> anyhow::Result<tally::bench::Target> {
    use tally::bench::{Kind, Target};
    let bad = || {
        anyhow::anyhow!("--peer {spec:?}: expected NAME=plain:ADDR, NAME=tls-psk:ADDR, NAME=tally:ADDR or NAME=tally-auth:ADDR, then optionally @PID,PID...")
    };
    let (name, rest) = spec.split_once('=').ok_or_else(bad)?;
    let (kind, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (addr, pids) = match rest.split_once('@') {
        Some((addr, pids)) => (
            addr.to_string(),
            pids.split(',')
                .map(|p| p.trim().parse::<u32>().map_err(|_| bad()))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => (
            rest.to_string(),
            tally::bench::listener_pid(rest).into_iter().collect(),
        ),
    };
    let kind = match (kind, &tally.kind) {
        ("tally" | "tally-auth", Kind::Tally(creds, mode)) => {
            let mut creds = creds.as_ref().clone();
            for c in &mut creds {
                c.server = addr.clone();
            }
            let mode = match kind {
                "tally-auth" => tally::proto::Mode::Authenticated,
                _ => *mode,
            };
            Kind::Tally(std::sync::Arc::new(creds), mode)
        }
        ("plain", _) => Kind::Plain(addr),
        #[cfg(feature = "bench-tls")]
        ("tls-psk", _) => Kind::TlsPsk(addr, tally::bench::tls::client_context()?),
        #[cfg(not(feature = "bench-tls"))]
        ("tls-psk", _) => {
            anyhow::bail!("--peer {spec:?}: TLS-PSK needs a build with --features bench-tls")
        }
        _ => return Err(bad()),
    };
    Ok(Target {
        name: name.to_string(),
        kind,
        pids,
    })
}

/// Runs the conformance checks; prints them; returns whether all passed.
fn conformance(what: Conformance) -> anyhow::Result<bool> {
    use tally::conformance;
    let secs = |s: f64| Duration::try_from_secs_f64(s).context("--timeout");
    let checks = match what {
        Conformance::Server {
            addr,
            token_file,
            revoked_cred,
            timeout,
            authenticated,
        } => {
            let text = read_token(token_file.as_deref(), None)?;
            let token = EnrollmentToken::parse(&text).context("the enrollment token")?;
            let revoked = match revoked_cred {
                Some(p) => Some(
                    Credential::from_file(&read_credential(&p)?)
                        .with_context(|| p.display().to_string())?,
                ),
                None => None,
            };
            let target = conformance::server::Target {
                addr,
                token,
                timeout: secs(timeout)?,
                revoked,
                mode: if authenticated {
                    tally::proto::Mode::Authenticated
                } else {
                    tally::proto::Mode::Encrypted
                },
            };
            conformance::server::run(&target)
        }
        Conformance::Client {
            listen,
            exec,
            enroll_exec,
            timeout,
        } => {
            let dir = tempfile_dir()?;
            let target = conformance::client::Target {
                listener: std::net::TcpListener::bind(&listen)
                    .with_context(|| format!("cannot listen on {listen}"))?,
                exec,
                enroll_exec,
                dir: dir.clone(),
                timeout: secs(timeout)?,
            };
            let checks = conformance::client::run(&target);
            let _ = std::fs::remove_dir_all(&dir);
            checks
        }
    };
    Ok(conformance::report(&checks, &mut std::io::stdout())?)
}

/// A private directory for the credential files the client checks hand out.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let r = tally::conformance::fresh_id("tally-conformance");
    let dir = std::env::temp_dir().join(r.as_str());
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Server requests `tally listen` keeps waiting for a free handler (`--max-handlers`);
/// beyond, they are answered UNAVAILABLE at once.
const WAITING_REQUESTS: usize = 64;

/// `tally listen`'s bound on its handlers: a slot to run, and a ticket to wait for one.
#[derive(Clone)]
struct Handlers {
    /// One permit per handler that may run (`--max-handlers`).
    running: std::sync::Arc<tokio::sync::Semaphore>,
    /// One permit per request running or waiting: `--max-handlers` + [`WAITING_REQUESTS`].
    admitted: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl Handlers {
    fn new(max: usize) -> Self {
        Handlers {
            running: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
            admitted: std::sync::Arc::new(tokio::sync::Semaphore::new(max + WAITING_REQUESTS)),
            max,
        }
    }

    /// Takes `req` in (printed as it arrives) and answers it on a task of its own: with
    /// `answer` once a handler is free, or UNAVAILABLE at once if too many wait already.
    /// A slow handler holds up neither the other requests nor Ctrl-C; a session lost
    /// while answering is the caller's to report.
    fn take<F>(&self, req: client::IncomingRequest, answer: impl FnOnce(Bytes) -> F)
    where
        F: std::future::Future<Output = (Status, Bytes)> + Send + 'static,
    {
        println!("request: {}", printable(&req.payload));
        let Ok(ticket) = self.admitted.clone().try_acquire_owned() else {
            let why = format!(
                "tally listen is busy: --max-handlers {} running and {WAITING_REQUESTS} requests waiting; try again later",
                self.max
            );
            tokio::spawn(async move {
                println!("answered: {}", Status::UNAVAILABLE);
                let _ = req.respond(Status::UNAVAILABLE, Bytes::from(why)).await;
            });
            return;
        };
        let running = self.running.clone();
        // Lazy: the handler starts when awaited, once it has a slot.
        let handler = answer(req.payload.clone());
        tokio::spawn(async move {
            let _ticket = ticket;
            // Never closed: acquiring fails only if it were.
            let Ok(_slot) = running.acquire_owned().await else {
                return;
            };
            let (status, body) = handler.await;
            println!("answered: {status}");
            let _ = req.respond(status, body).await;
        });
    }

    /// Takes a queued message or request (spec 8.8; printed as it arrives) and
    /// acknowledges it once handled: a message at once, a request with `answer`'s reply
    /// once a handler is free (a delivery waits for one: the server sends no more than
    /// its window). Unacknowledged (the session lost first), it comes again.
    fn take_delivery<F>(&self, d: client::IncomingDelivery, answer: impl FnOnce(Bytes) -> F)
    where
        F: std::future::Future<Output = (Status, Bytes)> + Send + 'static,
    {
        println!(
            "queued {} {}: {}",
            d.kind.as_str(),
            d.msg_id,
            printable(&d.payload)
        );
        if d.kind == tally::proto::DeliveryKind::Message {
            tokio::spawn(async move {
                let msg_id = d.msg_id;
                if d.ack(Status::OK, Bytes::new()).await.is_ok() {
                    println!("acknowledged: {msg_id}");
                }
            });
            return;
        }
        let running = self.running.clone();
        let handler = answer(d.payload.clone());
        tokio::spawn(async move {
            let Ok(_slot) = running.acquire_owned().await else {
                return;
            };
            let (status, body) = handler.await;
            let msg_id = d.msg_id;
            if d.ack(status, body).await.is_ok() {
                println!("acknowledged: {msg_id} ({status})");
            }
        });
    }
}

/// Runs `cmd` with `payload` on stdin; its stdout (exit 0) or stderr (otherwise) answers.
async fn run_handler(cmd: &str, id: &Id, payload: &[u8]) -> (Status, Bytes) {
    use tokio::io::AsyncWriteExt;
    let child = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .env("TALLY_ID", id.as_str())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return (
                Status::BACKEND_ERROR,
                Bytes::from(format!("cannot run handler: {e}")),
            )
        }
    };
    let mut stdin = child.stdin.take().expect("piped");
    let input = payload.to_vec();
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let out = child.wait_with_output().await;
    let _ = feed.await;
    match out {
        Ok(o) if o.status.success() => (Status::OK, Bytes::from(o.stdout)),
        Ok(o) => (Status::BACKEND_ERROR, Bytes::from(o.stderr)),
        Err(e) => (
            Status::BACKEND_ERROR,
            Bytes::from(format!("handler failed: {e}")),
        ),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `tally generate man DIR` / `tally generate completions SHELL` (hidden).
    tally::generate::intercept(Cli::command);
    // The library reports retries and other warnings through `tracing`: to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("tally: {}", tally::logging::error_report(&e));
        std::process::exit(1);
    }
}

/// Reads a credential file, refusing one that other users can read or write (as ssh
/// refuses such a private key): its key lets anyone act as the device.
fn read_credential(path: &Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read {shown}"))?
        .permissions()
        .mode();
    if mode & 0o006 != 0 {
        anyhow::bail!(
            "{shown} is accessible to every user of this machine (mode {:04o}), and its key \
             lets anyone act as the device: `chmod 600 {shown}`, then try again",
            mode & 0o7777
        );
    }
    if mode & 0o060 != 0 {
        tracing::warn!(
            "{shown} is accessible to its group (mode {:04o}); `chmod 600 {shown}` unless that group is meant to hold the device's key",
            mode & 0o7777
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {shown}"))?;
    Ok(zeroize::Zeroizing::new(text))
}

/// The enrollment token: from `--token-file` (`-` is stdin), `--token`, `$TALLY_TOKEN`,
/// or stdin, in that order.
fn read_token(
    file: Option<&Path>,
    arg: Option<String>,
) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let from_stdin = || -> anyhow::Result<zeroize::Zeroizing<String>> {
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            eprintln!("paste the enrollment token, then press Enter:");
        }
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the enrollment token from stdin")?;
        Ok(line)
    };
    match (file, arg) {
        (Some(p), _) if p == Path::new("-") => from_stdin(),
        (Some(p), _) => Ok(zeroize::Zeroizing::new(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the enrollment token from {}", p.display()))?,
        )),
        (None, Some(t)) => Ok(zeroize::Zeroizing::new(t)),
        (None, None) => match std::env::var("TALLY_TOKEN") {
            Ok(t) => Ok(zeroize::Zeroizing::new(t)),
            Err(_) => from_stdin(),
        },
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            token_file,
            token,
            id,
            server,
            out,
            force,
        } => {
            let text = read_token(token_file.as_deref(), token)?;
            let token = EnrollmentToken::parse(&text).context("the enrollment token")?;
            let id = Id::new(&id).context("--id")?;
            if out.exists() && !force {
                bail!(
                    "{} exists; use --force to overwrite it (its identity would be lost)",
                    out.display()
                );
            }
            let what = format!("enrollment of {id} at {server}");
            let mode = token.mode;
            let cred = match client::enroll(&server, &token, id, Duration::from_secs(10)).await {
                Ok(cred) => cred,
                // The server says no more than "refused" (spec 7.5); what kind of token
                // this was narrows down why.
                Err(client::ClientError::Refused(code)) if code == ErrorCode::ENROLL_REFUSED => {
                    let why = match mode {
                        EnrollMode::Open => "this open token does not enroll here: this server does not accept open enrollment (open_enrollment = false, or `tallyd open-enrollment off` in a fleet: ask for a token of your own, `tallyd token --id`), or the open token was replaced since (`tallyd token --rotate-open`), or it is another server's token (check --server)",
                        EnrollMode::Token => "this per-identity token does not enroll this id here: it is single use (already used?), it expires (3 days by default), it may have been withdrawn or replaced by a newer one, it enrolls only the id it was issued for (check --id), or it is another server's (check --server); `tallyd tokens` on the server lists the tokens outstanding",
                    };
                    bail!("{what}: refused by the server ({code}): {why}");
                }
                Err(e) => return Err(anyhow::Error::new(e).context(what)),
            };
            write_credential(&out, &cred, force)?;
            eprintln!(
                "enrolled {} at {}; credential written to {}",
                cred.id,
                cred.server,
                out.display()
            );
        }
        Command::Request { conn, direct, data } => {
            let payload = payload(data)?;
            let (cred, opts) = conn.credential_and_options()?;
            let shared = match direct {
                false => client::share::request(&cred, &payload).await,
                true => None,
            };
            let result = match shared {
                Some(result) => result,
                None => {
                    // Not kept: a server request arriving meanwhile is answered UNAVAILABLE
                    // at once (`tally listen` answers them), not left waiting for the
                    // backend's timeout.
                    let (client, _) = connect(&cred, opts).await?;
                    let result = client.request_with_status(payload).await;
                    let _ = client.close().await;
                    result
                }
            };
            match result? {
                (Status::OK, body) => tally::output::payload_to_stdout(&body)?,
                (status, body) => {
                    bail!("request failed with status {status}: {}", printable(&body))
                }
            }
        }
        Command::Message { conn, direct, data } => {
            let payload = payload(data)?;
            let (cred, opts) = conn.credential_and_options()?;
            let shared = match direct {
                false => client::share::message(&cred, &payload).await,
                true => None,
            };
            match shared {
                Some(result) => result?,
                None => {
                    let (client, _) = connect(&cred, opts).await?;
                    client.message(payload).await?;
                    client.close().await?;
                }
            }
        }
        Command::Bench(args) => bench(args).await?,
        Command::Conformance(what) => {
            if !tokio::task::spawn_blocking(move || conformance(what)).await?? {
                std::process::exit(1);
            }
        }
        Command::Listen {
            conn,
            echo,
            exec,
            max_handlers,
            no_reconnect,
            no_share,
        } => {
            let (cred, opts) = conn.credential_and_options()?;
            // Before connecting: a second listener of the identity is refused before it
            // takes the first one's session.
            let share = if no_share {
                None
            } else {
                offer_session(&cred)?
            };
            // Ctrl-C or SIGTERM close the session and remove the socket (dropped on return).
            let stop = stop_signal();
            tokio::pin!(stop);
            let handlers = Handlers::new(usize::from(max_handlers));
            let answer = |id: Id| {
                let exec = exec.clone();
                move |payload: Bytes| async move {
                    match (&exec, echo) {
                        (Some(cmd), _) => run_handler(cmd, &id, &payload).await,
                        (None, true) => (Status::OK, payload),
                        (None, false) => (
                            Status::REFUSED,
                            Bytes::from_static(
                                b"tally listen has no handler (use --echo or --exec)",
                            ),
                        ),
                    }
                }
            };
            if no_reconnect {
                let (client, mut incoming) = connect(&cred, opts).await?;
                let _sharing = share.map(|s| s.serve_client(&client));
                eprintln!(
                    "connected as {}; waiting for the server (Ctrl-C to stop)",
                    client.id()
                );
                loop {
                    tokio::select! {
                        item = incoming.recv() => match item {
                            Some(Incoming::Message(p)) => println!("message: {}", printable(&p)),
                            Some(Incoming::Request(req)) => handlers.take(req, answer(client.id().clone())),
                            Some(Incoming::Delivery(d)) => handlers.take_delivery(d, answer(client.id().clone())),
                            Some(other) => println!("unhandled: {other:?}"),
                            None => return Err(client.closed().await.into()),
                        },
                        _ = &mut stop => { client.close().await?; return Ok(()) }
                        e = client.closed() => return Err(e.into()),
                    }
                }
            }
            let what = format!("session with {} as {}", cred.server, cred.id);
            let id = cred.id.clone();
            let (link, mut events) = client::Link::start(cred, opts, client::Reconnect::default());
            let _sharing = share.map(|s| s.serve_link(&link));
            let mut ever_up = false;
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Some(LinkEvent::Up(_)) => {
                            let again = if ever_up { "reconnected" } else { "connected" };
                            eprintln!("{again} as {id}; waiting for the server (Ctrl-C to stop)");
                            ever_up = true;
                        }
                        Some(LinkEvent::Down { error, retry_in, was_up }) => {
                            // Not even a first failure ends it: a refusal before the
                            // session (a bad tag, an ERROR, garbage) is unauthenticated,
                            // someone on the path can forge it (the Link slows down).
                            let lost = if was_up { "session lost" } else { "cannot connect" };
                            let hint = match &error {
                                client::ClientError::Closed { code, .. }
                                    if *code == tally::proto::CloseCode::TAKEN_OVER =>
                                {
                                    " (another connection of this identity replaced the session: is it used by two devices?)"
                                }
                                _ => "",
                            };
                            eprintln!(
                                "{lost}: {}; reconnecting in {:.1} s{hint}",
                                tally::logging::error_report(&anyhow::Error::new(error)),
                                retry_in.as_secs_f64()
                            );
                        }
                        Some(LinkEvent::Incoming(Incoming::Message(p))) => println!("message: {}", printable(&p)),
                        Some(LinkEvent::Incoming(Incoming::Request(req))) => {
                            handlers.take(req, answer(id.clone()));
                        }
                        Some(LinkEvent::Incoming(Incoming::Delivery(d))) => {
                            handlers.take_delivery(d, answer(id.clone()));
                        }
                        Some(LinkEvent::Stopped(error)) => {
                            return Err(anyhow::Error::new(error).context(what))
                        }
                        Some(other) => println!("unhandled: {other:?}"),
                        // The last word did not fit in a full queue: ask the link.
                        None => match link.session().await {
                            Err(e) => return Err(anyhow::Error::new(e).context(what)),
                            Ok(_) => anyhow::bail!("{what}: the link ended"),
                        },
                    },
                    _ = &mut stop => { link.close().await; return Ok(()) }
                }
            }
        }
    }
    Ok(())
}
