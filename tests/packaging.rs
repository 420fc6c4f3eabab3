//! What the Debian package ships besides the binaries (`packaging/build-deb`): the man
//! pages and shell completions the binaries generate from their own clap definitions
//! (the hidden `tallyd generate` and `tally generate`), and the default
//! /etc/tally/tallyd.toml (`packaging/tallyd.toml`). `.ci/deb-check` builds, installs
//! and checks the package itself.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use common::bin::TALLYD_SUBCOMMANDS;
use tally::config::ServerConfig;

const TALLYD: &str = env!("CARGO_BIN_EXE_tallyd");
const TALLY: &str = env!("CARGO_BIN_EXE_tally");

const TALLY_SUBCOMMANDS: &[&str] = &[
    "enroll",
    "request",
    "message",
    "bench",
    "listen",
    "conformance",
];
/// Subcommands of subcommands, with pages of their own.
const TALLY_NESTED: &[&str] = &["conformance-server", "conformance-client"];

fn output(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("TALLYD_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap()
}

/// stdout of a command that must succeed.
fn run(bin: &str, args: &[&str]) -> String {
    let out = output(bin, args);
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `BIN generate man DIR`: each page's file name and text.
fn man_pages(bin: &str) -> BTreeMap<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    run(bin, &["generate", "man", out.to_str().unwrap()]);
    std::fs::read_dir(&out)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (name, std::fs::read_to_string(e.path()).unwrap())
        })
        .collect()
}

/// How roff writes a flag or a name: every '-' escaped.
fn roff(s: &str) -> String {
    s.replace('-', "\\-")
}

/// The page documents this option (`.TP` then `\fB--flag\fR`).
fn documents(page: &str, flag: &str) -> bool {
    page.contains(&format!("\\fB{}\\fR", roff(flag)))
}

#[test]
fn tallyd_has_a_man_page_and_one_per_subcommand() {
    let pages = man_pages(TALLYD);
    let mut expected: Vec<String> = TALLYD_SUBCOMMANDS
        .iter()
        .map(|s| format!("tallyd-{s}.1"))
        .collect();
    expected.push("tallyd.1".into());
    expected.push("tallyd.toml.5".into());
    expected.sort();
    assert_eq!(pages.keys().cloned().collect::<Vec<_>>(), expected);

    let main = &pages["tallyd.1"];
    assert!(main.contains("\n.TH TALLYD 1 "), "{main}");
    assert!(main.contains("\n.SH NAME\ntallyd \\- "), "{main}");
    assert!(main.contains("\n.SH SUBCOMMANDS\n"), "{main}");
    for sub in TALLYD_SUBCOMMANDS {
        assert!(
            main.contains(&format!("\n{}(1)\n", roff(&format!("tallyd-{sub}")))),
            "tallyd.1 does not name tallyd-{sub}(1):\n{main}"
        );
    }
    for flag in [
        "--config",
        "--state-dir",
        "--credentials-dir",
        "--listen",
        "--log-level",
        "--no-open-enrollment",
        "--metrics-listen",
        "--version",
    ] {
        assert!(documents(main, flag), "tallyd.1 lacks {flag}:\n{main}");
    }

    for sub in TALLYD_SUBCOMMANDS {
        let page = &pages[&format!("tallyd-{sub}.1")];
        let title = format!("tallyd-{sub}").to_uppercase();
        assert!(page.contains(&format!("\n.TH {title} 1 ")), "{page}");
        assert!(
            page.contains(&format!(
                "\n.SH NAME\n{} \\- ",
                roff(&format!("tallyd-{sub}"))
            )),
            "{page}"
        );
        // Every command takes the state directory and the configuration file.
        assert!(documents(page, "--state-dir"), "tallyd-{sub}.1:\n{page}");
        assert!(documents(page, "--config"), "tallyd-{sub}.1:\n{page}");
        // The daemon's flags only where they apply (the admin commands refuse them).
        assert_eq!(
            documents(page, "--listen"),
            *sub == "serve",
            "tallyd-{sub}.1:\n{page}"
        );
    }
    let serve = &pages["tallyd-serve.1"];
    for flag in ["--log-format", "--takeover", "--no-open-enrollment"] {
        assert!(documents(serve, flag), "tallyd-serve.1 lacks {flag}");
    }
    let token = &pages["tallyd-token.1"];
    for flag in ["--id", "--expires", "--revoke", "--rotate-open"] {
        assert!(documents(token, flag), "tallyd-token.1 lacks {flag}");
    }
    assert!(token.contains("single\\-use token"), "{token}");
    for sub in ["identities", "tokens", "sessions", "status"] {
        assert!(documents(&pages[&format!("tallyd-{sub}.1")], "--json"));
    }
    let send = &pages["tallyd-send.1"];
    assert!(documents(send, "--request") && documents(send, "--timeout"));
    assert!(
        send.contains("<\\fIID\\fR>") && send.contains("[\\fIDATA\\fR]"),
        "{send}"
    );
}

