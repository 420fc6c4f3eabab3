//! `tally bench`: the load tool's command line, and its summary printed.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::proto::credential::EnrollmentToken;

/// The session mode(s) `tally bench` measures tallyd in.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionArg {
    Encrypted,
    Authenticated,
    Both,
}

#[derive(Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "throughput")]
    mode: crate::bench::Mode,
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
    attack: crate::bench::flood::Attack,
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

/// `tally bench`: measures, then prints the summary (or its JSON).
pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    use crate::bench::{self, Kind, Load, Measurement, Mode, Target};
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
        SessionArg::Authenticated => crate::proto::Mode::Authenticated,
        SessionArg::Encrypted | SessionArg::Both => crate::proto::Mode::Encrypted,
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
        } else {
            print!("{r}");
        }
        return Ok(());
    }
    let mut targets = vec![tally_target.clone()];
    if a.session == SessionArg::Both {
        targets.push(Target {
            name: "tally-auth".into(),
            kind: Kind::Tally(creds, crate::proto::Mode::Authenticated),
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
    let summary = bench::report::Summary::new(&load, a.rounds, &targets, &runs);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{summary}");
    }
    Ok(())
}

/// `NAME=KIND:ADDR[@PID,PID...]`; a `tally` peer uses the credentials of `tally`.
fn peer(spec: &str, tally: &crate::bench::Target) -> anyhow::Result<crate::bench::Target> {
    use crate::bench::{Kind, Target};
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
            crate::bench::listener_pid(rest).into_iter().collect(),
        ),
    };
    let kind = match (kind, &tally.kind) {
        ("tally" | "tally-auth", Kind::Tally(creds, mode)) => {
            let mut creds = creds.as_ref().clone();
            for c in &mut creds {
                c.server = addr.clone();
            }
            let mode = match kind {
                "tally-auth" => crate::proto::Mode::Authenticated,
                _ => *mode,
            };
            Kind::Tally(std::sync::Arc::new(creds), mode)
        }
        ("plain", _) => Kind::Plain(addr),
        #[cfg(feature = "bench-tls")]
        ("tls-psk", _) => Kind::TlsPsk(addr, crate::bench::tls::client_context()?),
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
