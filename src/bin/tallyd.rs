//! `tallyd`: the Tally daemon and its admin commands.

use clap::{Args, CommandFactory, Parser, Subcommand};

use tally::cli::tallyd::{load_config, run_admin, AdminCommand, Global, ServeArgs};
use tally::daemon;
use tally::logging;

/// Tally daemon: authenticates every request and response between devices and this server.
#[derive(Parser)]
#[command(name = "tallyd", version, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default; `tallyd --listen ADDR` = `tallyd serve --listen ADDR`).
    Serve,
    #[command(flatten)]
    Admin(AdminCommand),
}

/// The command as the man pages and completions (`tallyd generate`) show it: the daemon's
/// flags are global (`tallyd serve --listen` works) but refused by the admin commands,
/// so they are shown on `tallyd` and `tallyd serve` only (not propagated: a hidden copy
/// would still be offered by the completions).
fn documented_command() -> clap::Command {
    let daemon_flags: Vec<clap::Arg> = ServeArgs::augment_args(clap::Command::new("tallyd"))
        .get_arguments()
        .map(|a| a.clone().global(false))
        .collect();
    let root = daemon_flags.iter().fold(Cli::command(), |cmd, flag| {
        cmd.mut_arg(flag.get_id().clone(), |a| a.global(false))
    });
    root.mut_subcommand("serve", |sub| sub.args(daemon_flags.iter().cloned()))
}

fn main() {
    tally::generate::intercept(documented_command);
    if let Err(e) = run(Cli::parse()) {
        eprintln!("tallyd: {}", logging::error_report(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {}
        Command::Admin(other) => {
            let given = cli.serve.given();
            if !given.is_empty() {
                anyhow::bail!(
                    "{} applies to the daemon (`tallyd serve`), not to `tallyd {}`: leave it out, or give it to the daemon (flags or its configuration file)",
                    given.join(", "),
                    other.name()
                );
            }
            return run_admin(&cli.global, other);
        }
    }
    let config = load_config(&cli.global, &cli.serve)?;
    let log = logging::init(&config.log_level, config.log_format);
    let (global, serve) = (cli.global.clone(), cli.serve.clone());
    let reload = move || load_config(&global, &serve);
    let creds = cli.global.credentials_dir.clone();
    tokio::runtime::Runtime::new()?.block_on(daemon::serve(config, creds, reload, log))
}
