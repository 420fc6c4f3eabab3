//! What the man pages say beyond the clap definitions: FILES, ENVIRONMENT, SIGNALS,
//! EXIT STATUS and SEE ALSO of tallyd(1) and tally(1), and the whole of tallyd.toml(5),
//! made from [`crate::config_keys::KEYS`] (the table the configuration's tests hold to
//! its parser).

use roff::{bold, italic, roman, Inline, Roff};

use crate::config_keys::{Applies, Key, Type, KEYS};

/// A `.TP` entry: `tag` in bold, then its paragraphs.
fn entry(r: &mut Roff, tag: &str, paragraphs: &[&str]) {
    r.control("TP", []);
    r.text([bold(tag)]);
    for (i, p) in paragraphs.iter().enumerate() {
        if i > 0 {
            r.control("br", []);
        }
        r.text([roman(*p)]);
    }
}

fn section(r: &mut Roff, title: &str) {
    r.control("SH", [title]);
}

/// `name(section)` references, comma-separated.
fn see_also(r: &mut Roff, pages: &[(&str, &str)]) {
    section(r, "SEE ALSO");
    let mut line: Vec<Inline> = Vec::new();
    for (i, (name, sec)) in pages.iter().enumerate() {
        if i > 0 {
            line.push(roman(", "));
        }
        line.push(bold(*name));
        line.push(roman(format!("({sec})")));
    }
    r.text(line);
}

/// The sections added to BIN.1, as roff (no preamble: they go inside the page).
pub fn sections(bin: &str) -> String {
    let mut r = Roff::new();
    match bin {
        "tallyd" => tallyd(&mut r),
        "tally" => tally(&mut r),
        _ => return String::new(),
    }
    // Rendered as a page is (apostrophes typeset as such), without the preamble that
    // defines the apostrophe for it: the page they go into has it already.
    let preamble = Roff::new().render();
    let text = r.render();
    text.strip_prefix(&preamble).unwrap_or(&text).to_owned()
}

fn tallyd(r: &mut Roff) {
    section(r, "SIGNALS");
    entry(
        r,
        "SIGTERM, SIGINT",
        &["Stop accepting connections, let the requests in flight finish (up to limits.drain_timeout), close every session with CLOSE SHUTDOWN, and exit 0."],
    );
    entry(
        r,
        "SIGHUP",
        &["Re-read the configuration file (and apply the command line over it): log_level and every limits.* key take effect for new connections and sessions; a change to another key is logged as needing a restart. A file that does not parse is not applied: the daemon keeps running on the previous configuration and says so (log, and systemd's STATUS=)."],
    );

    section(r, "EXIT STATUS");
    entry(
        r,
        "0",
        &["Success; for the daemon, a stop by SIGTERM or SIGINT once its sessions drained."],
    );
    entry(
        r,
        "1",
        &["An error, printed on standard error as \"tallyd: ...\": a configuration refused, a state directory or key that cannot be used, an address in use, an admin command refused by the daemon or the store, tallyd send --request answered with another status than OK."],
    );
    entry(
        r,
        "2",
        &["A command line that cannot be parsed (the usage is printed)."],
    );
    section(r, "ENVIRONMENT");
    entry(
        r,
        "TALLYD_CONFIG",
        &["The configuration file, as --config."],
    );
    entry(
        r,
        "TALLYD_LISTEN",
        &["The address to listen on when neither --listen nor listen in the configuration file gives one (containers; two daemons side by side). A value that is not an address is refused."],
    );
    entry(
        r,
        "STATE_DIRECTORY",
        &["The default state directory (systemd's StateDirectory= sets it; the first of a colon-separated list). --state-dir and state_dir take precedence."],
    );
    entry(
        r,
        "CREDENTIALS_DIRECTORY",
        &["Where server.key, store.key and db-password are looked for first (systemd's LoadCredential= sets it), as --credentials-dir."],
    );
    entry(
        r,
        "RUST_LOG",
        &["A log filter that overrides log_level and --log-level."],
    );
    entry(
        r,
        "LISTEN_PID, LISTEN_FDS",
        &["Socket activation: when systemd passes one listening TCP socket (file descriptor 3), tallyd serves it and ignores listen."],
    );
    entry(
        r,
        "NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID",
        &["systemd's notification socket and watchdog (Type=notify, WatchdogSec=): tallyd reports READY, RELOADING, STOPPING, its STATUS and the watchdog's pings."],
    );
    entry(
        r,
        "PGPASSWORD, PGPASSFILE, HOME",
        &["For a fleet's PostgreSQL store without a password elsewhere (the URL, the credential db-password, store_password_file): the password, else libpq's password file ($PGPASSFILE, else ~/.pgpass)."],
    );

    section(r, "FILES");
    entry(
        r,
        "/etc/tally/tallyd.toml",
        &["The configuration file the packaged tallyd.service passes with --config: root:tally, mode 0640 (it may hold the fleet database's password). Its keys, their defaults and ranges: tallyd.toml(5). Re-read on SIGHUP."],
    );
    entry(
        r,
        "/var/lib/tally",
        &["The state directory under the packaged unit (StateDirectory=tally, passed as $STATE_DIRECTORY). Without systemd it is --state-dir, else state_dir of the configuration, else ./tally-state. Owned by the daemon's user, mode 0700 (made so when tallyd creates it; refused if other users may write to it). It holds the files below."],
    );
    entry(
        r,
        "server.key",
        &["The server's static X25519 secret: 64 hexadecimal digits, mode 0600, made on first start. Every enrollment token and credential carries its public half: without this file no enrolled device can connect again."],
    );
    entry(
        r,
        "store.key",
        &["The key that seals the identity keys, the tokens and the open enrollment key in the store (mode 0600). Without it the store cannot be read. Back it up, but never beside a copy of the store."],
    );
    entry(
        r,
        "identities.db, identities.db-wal, identities.db-shm",
        &["The SQLite store of identities and tokens (when store is unset), in write-ahead-log mode."],
    );
    entry(
        r,
        "tallyd.lock",
        &["Locked (flock) while a daemon runs on the directory: a second daemon, or tallyd init, is refused."],
    );
    entry(
        r,
        "tallyd.sock",
        &["The control socket (mode 0600) through which the admin commands reach the running daemon. It answers root and the daemon's own user only."],
    );
    entry(
        r,
        "fleet-log",
        &["On a node of a fleet (store = \"postgres://...\"): how many entries of the fleet's log of revocations and settings this node has verified. A database restored to an older state is refused until an operator decides (docs/CLUSTER.md)."],
    );
    entry(
        r,
        "$CREDENTIALS_DIRECTORY/server.key, store.key, db-password",
        &["systemd credentials (LoadCredential=): the keys, used instead of the state directory's when present, and the fleet database's password."],
    );
    entry(
        r,
        "/usr/lib/systemd/system/tallyd.service, tallyd.socket",
        &["The packaged units: tallyd.socket (enabled by the package, 127.0.0.1:7420) starts tallyd.service on the first connection."],
    );
    entry(
        r,
        "/usr/share/doc/tally/README.md",
        &["The operator's guide: running with and without systemd, backups, key rotation, upgrades, fleets."],
    );

    see_also(
        r,
        &[("tally", "1"), ("tallyd.toml", "5"), ("systemd.exec", "5")],
    );
}

