//! `tally conformance`: the conformance checks' command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use super::{read_credential, read_token};
use crate::proto::credential::{Credential, EnrollmentToken};

#[derive(Subcommand)]
pub enum Conformance {
    /// Play a client, honest and not, against a server at ADDR: enrollment, handshake,
    /// each refusal of 8.3 provoked on purpose, unknown id vs wrong key, takeover,
    /// close. It enrolls ids named `conformance-...` with the open token.
    Server {
        /// The server, host:port.
        addr: String,
        /// File holding the server's open enrollment token ("-": stdin; else
        /// $TALLY_TOKEN, else stdin).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// The credential of an identity the operator revoked: also checks that revoked
        /// looks like unknown (spec 7.5).
        #[arg(long, value_name = "FILE")]
        revoked_cred: Option<PathBuf>,
        /// Seconds to wait for each answer (a server may delay refusals, spec 13.10).
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        /// Run the checks' sessions in the authenticated mode (HELLO) instead of the
        /// encrypted mode (SEALED_HELLO), for a server whose policy is "off".
        #[arg(long)]
        authenticated: bool,
    },
    /// Play a server that misbehaves in each way a client must refuse, run the client
    /// under test once per case, and report what it accepted.
    ///
    /// --exec is run with `sh -c`, `{cred}` replaced by a credential file for this
    /// tool's address and `{payload}` by a payload: it must send that REQUEST, print the
    /// RESPONSE's payload and exit 0 only if it got one (e.g. `tally request --retries 0
    /// --cred {cred} {payload}`). --enroll-exec gets `{server}`, `{id}`, `{out}` and the
    /// token on stdin (e.g. `tally enroll --token-file - --server {server} --id {id} --out
    /// {out}`).
    Client {
        /// Where to listen for the client under test.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// The request command (see above).
        #[arg(long)]
        exec: String,
        /// The enrollment command (see above).
        #[arg(long)]
        enroll_exec: Option<String>,
        /// Seconds one case may take before the client is killed.
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
}

/// Runs the conformance checks; prints them; returns whether all passed.
pub fn run(what: Conformance) -> anyhow::Result<bool> {
    use crate::conformance;
    let secs = |s: f64| Duration::try_from_secs_f64(s).context("--timeout");
    let checks = match what {
        Conformance::Server {
            addr,
            token_file,
            revoked_cred,
            timeout,
            authenticated,
        } => {
            let text = read_token(token_file.as_deref(), None)?;
            let token = EnrollmentToken::parse(&text).context("the enrollment token")?;
            let revoked = match revoked_cred {
                Some(p) => Some(
                    Credential::from_file(&read_credential(&p)?)
                        .with_context(|| p.display().to_string())?,
                ),
                None => None,
            };
            let target = conformance::server::Target {
                addr,
                token,
                timeout: secs(timeout)?,
                revoked,
                mode: if authenticated {
                    crate::proto::Mode::Authenticated
                } else {
                    crate::proto::Mode::Encrypted
                },
            };
            conformance::server::run(&target)
        }
        Conformance::Client {
            listen,
            exec,
            enroll_exec,
            timeout,
        } => {
            let dir = tempfile_dir()?;
            let target = conformance::client::Target {
                listener: std::net::TcpListener::bind(&listen)
                    .with_context(|| format!("cannot listen on {listen}"))?,
                exec,
                enroll_exec,
                dir: dir.clone(),
                timeout: secs(timeout)?,
            };
            let checks = conformance::client::run(&target);
            let _ = std::fs::remove_dir_all(&dir);
            checks
        }
    };
    Ok(conformance::report(&checks, &mut std::io::stdout())?)
}

/// A private directory for the credential files the client checks hand out.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let r = crate::conformance::fresh_id("tally-conformance");
    let dir = std::env::temp_dir().join(r.as_str());
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
