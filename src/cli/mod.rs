//! The command lines' subcommands, each a function of its arguments: `tally`'s here and
//! in the submodules, `tallyd`'s admin commands in [`tallyd`]. `src/bin/` parses the
//! command line and calls one of them.

pub mod bench;
pub mod conformance;
pub mod listen;
pub mod tallyd;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;

use crate::client::{self, Client, ClientOptions, Incoming};
use crate::proto::credential::{Credential, EnrollmentToken};
use crate::proto::frame::EnrollMode;
use crate::proto::{ErrorCode, Id, Status};

/// `tally enroll`.
#[derive(Args)]
pub struct EnrollArgs {
    /// File holding the enrollment token ("-" for stdin).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The token itself. Visible to other local users in the process list: prefer
    /// --token-file or $TALLY_TOKEN.
    #[arg(long, hide = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// The identity to enroll: 1-64 of A-Z a-z 0-9 . _ - : @
    #[arg(long)]
    pub id: String,
    /// Server address.
    #[arg(long, env = "TALLY_SERVER", default_value = "127.0.0.1:7420")]
    pub server: String,
    /// Where to write the credential.
    #[arg(long, default_value = "tally.cred")]
    pub out: PathBuf,
    /// Overwrite an existing credential file.
    #[arg(long)]
    pub force: bool,
}

/// `tally request`.
#[derive(Args)]
pub struct RequestArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Make a session of its own even if a `tally listen` of this identity runs (that
    /// listener's session is taken over: it reconnects 10 s to 10 min later).
    #[arg(long)]
    pub direct: bool,
    /// The request payload; read from stdin when absent.
    pub data: Option<String>,
}

/// `tally message`.
#[derive(Args)]
pub struct MessageArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Make a session of its own even if a `tally listen` of this identity runs (that
    /// listener's session is taken over).
    #[arg(long)]
    pub direct: bool,
    /// The message payload; read from stdin when absent.
    pub data: Option<String>,
}

#[derive(Args)]
pub struct ConnArgs {
    /// The credential file written by `tally enroll`.
    #[arg(long, default_value = "tally.cred")]
    cred: PathBuf,
    /// Keepalive interval in seconds. By default the interval the server announces in
    /// the handshake; a longer value is shortened to the server's.
    #[arg(long)]
    keepalive: Option<f64>,
    /// The largest session frame this device accepts, in bytes (256 to 16777216); the
    /// server is told in the handshake and sends nothing longer.
    #[arg(long, default_value_t = crate::proto::DEFAULT_MAX_FRAME_LEN,
          value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    max_frame_len: u32,
    /// Retries when the server is busy or the connection fails before it answers
    /// (jittered exponential backoff from 0.2 s up to 5 s; each retry is reported).
    #[arg(long, default_value_t = 4)]
    retries: u32,
    /// Run the session in the authenticated mode: payloads in the clear, each frame
    /// tagged (HELLO). By default it is encrypted (SEALED_HELLO); a server that refuses
    /// the mode says MODE_REFUSED, and tally never switches on its own (spec 7.8).
    #[arg(long, env = "TALLY_AUTHENTICATE_ONLY")]
    authenticate_only: bool,
}

impl ConnArgs {
    /// The credential file, read and checked, and the client options of these flags.
    pub fn credential_and_options(&self) -> anyhow::Result<(Credential, ClientOptions)> {
        let text = read_credential(&self.cred)?;
        let cred = Credential::from_file(&text).with_context(|| self.cred.display().to_string())?;
        let default = client::Backoff::default();
        let mut opts = ClientOptions::default()
            .with_max_frame_len(self.max_frame_len)
            .with_retry(client::Backoff::new(
                self.retries,
                default.initial_delay,
                default.max_delay,
            ));
        if let Some(secs) = self.keepalive {
            opts = opts.with_keepalive(Duration::try_from_secs_f64(secs).context("--keepalive")?);
        }
        if self.authenticate_only {
            opts.mode = crate::proto::Mode::Authenticated;
        }
        Ok((cred, opts))
    }
}

/// `tally enroll`: enrolls with the token and writes the credential file.
pub async fn enroll(a: EnrollArgs) -> anyhow::Result<()> {
    let EnrollArgs {
        token_file,
        token,
        id,
        server,
        out,
        force,
    } = a;
    let text = read_token(token_file.as_deref(), token)?;
    let token = EnrollmentToken::parse(&text).context("the enrollment token")?;
    let id = Id::new(&id).context("--id")?;
    if out.exists() && !force {
        bail!(
            "{} exists; use --force to overwrite it (its identity would be lost)",
            out.display()
        );
    }
    let what = format!("enrollment of {id} at {server}");
    let mode = token.mode;
    let cred = match client::enroll(&server, &token, id, &client::ClientOptions::default()).await {
        Ok(cred) => cred,
        // The server says no more than "refused" (spec 7.5); what kind of token
        // this was narrows down why.
        Err(client::ClientError::Refused(code)) if code == ErrorCode::ENROLL_REFUSED => {
            let why = match mode {
                EnrollMode::Open => "this open token does not enroll here: this server does not accept open enrollment (open_enrollment = false, or `tallyd open-enrollment off` in a fleet: ask for a token of your own, `tallyd token --id`), or the open token was replaced since (`tallyd token --rotate-open`), or it is another server's token (check --server)",
                EnrollMode::Token => "this per-identity token does not enroll this id here: it is single use (already used?), it expires (3 days by default), it may have been withdrawn or replaced by a newer one, it enrolls only the id it was issued for (check --id), or it is another server's (check --server); `tallyd tokens` on the server lists the tokens outstanding",
            };
            bail!("{what}: refused by the server ({code}): {why}");
        }
        Err(e) => return Err(anyhow::Error::new(e).context(what)),
    };
    write_credential(&out, &cred, force)?;
    eprintln!(
        "enrolled {} at {}; credential written to {}",
        cred.id,
        cred.server,
        out.display()
    );
    Ok(())
}