#[test]
fn tally_has_a_man_page_and_one_per_subcommand() {
    let pages = man_pages(TALLY);
    let mut expected: Vec<String> = TALLY_SUBCOMMANDS
        .iter()
        .chain(TALLY_NESTED)
        .map(|s| format!("tally-{s}.1"))
        .collect();
    expected.push("tally.1".into());
    expected.sort();
    assert_eq!(pages.keys().cloned().collect::<Vec<_>>(), expected);

    let main = &pages["tally.1"];
    assert!(main.contains("\n.TH TALLY 1 "), "{main}");
    for sub in TALLY_SUBCOMMANDS {
        assert!(
            main.contains(&format!("\n{}(1)\n", roff(&format!("tally-{sub}")))),
            "tally.1 does not name tally-{sub}(1):\n{main}"
        );
        let page = &pages[&format!("tally-{sub}.1")];
        let title = format!("tally-{sub}").to_uppercase();
        assert!(page.contains(&format!("\n.TH {title} 1 ")), "{page}");
    }
    let enroll = &pages["tally-enroll.1"];
    for flag in ["--token-file", "--id", "--server", "--out", "--force"] {
        assert!(documents(enroll, flag), "tally-enroll.1 lacks {flag}");
    }
    // The token on the command line is hidden: other users can read it in /proc.
    assert!(!documents(enroll, "--token"), "{enroll}");
    let client = &pages["tally-conformance-client.1"];
    assert!(
        documents(client, "--exec") && documents(client, "--enroll-exec"),
        "{client}"
    );
    for sub in ["request", "message", "listen"] {
        let page = &pages[&format!("tally-{sub}.1")];
        assert!(documents(page, "--cred"), "tally-{sub}.1 lacks --cred");
        assert!(
            documents(page, "--retries"),
            "tally-{sub}.1 lacks --retries"
        );
    }
    assert!(documents(&pages["tally-listen.1"], "--exec"));
    assert!(documents(&pages["tally-bench.1"], "--connections"));
}

/// The text of section `title` of a page: from its `.SH` line to the next.
fn section<'a>(page: &'a str, title: &str) -> Option<&'a str> {
    let head = format!("\n.SH {title}\n");
    let start = page.find(&head)? + head.len();
    let end = page[start..]
        .find("\n.SH ")
        .map_or(page.len(), |i| start + i + 1);
    Some(&page[start..end])
}

/// The entry of `tag` in a section (`.TP`, the tag in bold, then its text up to the next
/// entry).
fn entry<'a>(section: &'a str, tag: &str) -> Option<&'a str> {
    let head = format!(".TP\n\\fB{}\\fR\n", roff(tag));
    let start = section.find(&head)? + head.len();
    let end = section[start..]
        .find(".TP\n")
        .map_or(section.len(), |i| start + i);
    Some(&section[start..end])
}

