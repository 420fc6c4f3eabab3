//! A throwaway PostgreSQL cluster for one test: `initdb` and `pg_ctl` in a temporary
//! directory, on a free port of 127.0.0.1, trust authentication, stopped when dropped.
//! As root, the cluster runs as the `postgres` user (PostgreSQL refuses to run as root).
//! [`Options`]: TLS (`ssl=on`, a server certificate for 127.0.0.1 and localhost signed
//! by a CA made for the test with the `openssl` command) and a password (scram-sha-256
//! for TCP connections).

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
    /// The password of the `postgres` role, if TCP connections need one.
    password: Option<String>,
    /// The CA that signed the server's certificate, if it has TLS.
    ca: Option<PathBuf>,
}

/// How [`Cluster::start_with`] sets the cluster up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `ssl=on` with a certificate signed by a test CA ([`Cluster::ca`]).
    pub tls: bool,
    /// TCP connections authenticate with scram-sha-256 and this password for the
    /// `postgres` role (psql of [`Cluster::psql`] is given it).
    pub password: Option<&'static str>,
}

/// Runs `openssl ARGS` in `dir` (`args` split at spaces).
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args.split_whitespace())
        .output()
        .expect("the openssl command line tool");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA in `dir`: `NAME.crt` (its certificate) and `NAME.key`. Returns the
/// certificate's path.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(
        dir,
        &format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
             -subj /CN=tally-test-CA-{name} -keyout {key} -out {crt}"
        ),
    );
    dir.join(crt)
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
        Cluster::start_with(test, Options::default())
    }

    /// [`Cluster::start`] with TLS or a password ([`Options`]).
    pub fn start_with(test: &str, options: Options) -> Option<Cluster> {
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
            password: options.password.map(str::to_owned),
            ca: None,
        };
        let data = cluster.data();
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        if let Some(pw) = options.password {
            let file = cluster.dir.path().join("pwfile");
            std::fs::write(&file, pw).unwrap();
            cluster.chown(&file);
            initdb
                .args(["--auth-host=scram-sha-256", "--pwfile"])
                .arg(&file);
        }
        let out = initdb.output().unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut tls_opts = String::new();
        if options.tls {
            cluster.ca = Some(cluster.make_server_certificate());
            let d = cluster.dir.path().display();
            tls_opts = format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"
            );
        }
        // A port found free may be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=on -c max_connections=200 -c shared_buffers=32MB{tls_opts}",
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

    /// A test CA (`ca.crt`) and the server's certificate and key (`server.crt`,
    /// `server.key`: for 127.0.0.1 and localhost, the key 0600 and the server's user's) in
    /// the cluster's directory. Returns the CA's certificate.
    fn make_server_certificate(&self) -> PathBuf {
        let dir = self.dir.path();
        let ca = make_ca(dir, "ca");
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n",
        )
        .unwrap();
        openssl(
            dir,
            "req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -subj /CN=localhost -keyout server.key -out server.csr",
        );
        openssl(
            dir,
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
             -extfile server.ext -out server.crt",
        );
        let key = dir.join("server.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        self.chown(&key);
        self.chown(&dir.join("server.crt"));
        ca
    }

    /// Gives `path` to the server's user (when the tests run as root).
    fn chown(&self, path: &Path) {
        if let Some(user) = self.as_user {
            let ok = Command::new("chown")
                .arg(format!("{user}:{user}"))
                .arg(path)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown {}", path.display());
        }
    }

    /// The CA that signed the server's certificate ([`Options::tls`]).
    pub fn ca(&self) -> &Path {
        self.ca.as_deref().expect("a cluster started with TLS")
    }

    /// The password of the `postgres` role ([`Options::password`]).
    pub fn password(&self) -> &str {
        self.password
            .as_deref()
            .expect("a cluster started with a password")
    }

    /// Stops the server (its clients' connections are cut), keeping its data.
    pub fn stop(&self) {
        succeeded(self.pg_ctl_stop("fast").unwrap());
    }

    /// Stops the server as a crash would (`-m immediate`: no checkpoint; at the next
    /// start it recovers, and its UNLOGGED tables come back empty).
    pub fn crash(&self) {
        succeeded(self.pg_ctl_stop("immediate").unwrap());
    }

    /// Starts the stopped server again, on the same port.
    pub fn restart(&self) {
        succeeded(self.pg_ctl_start(&self.opts));
    }

    /// `pg_ctl stop -m MODE`, waiting until the server is gone.
    fn pg_ctl_stop(&self, mode: &str) -> std::io::Result<std::process::Output> {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "stop"])
            .output()
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

    /// `psql` on the `postgres` database, unaligned, tuples only, stopping at an error.
    fn psql_command(&self) -> Command {
        // Debian keeps psql in /usr/bin (postgresql-client), not beside initdb.
        let psql = Some(self.bin.join("psql"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let mut cmd = Command::new(psql);
        if let Some(pw) = &self.password {
            cmd.env("PGPASSWORD", pw);
        }
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &self.url()]);
        cmd
    }

    /// A `psql` that reads statements from its standard input and prints their results
    /// to its standard output (both piped): a session that holds a transaction open
    /// while the test goes on.
    pub fn psql_session(&self) -> std::process::Child {
        self.psql_command()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs `sql` with `psql`, returning its output (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_command().args(["-c", sql]).output().unwrap();
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

/// Asserts a `pg_ctl` run succeeded, saying why not.
fn succeeded(out: std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop("immediate");
    }
}