/// `tally request`: one REQUEST, its answer's payload to stdout.
pub async fn request(a: RequestArgs) -> anyhow::Result<()> {
    let RequestArgs { conn, direct, data } = a;
    let payload = payload(data)?;
    let (cred, opts) = conn.credential_and_options()?;
    let shared = match direct {
        false => client::share::request(&cred, &payload).await,
        true => None,
    };
    let result = match shared {
        Some(result) => result,
        None => {
            // Not kept: a server request arriving meanwhile is answered UNAVAILABLE
            // at once (`tally listen` answers them), not left waiting for the
            // backend's timeout.
            let (client, _) = connect(&cred, opts).await?;
            let result = client.request_with_status(payload).await;
            let _ = client.close().await;
            result
        }
    };
    match result? {
        (Status::OK, body) => crate::output::payload_to_stdout(&body)?,
        (status, body) => {
            bail!("request failed with status {status}: {}", printable(&body))
        }
    }
    Ok(())
}

/// `tally message`: one one-way MESSAGE.
pub async fn message(a: MessageArgs) -> anyhow::Result<()> {
    let MessageArgs { conn, direct, data } = a;
    let payload = payload(data)?;
    let (cred, opts) = conn.credential_and_options()?;
    let shared = match direct {
        false => client::share::message(&cred, &payload).await,
        true => None,
    };
    match shared {
        Some(result) => result?,
        None => {
            let (client, _) = connect(&cred, opts).await?;
            client.message(payload).await?;
            client.close().await?;
        }
    }
    Ok(())
}

/// A session of our own.
async fn connect(
    cred: &Credential,
    opts: ClientOptions,
) -> anyhow::Result<(Client, tokio::sync::mpsc::Receiver<Incoming>)> {
    Client::connect(cred, opts)
        .await
        .with_context(|| format!("session with {} as {}", cred.server, cred.id))
}

/// `tally listen`'s socket for `tally request` and `tally message`: refused if another
/// listener of the identity runs; without it (a runtime directory that cannot be used),
/// the listener runs and says so.
fn offer_session(cred: &Credential) -> anyhow::Result<Option<client::share::ShareSocket>> {
    match client::share::ShareSocket::bind(cred) {
        Ok(socket) => Ok(Some(socket)),
        Err(e) if e.is_in_use() => Err(e.into()),
        Err(e) => {
            tracing::warn!("not offering this session to `tally request` and `tally message` (they will take it over): {e}");
            Ok(None)
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn payload(data: Option<String>) -> anyhow::Result<Bytes> {
    Ok(match data {
        Some(d) => Bytes::from(d),
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            Bytes::from(buf)
        }
    })
}

fn write_credential(path: &Path, cred: &Credential, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!(
            "{} exists; use --force to overwrite it (its identity would be lost)",
            path.display()
        );
    }
    crate::secrets::write_secret_file(path, cred.to_file().as_bytes())?;
    Ok(())
}

fn printable(b: &[u8]) -> String {
    crate::output::one_line(b)
}

/// Reads a credential file, refusing one that other users can read or write (as ssh
/// refuses such a private key): its key lets anyone act as the device.
fn read_credential(path: &Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read {shown}"))?
        .permissions()
        .mode();
    if mode & 0o006 != 0 {
        anyhow::bail!(
            "{shown} is accessible to every user of this machine (mode {:04o}), and its key \
             lets anyone act as the device: `chmod 600 {shown}`, then try again",
            mode & 0o7777
        );
    }
    if mode & 0o060 != 0 {
        tracing::warn!(
            "{shown} is accessible to its group (mode {:04o}); `chmod 600 {shown}` unless that group is meant to hold the device's key",
            mode & 0o7777
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {shown}"))?;
    Ok(zeroize::Zeroizing::new(text))
}

/// The enrollment token: from `--token-file` (`-` is stdin), `--token`, `$TALLY_TOKEN`,
/// or stdin, in that order.
fn read_token(
    file: Option<&Path>,
    arg: Option<String>,
) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let from_stdin = || -> anyhow::Result<zeroize::Zeroizing<String>> {
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            eprintln!("paste the enrollment token, then press Enter:");
        }
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the enrollment token from stdin")?;
        Ok(line)
    };
    match (file, arg) {
        (Some(p), _) if p == Path::new("-") => from_stdin(),
        (Some(p), _) => Ok(zeroize::Zeroizing::new(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the enrollment token from {}", p.display()))?,
        )),
        (None, Some(t)) => Ok(zeroize::Zeroizing::new(t)),
        (None, None) => match std::env::var("TALLY_TOKEN") {
            Ok(t) => Ok(zeroize::Zeroizing::new(t)),
            Err(_) => from_stdin(),
        },
    }
}