/// The environment variables the options of `bin` and of its subcommands read or name,
/// as their `--help` shows them: `[env: NAME=...]`, and `$NAME` in a description.
fn option_env_vars(bin: &str, subcommands: &[&str]) -> Vec<String> {
    let mut help = run(bin, &["--help"]);
    for sub in subcommands {
        help += &run(bin, &[sub, "--help"]);
    }
    let name = |rest: &str| -> String {
        rest.chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    };
    let mut vars: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .chain(help.split('$').skip(1))
        .map(name)
        .filter(|v| v.len() > 1)
        .collect();
    vars.sort();
    vars.dedup();
    vars
}

/// Issue 27, item 4: the binaries' own pages say where their files are, what in the
/// environment they read and what their exit status means; every variable an option
/// reads is among them.
#[test]
fn the_main_pages_have_files_environment_and_exit_status() {
    for (bin, subcommands, files, vars) in [
        (
            TALLYD,
            TALLYD_SUBCOMMANDS,
            &[
                "/etc/tally/tallyd.toml",
                "/var/lib/tally",
                "server.key",
                "store.key",
                "identities.db, identities.db-wal, identities.db-shm",
                "tallyd.lock",
                "tallyd.sock",
                "fleet-log",
            ][..],
            &[
                "TALLYD_CONFIG",
                "STATE_DIRECTORY",
                "CREDENTIALS_DIRECTORY",
                "RUST_LOG",
                "LISTEN_PID, LISTEN_FDS",
                "NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID",
                "PGPASSWORD, PGPASSFILE, HOME",
            ][..],
        ),
        (
            TALLY,
            TALLY_SUBCOMMANDS,
            &["tally.cred", "tally-bench-creds/"][..],
            &["TALLY_SERVER", "TALLY_TOKEN", "TALLY_ID"][..],
        ),
    ] {
        let pages = man_pages(bin);
        let name = Path::new(bin).file_name().unwrap().to_str().unwrap();
        let main = &pages[&format!("{name}.1")];
        let titles: Vec<&str> = main
            .lines()
            .filter_map(|l| l.strip_prefix(".SH "))
            .collect();
        // In the order of man-pages(7), before VERSION.
        let at = |t: &str| titles.iter().position(|x| *x == t);
        let (Some(exit), Some(env), Some(files_at), Some(version)) = (
            at("\"EXIT STATUS\""),
            at("ENVIRONMENT"),
            at("FILES"),
            at("VERSION"),
        ) else {
            panic!("{name}.1 lacks a section: {titles:?}");
        };
        assert!(
            exit < env && env < files_at && files_at < version,
            "{titles:?}"
        );
        let files_section = section(main, "FILES").unwrap();
        for f in files {
            assert!(
                entry(files_section, f).is_some(),
                "{name}.1: FILES lacks {f}:\n{files_section}"
            );
        }
        let env_section = section(main, "ENVIRONMENT").unwrap();
        for v in vars {
            assert!(
                entry(env_section, v).is_some(),
                "{name}.1: ENVIRONMENT lacks {v}:\n{env_section}"
            );
        }
        let option_vars = option_env_vars(bin, subcommands);
        assert!(!option_vars.is_empty());
        for v in option_vars {
            assert!(
                env_section.contains(&roff(&v)),
                "{name}.1: an option reads ${v}, which ENVIRONMENT does not name:\n{env_section}"
            );
        }
        let exit_section = section(main, "\"EXIT STATUS\"").unwrap();
        for status in ["0", "1", "2"] {
            assert!(
                entry(exit_section, status).is_some(),
                "{name}.1: exit status {status}"
            );
        }
        assert!(section(main, "\"SEE ALSO\"")
            .unwrap()
            .contains("tallyd.toml"));
    }
    let tallyd = &man_pages(TALLYD)["tallyd.1"];
    let signals = section(tallyd, "SIGNALS").expect("tallyd.1: SIGNALS");
    assert!(entry(signals, "SIGTERM, SIGINT").unwrap().contains("drain"));
    assert!(entry(signals, "SIGHUP").unwrap().contains("configuration"));
}

