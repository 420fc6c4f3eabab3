//! `tally bench` and the baseline echo server run, on a tiny workload (figures are in
//! benches/README.md; nothing here is timed).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Baseline(Child, String);

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cargo test` builds the examples next to the binaries.
fn baseline() -> Baseline {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_tally"))
        .parent()
        .unwrap()
        .join("examples/bench_echo");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(&exe)
        .arg(&addr)
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (plain `cargo test` builds it; alone, run `cargo build --examples` first)",
                exe.display()
            )
        });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "bench_echo did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Baseline(child, addr)
}

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn load_tool_runs_every_mode_against_tally_and_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (daemon, _) = common::bin::start(&state, true);
    let token = tally::admin::open_token(&state, None, false).unwrap();
    let creds = dir.path().join("creds");
    let base = baseline();
    let common = [
        "--server",
        &daemon.addr,
        "--token",
        &token,
        "--cred-dir",
        creds.to_str().unwrap(),
        "-c",
        "2",
        "--rounds",
        "1",
    ];

    let t = bench(
        &[
            &common[..],
            &["--baseline", &base.1, "--duration", "0.3", "--depth", "2"],
        ]
        .concat(),
    );
    assert!(t["tally"]["per_sec"].as_f64().unwrap() > 0.0, "{t}");
    assert!(t["baseline"]["per_sec"].as_f64().unwrap() > 0.0, "{t}");
    assert!(t["tally_over_baseline"].as_f64().unwrap() > 0.0, "{t}");
    assert!(t["tally"]["p99_us"].as_f64().unwrap() >= t["tally"]["p50_us"].as_f64().unwrap());
    assert_eq!(
        std::fs::read_dir(&creds).unwrap().count(),
        2,
        "identities enrolled once and kept"
    );

    let r = bench(
        &[
            &common[..],
            &[
                "--mode",
                "reconnect",
                "--baseline",
                &base.1,
                "--duration",
                "0.3",
            ],
        ]
        .concat(),
    );
    assert!(
        r["tally"]["rounds"][0]["count"].as_u64().unwrap() > 0,
        "{r}"
    );

    let pid = daemon.child.id().to_string();
    let i = bench(
        &[
            &common[..],
            &["--mode", "idle", "--duration", "0.1", "--daemon-pid", &pid],
        ]
        .concat(),
    );
    assert!(i["tally"]["rss_per_session"].is_number(), "{i}");
}

/// `tally bench --mode flood` runs each attack and reports the devices' fate (issue 11;
/// the figures at scale are in benches/README.md). Small: 40 attackers, 2 devices.
#[test]
fn flood_mode_runs_every_attack_and_reports_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (daemon, _) = common::bin::start(&state, true);
    let token = tally::admin::open_token(&state, None, false).unwrap();
    let creds = dir.path().join("creds");
    let pid = daemon.child.id().to_string();
    for attack in [
        "idle",
        "slowloris",
        "garbage",
        "hello-unknown",
        "enroll-replay",
        "enroll-flood",
    ] {
        let f = bench(&[
            "--mode",
            "flood",
            "--attack",
            attack,
            "--attackers",
            "40",
            "--sources",
            "4",
            "-c",
            "2",
            "--duration",
            "0.3",
            "--server",
            &daemon.addr,
            "--token",
            &token,
            "--cred-dir",
            creds.to_str().unwrap(),
            "--daemon-pid",
            &pid,
        ]);
        assert_eq!(f["attack"], attack, "{f}");
        assert!(
            f["attack_conns_per_sec"].as_f64().unwrap() > 0.0,
            "{attack}: {f}"
        );
        for phase in ["calm", "flood"] {
            let d = &f[phase];
            assert!(d["attempts"].as_u64().unwrap() > 0, "{attack}: {f}");
            // 40 attackers do not reach any limit that could turn a device away.
            assert_eq!(d["success_pct"].as_f64().unwrap(), 100.0, "{attack}: {f}");
        }
        assert!(f["recovery_ms"].is_u64(), "{attack}: {f}");
    }
}
