//! Log output: plain text on a terminal, journald-friendly text under systemd (a
//! `<N>` syslog priority prefix and no timestamp: the journal adds its own), or JSON.
//! The level filter can be changed at run time (SIGHUP reload).

use std::io::IsTerminal;

use serde::Deserialize;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable; journald style when stderr goes to the journal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Changes the level filter of the installed logger.
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Replaces the filter (`info`, `debug`, `tally=trace,warn`, ...).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        check_level(level)?;
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// An error as a command prints it: each cause once (a message that already ends with
/// its cause's text does not get it again), on one line, and never a backtrace (errors a
/// user caused are not crashes; `RUST_BACKTRACE=1` is for panics).
pub fn error_report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The levels a log filter may name.
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log filter (`log_level`, `--log-level`): a level, or comma-separated
/// `TARGET=LEVEL` directives (`info,tally::server=debug`), LEVEL one of [`LEVELS`]. A bare
/// word that is not a level is refused: `tracing` would take it for a target's name
/// (`warning`, `verbose`) and log nothing else at all.
pub fn check_level(filter: &str) -> Result<(), String> {
    let valid = || {
        format!(
            "use one of {}, or TARGET=LEVEL directives separated by commas (e.g. \"info,tally::server=debug\")",
            LEVELS.join(", ")
        )
    };
    // Targets and levels are ASCII; tracing-subscriber's directive parser (0.3.23) panics
    // on a character of several bytes before a `=` (it slices at a character count).
    if !filter.is_ascii() {
        return Err(format!("{filter:?} is not ASCII; {}", valid()));
    }
    let is_level = |l: &str| LEVELS.iter().any(|v| v.eq_ignore_ascii_case(l.trim()));
    for directive in filter.split(',') {
        let directive = directive.trim();
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            Some(_) => return Err(format!("{directive:?} names no target; {}", valid())),
            None => directive,
        };
        if !is_level(level) {
            return Err(format!("{level:?} is not a log level; {}", valid()));
        }
    }
    EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("{e}; {}", valid()))
}

/// A journald line: `<priority>target: message fields`.
struct Journald(format::Format<format::Full, ()>);

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(w, "<{priority}>")?;
        self.0.format_event(ctx, w, event)
    }
}

/// Installs the global logger writing to stderr. `RUST_LOG`, if set, overrides `level`.
pub fn init(level: &str, format: LogFormat) -> LogHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let output: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text if crate::systemd::under_journald() => tracing_subscriber::fmt::layer()
            .event_format(Journald(
                format::format()
                    .without_time()
                    .with_level(false)
                    .with_ansi(false),
            ))
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    LogHandle(handle)
}

#[cfg(test)]
mod tests {
    use super::{check_level, error_report};

    #[test]
    fn an_error_report_names_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = anyhow::Error::new(crate::wire::ReadError::Io(io)).context("cannot connect");
        assert_eq!(error_report(&e), "cannot connect: connection refused");
    }

    #[test]
    fn levels_and_directives_pass_and_words_that_are_no_level_do_not() {
        for ok in [
            "info",
            "WARN",
            "off",
            "info,tally::server=debug",
            "tally=trace, warn",
        ] {
            assert_eq!(check_level(ok), Ok(()), "{ok}");
        }
        // "é" and "Ԋ": found by the `config` fuzz target (a panic in tracing-subscriber).
        for bad in [
            "warning",
            "verbose",
            "",
            "info,",
            "=debug",
            "tally=loud",
            "tally::sérvér=debug",
            "max_frame_lennfoԊally::server=debug",
        ] {
            let e = check_level(bad).unwrap_err();
            assert!(
                e.contains("off, error, warn, info, debug, trace"),
                "{bad}: {e}"
            );
        }
    }
}