/// Issue 27, item 4: tallyd.toml(5) has every key of the configuration, each with its
/// type and default: the README's list of defaults (an independent copy) and the
/// parser's own table agree with it.
#[test]
fn the_configuration_page_lists_every_key_with_its_default() {
    let pages = man_pages(TALLYD);
    let page = &pages["tallyd.toml.5"];
    assert!(page.contains("\n.TH TALLYD.TOML 5 "), "{page}");
    assert!(page.contains("\n.SH NAME\ntallyd.toml \\- "), "{page}");
    let top = section(page, "KEYS").expect("KEYS");
    let limits = section(page, "[limits]").expect("[limits]");
    let find = |key: &str| match key.strip_prefix("limits.") {
        Some(short) => entry(limits, short),
        None => entry(top, key),
    };
    for key in tally::config_keys::KEYS {
        let text = find(key.name).unwrap_or_else(|| panic!("tallyd.toml.5 lacks {}", key.name));
        assert!(
            text.contains("Type: ") && text.contains("Default: "),
            "{}: {text}",
            key.name
        );
    }

    // The README's defaults (uncommented) and examples (commented: unset by default).
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section_start = readme
        .find("\n## Configuration\n")
        .expect("README: Configuration");
    let rest = &readme[section_start..];
    let start = rest.find("```toml\n").unwrap() + 8;
    let block = &rest[start..start + rest[start..].find("```").unwrap()];
    let (set, unset) = (keys(block, false), keys(block, true));
    assert!(set.len() > 20, "{set:?}");
    for (key, value) in &set {
        let text = find(key).unwrap_or_else(|| panic!("tallyd.toml.5 lacks {key}"));
        assert!(
            text.contains(&roff(value)),
            "tallyd.toml.5: {key}'s default is not the README's {value}:\n{text}"
        );
    }
    for key in unset.keys() {
        let text = find(key).unwrap_or_else(|| panic!("tallyd.toml.5 lacks {key}"));
        assert!(text.contains("Default: unset"), "{key}: {text}");
    }
    let mut readme_keys: Vec<&String> = set.keys().chain(unset.keys()).collect();
    readme_keys.sort();
    let mut table: Vec<String> = tally::config_keys::KEYS
        .iter()
        .map(|k| k.name.to_owned())
        .collect();
    table.sort();
    assert_eq!(readme_keys, table.iter().collect::<Vec<_>>());
    // Ranges, where the parser has one.
    let keepalive = find("limits.keepalive").unwrap();
    assert!(
        keepalive.contains("Range: 0.1 to 86400 seconds"),
        "{keepalive}"
    );
}

#[test]
fn man_pages_are_the_same_every_time() {
    // The package is reproducible: no date, no path, no order that changes.
    assert_eq!(man_pages(TALLYD), man_pages(TALLYD));
}

