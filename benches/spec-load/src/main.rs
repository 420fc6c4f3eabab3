//! spec-load: an independent client of the Tally protocol, written from spec/ alone
//! (PROTOCOL.md and the vectors), used as a second load generator.

mod cred;
mod crypto;
mod enroll;
mod handshake;
mod load;
mod net;
mod session;
mod vectors;
mod wire;

use std::path::{Path, PathBuf};

use cred::{Credential, Token};
use handshake::Mode;
use load::fatal;

const USAGE: &str = "\
spec-load: an independent Tally client (written from spec/ alone) and load generator

USAGE:
  spec-load vectors DIR
      Recompute spec/vectors (enrollment, both session modes, client- and
      session-side negative cases); exit 1 on any mismatch.
  spec-load run --server HOST:PORT --credential FILE|DIR [--credential ...]
                [--mode authenticated|encrypted] --conns N --depth D --size BYTES
                --seconds S [--max-frame-len L]
      N sessions (one identity each), D requests in flight on each, for S seconds
      after all are up. Prints one JSON line.
  spec-load reconnect --server HOST:PORT --credential FILE|DIR [...] [--mode ...]
                --workers W --seconds S
      W workers, each looping: connect, handshake, one 64-byte request, close.
  spec-load plain --server HOST:PORT --conns N [--depth D] --size BYTES --seconds S
      The same load as `run` against a plain echo (`u32 length | u64 id | payload`,
      the project's examples/bench_plain.rs): the benchmark's limit.
  spec-load enroll --server HOST:PORT --token-file FILE --out DIR
                (--id ID | --prefix P --count N [--first K])
      Enroll identities (spec 6) and write one credential file (9.2) per id,
      DIR/ID.cred, mode 0600.

--server defaults to the first credential's `server`. --mode defaults to encrypted
(spec 7.8). A --credential directory contributes every regular file in it, by name.
--sources N (run, reconnect) binds connection i to 127.0.0.(1 + i mod N), for a server
on 127.x whose per-source limits would otherwise refuse the load.
--server-pid PID[,PID...] (run, reconnect, plain) adds the server's CPU time (user +
system, /proc/PID/stat) per request or reconnect over the measured window.
--key-update-frames N (run) sends KEY_UPDATE every N frames, in either mode (8.7: MAY;
the default is the encrypted mode's 2^20 frames or 10 minutes).
";

struct Args {
    pos: Vec<String>,
    flags: Vec<(String, String)>,
}

impl Args {
    fn parse(raw: Vec<String>) -> Args {
        let mut pos = Vec::new();
        let mut flags = Vec::new();
        let mut it = raw.into_iter();
        while let Some(a) = it.next() {
            if a == "-h" || a == "--help" {
                print!("{USAGE}");
                std::process::exit(0);
            } else if let Some(name) = a.strip_prefix("--") {
                let (n, v) = match name.split_once('=') {
                    Some((n, v)) => (n.to_string(), v.to_string()),
                    None => (
                        name.to_string(),
                        it.next().unwrap_or_else(|| fatal("usage", format!("--{name} needs a value"))),
                    ),
                };
                flags.push((n, v));
            } else {
                pos.push(a);
            }
        }
        Args { pos, flags }
    }
    fn all(&self, n: &str) -> Vec<&str> {
        self.flags.iter().filter(|(k, _)| k == n).map(|(_, v)| v.as_str()).collect()
    }
    fn get(&self, n: &str) -> Option<&str> {
        self.all(n).last().copied()
    }
    fn need(&self, n: &str) -> &str {
        self.get(n).unwrap_or_else(|| fatal("usage", format!("--{n} is required (see --help)")))
    }
    fn num<T: std::str::FromStr>(&self, n: &str, default: Option<T>) -> T {
        match self.get(n) {
            Some(v) => v.parse().unwrap_or_else(|_| fatal("usage", format!("--{n}: not a number: {v}"))),
            None => default.unwrap_or_else(|| fatal("usage", format!("--{n} is required (see --help)"))),
        }
    }
    fn check(&self, allowed: &[&str]) {
        for (k, _) in &self.flags {
            if !allowed.contains(&k.as_str()) {
                fatal("usage", format!("unknown option --{k} (see --help)"));
            }
        }
    }
}

fn credentials(a: &Args) -> Vec<Credential> {
    let mut out = Vec::new();
    for c in a.all("credential") {
        let p = Path::new(c);
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .unwrap_or_else(|e| fatal(c, e))
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for f in files {
                out.push(Credential::load(&f).unwrap_or_else(|e| fatal("credential", e)));
            }
        } else {
            out.push(Credential::load(p).unwrap_or_else(|e| fatal("credential", e)));
        }
    }
    if out.is_empty() {
        fatal("usage", "--credential FILE|DIR is required");
    }
    out
}

