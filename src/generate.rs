//! `tallyd generate ...` and `tally generate ...`: man pages and shell completions made
//! from a binary's own clap `Command`, so that they cannot drift from `--help`.
//!
//! Hidden: the word is taken before the binary parses its command line, so it is in
//! neither `--help`, nor the man pages, nor the completions. `packaging/build-deb` runs
//! it for the Debian package.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser};

mod manual;

/// What to generate.
#[derive(Parser)]
enum Generate {
    /// Write BIN.1, and BIN-SUBCOMMAND.1 for each subcommand, into DIR.
    Man {
        /// Where to write the pages (created if missing).
        dir: PathBuf,
    },
    /// Print the completion script for SHELL on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// When the command line is `BIN generate ...`, writes what it asks for (made from
/// `command()`, the binary's own clap `Command`) and exits; otherwise returns at once.
pub fn intercept(command: impl FnOnce() -> clap::Command) {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_none_or(|a| a != "generate") {
        return;
    }
    let cmd = command();
    let bin = cmd.get_name().to_string();
    let parser = Generate::command()
        .name("generate")
        .bin_name(format!("{bin} generate"))
        .about(format!("Man pages and shell completions for {bin}"));
    let matches = parser.get_matches_from(&args);
    let what = Generate::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run(cmd, what) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{bin} generate: {e}");
            std::process::exit(1);
        }
    }
}

fn run(mut cmd: clap::Command, what: Generate) -> std::io::Result<()> {
    match what {
        Generate::Man { dir } => man_pages(cmd, &dir),
        Generate::Completions { shell } => {
            let bin = cmd.get_name().to_string();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, bin, &mut out);
            std::io::stdout().lock().write_all(&out)
        }
    }
}

/// BIN.1 and one page per visible subcommand (BIN-SUB.1, and so on down) in `dir`; the
/// binary's own page gets the sections of [`manual`] (FILES, ENVIRONMENT, EXIT STATUS),
/// and its other pages are written beside (for `tallyd`: tallyd.toml.5).
fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    fn write(cmd: &clap::Command, source: &str, dir: &Path, top: bool) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub, source, dir, false)?;
        }
        let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
        let man = clap_mangen::Man::new(cmd.clone())
            .title(name.to_uppercase())
            .source(source);
        let mut page = Vec::new();
        man.render(&mut page)?;
        let mut page = String::from_utf8(page).expect("roff is UTF-8");
        if top {
            page = with_sections(&page, &manual::sections(cmd.get_name()));
        }
        std::fs::write(dir.join(man.get_filename()), page)
    }
    // Every page documents --help: clap's `help` subcommand gets none of its own.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    std::fs::create_dir_all(dir)
        .and_then(|()| write(&cmd, &source, dir, true))
        .and_then(|()| {
            for (file, text) in manual::pages(cmd.get_name(), &source) {
                std::fs::write(dir.join(file), text)?;
            }
            Ok(())
        })
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

/// `page` (roff, as clap_mangen renders it) with `sections` (roff) before its VERSION
/// section, the conventional place (man-pages(7)), or at its end if it has none.
fn with_sections(page: &str, sections: &str) -> String {
    match page.find("\n.SH VERSION\n") {
        Some(at) => format!("{}\n{sections}{}", &page[..at], &page[at + 1..]),
        None => format!("{page}{sections}"),
    }
}
