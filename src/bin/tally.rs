//! `tally`: the Tally client. Enroll a device, send requests and messages, listen. The
//! command line is parsed here; each subcommand is a function of `tally::cli`.

use clap::{CommandFactory, Parser, Subcommand};

use tally::cli;

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
    Enroll(cli::EnrollArgs),
    /// Send one REQUEST (DATA, or stdin if DATA is absent) and write the response payload to stdout.
    ///
    /// If a `tally listen` of the same identity runs (this user's, same server and key),
    /// the request goes through its session instead of taking it over; otherwise it
    /// makes a session of its own.
    Request(cli::RequestArgs),
    /// Send one one-way MESSAGE (DATA, or stdin if DATA is absent).
    ///
    /// Through the session of a running `tally listen` of the same identity, as `tally
    /// request`.
    Message(cli::MessageArgs),
    /// Load-test a running tallyd (echo backend), side by side with a baseline echo server.
    Bench(cli::bench::BenchArgs),
    /// Check an implementation against the rules of spec/PROTOCOL.md that the other end
    /// can observe: one line per rule, with its section; exit 1 if any failed.
    #[command(subcommand)]
    Conformance(cli::conformance::Conformance),
    /// Keep a session open, print what the server sends (one line each) and answer its requests.
    Listen(cli::listen::ListenArgs),
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll(a) => cli::enroll(a).await,
        Command::Request(a) => cli::request(a).await,
        Command::Message(a) => cli::message(a).await,
        Command::Bench(a) => cli::bench::run(a).await,
        Command::Conformance(what) => {
            if !tokio::task::spawn_blocking(move || cli::conformance::run(what)).await?? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Listen(a) => cli::listen::run(a).await,
    }
}
