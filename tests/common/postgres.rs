//! A throwaway PostgreSQL cluster for one test: `initdb` and `pg_ctl` in a temporary
//! directory, on a free port of 127.0.0.1, trust authentication, stopped when dropped.
//! As root, the cluster runs as the `postgres` user (PostgreSQL refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

pub struct Cluster {
    dir: TempDir,
    bin: PathBuf,
    as_user: Option<&'static str>,
    pub port: u16,
    /// The server's options (`pg_ctl -o`).
    opts: String,
}

/// Where `initdb` and `pg_ctl` are: on `PATH`, or Debian's `/usr/lib/postgresql/N/bin`.
fn bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    // The newest version.
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Starts a cluster, or returns `None` (after saying why) if PostgreSQL is not
    /// installed here. Under CI (`CI` set) a missing PostgreSQL fails the test instead.
    pub fn start(test: &str) -> Option<Cluster> {
        let Some(bin) = bin_dir() else {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: PostgreSQL (initdb, pg_ctl) is not installed, and CI must run the fleet tests: .ci/run installs Debian's postgresql");
            }
            eprintln!("SKIPPED {test}: PostgreSQL is not installed (initdb and pg_ctl not on PATH nor in /usr/lib/postgresql/*/bin); `apt-get install postgresql` to run it");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("tally-pg")
            .tempdir()
            .unwrap();
        let root = rustix::process::geteuid().is_root();
        let as_user = root.then_some("postgres");
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster's directory to postgres failed");
        }
        let mut cluster = Cluster {
            dir,
            bin,
            as_user,
            port: 0,
            opts: String::new(),
        };
        let data = cluster.data();
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A port found free may be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=on -c max_connections=200 -c shared_buffers=32MB",
                cluster.dir.path().display()
            );
            if cluster.pg_ctl_start(&opts).status.success() {
                cluster.port = port;
                cluster.opts = opts;
                return Some(cluster);
            }
        }
        panic!(
            "pg_ctl start failed: {}",
            std::fs::read_to_string(cluster.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// Stops the server (its clients' connections are cut), keeping its data.
    pub fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the stopped server again, on the same port.
    pub fn restart(&self) {
        let out = self.pg_ctl_start(&self.opts);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start` with the server options `opts`, waiting until it accepts
    /// connections (its log in the cluster's directory).
    fn pg_ctl_start(&self, opts: &str) -> std::process::Output {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "30", "-o", opts, "start"])
            .output()
            .unwrap()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match self.as_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// The URL of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with `psql`, returning its output (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        // Debian keeps psql in /usr/bin (postgresql-client), not beside initdb.
        let psql = Some(self.bin.join("psql"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let out = Command::new(psql)
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(),
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The cluster's directory (its log is `log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