fn tally(r: &mut Roff) {
    section(r, "EXIT STATUS");
    entry(r, "0", &["Success."]);
    entry(
        r,
        "1",
        &["An error, printed on standard error as \"tally: ...\": the server refused the enrollment or the handshake, could not be reached, answered a REQUEST with another status than OK (tally request), a conformance rule failed (tally conformance), or the session of tally listen ended for good (the identity was revoked or removed, or the session ended with --no-reconnect)."],
    );
    entry(
        r,
        "2",
        &["A command line that cannot be parsed (the usage is printed)."],
    );
    section(r, "ENVIRONMENT");
    entry(
        r,
        "TALLY_SERVER",
        &["The server address of tally enroll and tally bench (--server), host:port."],
    );
    entry(
        r,
        "TALLY_AUTHENTICATE_ONLY",
        &["Set to true: the session runs in the authenticated mode, payloads in the clear (--authenticate-only of tally request, message, listen). By default it is encrypted. tally never switches mode on its own when a server refuses one."],
    );
    entry(
        r,
        "TALLY_TOKEN",
        &["The enrollment token, when no --token-file is given (tally enroll, tally bench, tally conformance server): safer than the command line, which other local users can read."],
    );
    entry(
        r,
        "XDG_RUNTIME_DIR, TMPDIR",
        &["Where tally listen puts the socket it shares its session through: $XDG_RUNTIME_DIR/tally when XDG_RUNTIME_DIR is an absolute path, else tally-UID in $TMPDIR (/tmp)."],
    );
    entry(
        r,
        "TALLY_ID",
        &["Set by tally listen --exec for each handler: the identity the request was sent to."],
    );

    section(r, "FILES");
    entry(
        r,
        "tally.cred",
        &["The device's credential (its identity, its key and the server's address and public key), written by tally enroll (--out) and read by tally request, message and listen (--cred); in the working directory by default. Mode 0600: a credential that other users may read or write is refused, as ssh refuses such a private key."],
    );
    entry(
        r,
        "$XDG_RUNTIME_DIR/tally/ (else $TMPDIR/tally-UID/)",
        &["The Unix sockets (mode 0600, in a directory of mode 0700) through which a running tally listen shares its session with tally request and tally message of the same identity, instead of their taking it over; removed when it exits."],
    );
    entry(
        r,
        "tally-bench-creds/",
        &["The credentials tally bench enrolls and reuses (--cred-dir)."],
    );

    see_also(r, &[("tallyd", "1"), ("tallyd.toml", "5")]);
}

/// Pages of their own besides the clap ones: (file name, roff).
pub fn pages(bin: &str, source: &str) -> Vec<(String, String)> {
    match bin {
        "tallyd" => vec![("tallyd.toml.5".to_owned(), tallyd_toml(source))],
        _ => Vec::new(),
    }
}