fn load_opts(a: &Args, count_flag: &str, size: usize) -> load::Opts {
    let creds = credentials(a);
    let server = a.get("server").map(str::to_string).unwrap_or_else(|| creds[0].server.clone());
    let addr = net::resolve(&server).unwrap_or_else(|e| fatal("--server", e));
    let mode = match a.get("mode").unwrap_or("encrypted") {
        "encrypted" => Mode::Encrypted,
        "authenticated" => Mode::Authenticated,
        m => fatal("usage", format!("--mode {m}: authenticated or encrypted")),
    };
    let conns: usize = a.num(count_flag, None);
    let seconds: f64 = a.num("seconds", None);
    if conns == 0 || !(seconds > 0.0) {
        fatal("usage", format!("--{count_flag} and --seconds must be positive"));
    }
    // Our announced limit must take an echo of the payload (RESPONSE: 51 + p at most).
    let want = (65_536usize).max(51 + size).min(wire::MAX_FRAME_LIMIT as usize) as u32;
    let limit: u32 = a.num("max-frame-len", Some(want));
    if !(wire::MIN_FRAME_LIMIT..=wire::MAX_FRAME_LIMIT).contains(&limit) {
        fatal("usage", "--max-frame-len must be 256 to 16777216 (4.3)");
    }
    let sources: usize = a.num("sources", Some(0));
    if sources > 0 {
        if sources > 254 || !matches!(addr.ip(), std::net::IpAddr::V4(v) if v.is_loopback()) {
            fatal("usage", "--sources N (1 to 254) spreads connections over 127.0.0.1..N: the server must be on 127.x");
        }
    }
    let key_update_frames: u64 = a.num("key-update-frames", Some(0));
    if key_update_frames > 1 << 20 {
        fatal("usage", "--key-update-frames: at most 1048576 (spec 8.7)");
    }
    let server_pids = server_pids(a);
    load::Opts { addr, creds, mode, limit, seconds, conns, depth: 1, size, sources, key_update_frames, server_pids }
}

/// `--server-pid PID[,PID...]`.
fn server_pids(a: &Args) -> Vec<u32> {
    a.get("server-pid").map_or(Vec::new(), |v| {
        v.split(',').map(|p| p.trim().parse().unwrap_or_else(|e| fatal("--server-pid", e))).collect()
    })
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let a = Args::parse(raw);
    match a.pos.first().map(String::as_str) {
        Some("vectors") => {
            a.check(&[]);
            let dir = a.pos.get(1).map(String::as_str).unwrap_or("spec/vectors");
            match vectors::run(Path::new(dir)) {
                Ok(true) => {}
                Ok(false) => std::process::exit(1),
                Err(e) => fatal("vectors", e),
            }
        }
        Some("run") => {
            a.check(&[
                "server", "credential", "mode", "conns", "depth", "size", "seconds", "max-frame-len", "sources",
                "key-update-frames", "server-pid",
            ]);
            let size: usize = a.num("size", None);
            let mut o = load_opts(&a, "conns", size);
            o.depth = a.num("depth", None);
            if o.depth == 0 {
                fatal("usage", "--depth must be at least 1");
            }
            load::run(o);
        }
        Some("reconnect") => {
            a.check(&["server", "credential", "mode", "workers", "seconds", "max-frame-len", "sources", "server-pid"]);
            let o = load_opts(&a, "workers", 64);
            load::reconnect(o);
        }
        Some("plain") => {
            a.check(&["server", "conns", "depth", "size", "seconds", "sources", "server-pid"]);
            let addr = net::resolve(a.need("server")).unwrap_or_else(|e| fatal("--server", e));
            let o = load::Opts {
                addr,
                creds: Vec::new(),
                mode: Mode::Authenticated,
                limit: wire::MIN_FRAME_LIMIT,
                seconds: a.num("seconds", None),
                conns: a.num("conns", None),
                depth: a.num("depth", Some(1)),
                size: a.num("size", None),
                sources: a.num("sources", Some(0)),
                key_update_frames: 0,
                server_pids: server_pids(&a),
            };
            if o.conns == 0 || o.depth == 0 || !(o.seconds > 0.0) {
                fatal("usage", "--conns, --depth and --seconds must be positive");
            }
            load::plain(o);
        }
        Some("enroll") => {
            a.check(&["server", "token-file", "out", "id", "prefix", "count", "first"]);
            let server = a.need("server");
            let addr = net::resolve(server).unwrap_or_else(|e| fatal("--server", e));
            let tf = a.need("token-file");
            let text = std::fs::read_to_string(tf).unwrap_or_else(|e| fatal(tf, e));
            let token = Token::parse(&text).unwrap_or_else(|e| fatal(tf, e));
            let out = PathBuf::from(a.need("out"));
            std::fs::create_dir_all(&out).unwrap_or_else(|e| fatal("--out", e));
            let ids: Vec<String> = match (a.get("id"), a.get("prefix")) {
                (Some(id), None) => vec![id.to_string()],
                (None, Some(p)) => {
                    let n: usize = a.num("count", None);
                    let first: usize = a.num("first", Some(0));
                    (first..first + n).map(|i| format!("{p}{i}")).collect()
                }
                _ => fatal("usage", "give --id ID or --prefix P --count N"),
            };
            for id in &ids {
                if !wire::valid_id(id.as_bytes()) {
                    fatal("usage", format!("id {id:?} breaks spec 4.1"));
                }
            }
            for id in &ids {
                let path = out.join(format!("{id}.cred"));
                if path.exists() {
                    fatal("enroll", format!("{} exists", path.display()));
                }
                let c = net::enroll(&addr, server, &token, id).unwrap_or_else(|e| fatal("enroll", e));
                c.save(&path).unwrap_or_else(|e| fatal("enroll", e));
            }
            eprintln!(
                "spec-load: enrolled {} identit{} ({} mode) into {}",
                ids.len(),
                if ids.len() == 1 { "y" } else { "ies" },
                enroll::mode_name(token.mode),
                out.display()
            );
        }
        _ => {
            eprint!("{USAGE}");
            std::process::exit(2);
        }
    }
}