#[test]
fn completions_know_every_subcommand_and_flag() {
    let cases: [(&str, &[&str], &[&str]); 2] = [
        (
            TALLYD,
            TALLYD_SUBCOMMANDS,
            &[
                "--state-dir",
                "--config",
                "--listen",
                "--rotate-open",
                "--json",
            ],
        ),
        (
            TALLY,
            TALLY_SUBCOMMANDS,
            &["--token-file", "--cred", "--retries", "--exec", "--server"],
        ),
    ];
    for (bin, subcommands, flags) in cases {
        let name = Path::new(bin).file_name().unwrap().to_str().unwrap();
        for shell in ["bash", "zsh", "fish"] {
            let script = run(bin, &["generate", "completions", shell]);
            for sub in subcommands {
                assert!(
                    script.contains(sub),
                    "{shell} completion of {name} lacks {sub}"
                );
            }
            for flag in flags {
                // fish names long flags without their dashes (`-l state-dir`).
                let flag = if shell == "fish" {
                    format!("-l {}", &flag[2..])
                } else {
                    flag.to_string()
                };
                assert!(
                    script.contains(&flag),
                    "{shell} completion of {name} lacks {flag}"
                );
            }
            assert!(
                !script.contains("generate"),
                "{shell} completion of {name} offers the hidden `generate`"
            );
        }
        // Issue 27: the daemon's flags are offered to the daemon, not to the admin
        // commands (which refuse them).
        let fish = run(bin, &["generate", "completions", "fish"]);
        let daemon_flag = |l: &&str| l.contains("-l listen ") && l.contains("__fish_tallyd");
        for line in fish.lines().filter(daemon_flag) {
            assert!(
                line.contains("__fish_tallyd_needs_command")
                    || line.contains("__fish_tallyd_using_subcommand serve"),
                "{line}"
            );
        }
        let bash = run(bin, &["generate", "completions", "bash"]);
        assert!(bash.contains(&format!("complete -F _{name} ")), "{bash}");
        let zsh = run(bin, &["generate", "completions", "zsh"]);
        assert!(zsh.starts_with(&format!("#compdef {name}\n")), "{zsh}");
        let fish = run(bin, &["generate", "completions", "fish"]);
        assert!(fish.contains(&format!("complete -c {name} ")), "{fish}");
        // The bash script is valid bash.
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bash).unwrap();
        let check = Command::new("bash").arg("-n").arg(file.path()).output();
        if let Ok(check) = check {
            assert!(
                check.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
}

#[test]
fn generate_is_hidden_and_checks_its_arguments() {
    for bin in [TALLYD, TALLY] {
        let help = run(bin, &["--help"]);
        assert!(help.contains("Usage:"), "{help}");
        assert!(!help.contains("generate"), "{help}");
        for bad in [
            &["generate"][..],
            &["generate", "completions", "no-such-shell"],
            &["generate", "pdf"],
        ] {
            let out = output(bin, bad);
            assert!(!out.status.success(), "{bin} {bad:?} succeeded");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("error: ") || stderr.contains("Usage: "),
                "{bin} {bad:?}: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{bin} {bad:?} printed on stdout");
        }
    }
    // A man directory that cannot be made is an error that names it.
    let file = tempfile::NamedTempFile::new().unwrap();
    let inside = file.path().join("man1");
    let out = output(TALLYD, &["generate", "man", inside.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(inside.to_str().unwrap()),
        "the error does not name the directory: {stderr}"
    );
}

const PACKAGED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/tallyd.toml");

/// `[section.]key` -> value of each `key = value` line, commented (`#key = value`,
/// `# key = value`) or not, with a trailing `# comment` cut.
fn keys(toml: &str, commented: bool) -> BTreeMap<String, String> {
    let mut section = String::new();
    let mut keys = BTreeMap::new();
    for line in toml.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
            continue;
        }
        let line = match line.strip_prefix('#') {
            Some(rest) if commented => rest.trim_start(),
            Some(_) => continue,
            None if commented => continue,
            None => line,
        };
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        if !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        let value = match value.find(" #") {
            Some(i) => &value[..i],
            None => value,
        };
        keys.insert(format!("{section}{key}"), value.trim().to_string());
    }
    keys
}