/// One key's entry: type, default, range, meaning, when it applies, an example.
fn key_entry(r: &mut Roff, key: &Key) {
    let (_, short) = key.split();
    r.control("TP", []);
    r.text([bold(short)]);
    let mut facts = vec![roman(format!("Type: {}", key.ty.describe()))];
    let default = match (key.default, key.default_env) {
        (Some(v), Some(var)) => format!("${var} if set, else {v}"),
        (Some(v), None) => v.to_owned(),
        (None, _) => "unset".to_owned(),
    };
    facts.push(roman(format!(". Default: {default}")));
    if let Some((min, max)) = key.range {
        let unit = if key.ty == Type::Seconds {
            " seconds"
        } else {
            ""
        };
        facts.push(roman(format!(". Range: {min} to {max}{unit}")));
    }
    facts.push(roman("."));
    r.text(facts);
    r.control("br", []);
    r.text([roman(key.meaning)]);
    r.control("br", []);
    let applies = match key.applies {
        Applies::Reload => "Applies on SIGHUP.",
        Applies::Restart => "Applies at the next start.",
    };
    r.text([roman(applies)]);
    r.control("br", []);
    r.text([
        roman("Example: "),
        italic(format!("{short} = {}", key.example)),
    ]);
}

/// tallyd.toml(5): every key of [`KEYS`].
fn tallyd_toml(source: &str) -> String {
    let mut r = Roff::new();
    r.control("TH", ["TALLYD.TOML", "5", "", source]);
    section(&mut r, "NAME");
    r.text([roman("tallyd.toml - configuration file of tallyd")]);
    section(&mut r, "SYNOPSIS");
    r.text([bold("/etc/tally/tallyd.toml")]);
    r.control("br", []);
    r.text([bold("tallyd --config "), italic("FILE")]);
    section(&mut r, "DESCRIPTION");
    r.text([roman(
        "The configuration of tallyd, in TOML. Every key is optional and has a default; a key that tallyd does not know, a value of the wrong type or out of its range is refused at start (and on SIGHUP, which then keeps the running configuration), with the key's name. The command line flags (--listen, --state-dir, --log-level, --log-format, --takeover, --encryption, --no-open-enrollment, --metrics-listen) override the file.",
    )]);
    r.control("PP", []);
    r.text([roman(
        "The file may hold the password of a fleet's database (in store): tallyd refuses to read such a file if every user may read it. The packaged /etc/tally/tallyd.toml is root:tally, mode 0640, and sets only open_enrollment = false.",
    )]);
    section(&mut r, "KEYS");
    for key in KEYS.iter().filter(|k| k.split().0.is_none()) {
        key_entry(&mut r, key);
    }
    section(&mut r, "[limits]");
    r.text([roman(
        "Limits on everything a peer can make the daemon hold, under a [limits] table. They apply on SIGHUP, to new connections and sessions (the sessions already open keep theirs); max_connections, then max_delayed_refusals, are clamped to what the open-file limit leaves, with a warning.",
    )]);
    for key in KEYS.iter().filter(|k| k.split().0 == Some("limits")) {
        key_entry(&mut r, key);
    }
    section(&mut r, "EXAMPLE");
    r.control("nf", []);
    for line in [
        "# A node of a fleet, listening on every interface.",
        "listen = \"0.0.0.0:7420\"",
        "open_enrollment = false",
        "store = \"postgres://tally@db.example/tally?sslmode=verify-full&sslrootcert=/etc/tally/db-ca.pem\"",
        "store_password_file = \"/etc/tally/db-password\"",
        "metrics_listen = \"127.0.0.1:9420\"",
        "",
        "[limits]",
        "max_connections = 50000",
        "keepalive = 60.0",
    ] {
        r.text([roman(line)]);
    }
    r.control("fi", []);
    section(&mut r, "FILES");
    entry(
        &mut r,
        "/etc/tally/tallyd.toml",
        &["The packaged configuration, passed by tallyd.service with --config."],
    );
    see_also(&mut r, &[("tallyd", "1"), ("tally", "1")]);
    r.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_go_before_version() {
        let page = ".TH X 1\n.SH NAME\nx\n.SH VERSION\nv1\n";
        assert_eq!(
            super::super::with_sections(page, ".SH FILES\nf\n"),
            ".TH X 1\n.SH NAME\nx\n.SH FILES\nf\n.SH VERSION\nv1\n"
        );
        assert_eq!(
            super::super::with_sections(".TH X 1\n", ".SH FILES\n"),
            ".TH X 1\n.SH FILES\n"
        );
    }

    #[test]
    fn the_configuration_page_names_every_key() {
        let page = tallyd_toml("tallyd 0");
        for key in KEYS {
            let (_, short) = key.split();
            assert!(
                page.contains(&format!("\n.TP\n\\fB{}\\fR\n", short.replace('-', "\\-"))),
                "{}",
                key.name
            );
        }
    }
}
