//! `tallyd`: the Tally daemon and its admin commands.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use tally::config::{ServerConfig, TakeoverPolicy};
use tally::{admin, backend, control, server};

/// Tally daemon: authenticates every request and response between devices and this server.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args)]
struct Global {
    /// TOML configuration file; flags override it.
    #[arg(long, short, global = true, env = "TALLYD_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for keys and the identity store [default: $STATE_DIRECTORY, else ./tally-state].
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default; `tallyd --listen ADDR` = `tallyd serve --listen ADDR`).
    Serve,
    /// Create the state directory, the keys and the store, then exit.
    Init,
    /// Print an enrollment token on stdout: the open token, or with --id a per-identity token.
    Token {
        /// Make a token that can enroll only this identity.
        #[arg(long)]
        id: Option<String>,
    },
    /// List identities: id, mode, created, last seen, revoked, online.
    Identities,
    /// Revoke an identity: refuse it from now on and close its live session.
    Revoke {
        /// The identity.
        id: String,
    },
}

#[derive(Args, Default)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:7420].
    #[arg(long, global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Log filter: error, warn, info, debug, trace [default: info; RUST_LOG overrides].
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// When an identity with a live session connects again: replace the old session, or reject the new one.
    #[arg(long, global = true, value_enum)]
    takeover: Option<TakeoverPolicy>,
    /// Accept only per-identity tokens, not the open enrollment token.
    #[arg(long, global = true)]
    no_open_enrollment: bool,
}

fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

fn load_config(global: &Global, serve: &ServeArgs) -> anyhow::Result<ServerConfig> {
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
    if let Some(t) = serve.takeover {
        config.takeover = t;
    }
    if serve.no_open_enrollment {
        config.open_enrollment = false;
    }
    config.validate()?;
    Ok(config)
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {}
        other => return admin_command(&cli.global, other),
    }
    let config = load_config(&cli.global, &cli.serve)?;
    init_logging(&config.log_level);
    tokio::runtime::Runtime::new()?.block_on(serve(config))
}

fn admin_command(global: &Global, command: Command) -> anyhow::Result<()> {
    let config = load_config(global, &ServeArgs::default())?;
    let dir = &config.state_dir;
    let creds = credentials_dir();
    match command {
        Command::Init => {
            let created = admin::init(dir, creds.as_deref())?;
            let what = if created {
                "initialised"
            } else {
                "already initialised"
            };
            eprintln!("{}: {what}", dir.display());
        }
        Command::Token { id } => {
            println!("{}", *admin::token(dir, creds.as_deref(), id.as_deref())?)
        }
        Command::Identities => print!("{}", admin::identities(dir, creds.as_deref())?),
        Command::Revoke { id } => {
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
        }
        Command::Serve => unreachable!("handled by main"),
    }
    Ok(())
}

async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    let backend = backend::from_spec(&config.backend)?;
    let creds = credentials_dir();
    let (state, secrets) = server::ServerState::open(&config, creds.as_deref(), backend)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let control_listener = control::bind(&config.state_dir).context("control socket")?;
    if secrets.created && !config.open_enrollment {
        println!(
            "First start: created keys in {}.",
            config.state_dir.display()
        );
        println!("Open enrollment is off: issue one token per device with `tallyd token --id <DEVICE-ID>`.");
    } else if secrets.created {
        let token = admin::token(&config.state_dir, creds.as_deref(), None)?;
        let host = if addr.ip().is_unspecified() {
            format!("<this-host>:{}", addr.port())
        } else {
            addr.to_string()
        };
        println!(
            "First start: created keys in {}.",
            config.state_dir.display()
        );
        println!(
            "Enrollment token (secret; print it again with `tallyd token`):\n\n  {}\n",
            *token
        );
        println!(
            "Enroll a device with:\n\n  tally enroll --server {host} --id <DEVICE-ID> --token {}\n",
            *token
        );
    }
    let stop = CancellationToken::new();
    tokio::spawn(control::serve(
        control_listener,
        state.clone(),
        stop.clone(),
    ));
    let shutdown = async {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    };
    let result = server::run(listener, Arc::clone(&state), shutdown).await;
    stop.cancel();
    let _ = std::fs::remove_file(config.state_dir.join(control::SOCKET));
    Ok(result?)
}
