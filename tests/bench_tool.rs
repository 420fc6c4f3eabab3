//! `tally bench` and the echo servers it compares against run, on a tiny workload
//! (figures are in benches/README.md; nothing here is timed).

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

/// `cargo test` builds the examples next to the binaries: `bench_plain` (the limit) or
/// `bench_echo` (the structural twin).
fn baseline(example: &str) -> Baseline {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_tally"))
        .parent()
        .unwrap()
        .join("examples")
        .join(example);
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
        assert!(Instant::now() < deadline, "{example} did not start");
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
    let token = tally::admin::open_token(&state, None, false).unwrap().token;
    let creds = dir.path().join("creds");
    let plain = baseline("bench_plain");
    let twin = baseline("bench_echo");
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
            &[
                "--plain",
                &plain.1,
                "--twin",
                &twin.1,
                "--duration",
                "0.3",
                "--depth",
                "2",
            ],
        ]
        .concat(),
    );
    let target = |v: &serde_json::Value, name: &str| -> serde_json::Value {
        v["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == name)
            .unwrap_or_else(|| panic!("no {name} in {v}"))
            .clone()
    };
    let (p, ours, tw) = (target(&t, "plain"), target(&t, "tally"), target(&t, "twin"));
    for x in [&p, &ours, &tw] {
        assert!(x["per_sec"].as_f64().unwrap() > 0.0, "{t}");
        assert!(x["p99_us"].as_f64().unwrap() >= x["p50_us"].as_f64().unwrap());
        // Every server runs here: its pid is found from its port, and its CPU counted
        // (it may round to zero on a 0.3 s run, but it is measured).
        assert_eq!(x["pids"].as_array().unwrap().len(), 1, "{t}");
        assert!(x["server_cpu_us"].as_f64().unwrap() >= 0.0, "{t}");
    }
    assert_eq!(
        ours["pids"][0].as_u64().unwrap(),
        daemon.child.id() as u64,
        "the daemon found by its port"
    );
    assert_eq!(p["rate_over_plain"].as_f64(), Some(1.0), "{t}");
    assert!(ours["rate_over_plain"].as_f64().unwrap() > 0.0, "{t}");
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
                "--plain",
                &plain.1,
                "--duration",
                "0.3",
            ],
        ]
        .concat(),
    );
    for name in ["plain", "tally"] {
        assert!(
            target(&r, name)["rounds"][0]["count"].as_u64().unwrap() > 0,
            "{r}"
        );
    }

    let pid = daemon.child.id().to_string();
    let i = bench(
        &[
            &common[..],
            &["--mode", "idle", "--duration", "0.1", "--daemon-pid", &pid],
        ]
        .concat(),
    );
    assert!(target(&i, "tally")["rss_per_session"].is_number(), "{i}");
}

/// `tally bench --mode flood` runs each attack and reports the devices' fate (issue 11;
/// the figures at scale are in benches/README.md). Small: 40 attackers, 2 devices.
#[test]
fn flood_mode_runs_every_attack_and_reports_the_devices() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (daemon, _) = common::bin::start(&state, true);
    let token = tally::admin::open_token(&state, None, false).unwrap().token;
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