/// The configuration as tallyd reads it, with the state directory (which depends on
/// $STATE_DIRECTORY) set aside.
fn parsed(toml: &str) -> ServerConfig {
    let mut config = ServerConfig::from_toml(toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    config.state_dir = "-".into();
    config
}

fn production_defaults() -> ServerConfig {
    ServerConfig {
        state_dir: "-".into(),
        open_enrollment: false,
        ..ServerConfig::default()
    }
}

#[test]
fn the_packaged_configuration_is_the_defaults_with_open_enrollment_off() {
    let text = std::fs::read_to_string(PACKAGED_CONFIG).unwrap();
    // As shipped: only open_enrollment is set.
    assert_eq!(
        keys(&text, false),
        BTreeMap::from([("open_enrollment".to_string(), "false".to_string())])
    );
    assert_eq!(parsed(&text), production_defaults());
    assert!(text.contains("sudo tallyd token --id ID --state-dir /var/lib/tally"));
    assert!(
        text.contains("tallyd.socket"),
        "listen under socket activation"
    );

    // Every commented key is its default: uncommenting them all changes nothing.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.split_once(" = ").is_some() && !rest.starts_with(' ') => {
                format!("{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    assert_ne!(uncommented, text);
    assert_eq!(keys(&uncommented, true), BTreeMap::new());
    // (but for metrics_listen, off by default, where the example address turns it on)
    let mut expected = production_defaults();
    expected.metrics_listen = Some("127.0.0.1:9420".parse().unwrap());
    expected.store = Some("postgres://tally@db.example/tally".into());
    expected.store_password_file = Some("/etc/tally/db-password".into());
    assert_eq!(parsed(&uncommented), expected);

    // And it has every key the README's "Configuration" lists, with the same default.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("\n## Configuration\n")
        .expect("README: Configuration")..];
    let start = section.find("```toml\n").expect("README: the defaults") + 8;
    let block = &section[start..start + section[start..].find("```").unwrap()];
    let mut documented = keys(block, false);
    documented.extend(keys(block, true));
    let mut packaged = keys(&text, true);
    packaged.extend(keys(&text, false));
    assert!(documented.len() > 20, "{documented:?}");
    documented.insert("open_enrollment".into(), "false".into());
    assert_eq!(packaged, documented);
}

const OPERATING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATING.md");

/// Issue 27, item 4: the package installs the operator's page, not the developer README,
/// and every tallyd command it shows is one tallyd takes: its subcommand exists and each
/// flag is in that subcommand's --help.
#[test]
fn the_operators_page_is_installed_and_its_commands_exist() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"["docs/OPERATING.md", "usr/share/doc/tally/README.md", "644"]"#),
        "Cargo.toml does not install docs/OPERATING.md as the package's README"
    );
    assert!(!manifest.contains(r#"["README.md", "usr/share/doc/tally/README.md""#));
    let page = std::fs::read_to_string(OPERATING).unwrap();
    assert!(page.starts_with("# Operating tallyd\n"));
    assert!(!page.contains("cargo run"), "an operator has no cargo");
    // The message root gets from a daemon run as nobody is the code's.
    let control =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/control/wire.rs"))
            .unwrap();
    let rule = "not as root, a system user or you: refusing to send it an admin command";
    assert!(control.contains(rule) && page.contains(&format!("runs as uid 65534, {rule}")));

    let mut checked = 0;
    let mut in_sh = false;
    for line in page.lines() {
        // Blocks inside list items are indented.
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh => {
                let words: Vec<&str> = l.split('#').next().unwrap().split_whitespace().collect();
                let Some(at) = words.iter().position(|w| *w == "tallyd") else {
                    continue;
                };
                let args = &words[at + 1..];
                let sub = args
                    .iter()
                    .find(|a| TALLYD_SUBCOMMANDS.contains(a))
                    .copied();
                let help = match sub {
                    Some(sub) => run(TALLYD, &[sub, "--help"]),
                    None => run(TALLYD, &["--help"]),
                };
                for flag in args.iter().filter(|a| a.starts_with("--")) {
                    assert!(
                        help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                        "docs/OPERATING.md: `{l}`: tallyd {} has no {flag}",
                        sub.unwrap_or("")
                    );
                }
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(checked >= 7, "only {checked} tallyd commands found");
}
