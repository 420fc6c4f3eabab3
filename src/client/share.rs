//! One session per identity, shared on this machine: `tally listen` offers its session on
//! a local Unix socket, and `tally request` / `tally message` with the same credential send
//! through it instead of opening a session of their own, which would take the listener's
//! over (spec 7.3: one live session per identity). ssh's `ControlMaster`, for Tally.
//!
//! **Where.** The socket is `DIR/listen-HASH.sock`, `DIR` being `$XDG_RUNTIME_DIR/tally`
//! (when `XDG_RUNTIME_DIR` is set to an absolute path) or else `$TMPDIR/tally-UID`
//! (`/tmp/tally-1000`), made mode 0700 by the first listener and refused unless it is a
//! directory of ours that no one else can enter. `HASH` is 32 hex digits of SHA-256 over
//! the credential's server address and identity: two listeners of different identities,
//! or of one identity at two servers, never meet. Beside it, `listen-HASH.lock` is held
//! (`flock`) by the listener while it runs: a second listener of the identity is refused
//! (it would take the session back and forth), and a socket file whose listener was killed
//! is found stale and replaced. The socket is mode 0600; the listener removes both files
//! when it ends ([`Sharing`]'s drop).
//!
//! **Who.** Each side checks the other's uid (`SO_PEERCRED`): the listener serves only
//! processes of its own user (any of them: they can read the credential file anyway);
//! a one-shot command talks only to a listener of its own user. The request also carries
//! a fingerprint of the credential's key (16 bytes of SHA-256 over a label and the key,
//! which reveals nothing of it): a listener holding another key of the identity declines,
//! so that a one-shot command succeeds through a listener only where it would have
//! succeeded on its own.
//!
//! **The protocol**, one exchange per connection. Every frame is a 4-byte big-endian
//! length, then that many bytes; a length over [`MAX_LOCAL_FRAME`] (a 16 MiB payload, the
//! protocol's largest, plus a header) ends the connection before anything is allocated.
//!
//! - The command sends `ASK`: `"TSH1"`, a kind (1 REQUEST, 2 MESSAGE), the 16-byte
//!   fingerprint, the payload.
//! - The listener answers `NOT_SHARED` (`0x02`, then a reason in UTF-8) when it cannot
//!   take it: no session at the moment (it is reconnecting), another key, an unknown
//!   version. Nothing was sent; the command makes its own connection.
//! - Otherwise it answers `ACCEPTED` (`0x01`) and only then hands the payload to its
//!   session, then answers once more: `RESPONSE` (`0x03`, the status as 2 bytes
//!   big-endian, the payload), `SENT` (`0x04`, a MESSAGE written to the session) or
//!   `ERROR` (`0x05`, the session's error as the command would have printed it).
//!
//! A connection that ends before `ACCEPTED` sent nothing (the listener writes `ACCEPTED`
//! first, and fails to if the command is gone), so the command may go on by itself; after
//! `ACCEPTED` the request may have been carried out, and a failure is reported, never sent
//! again. Timeouts: [`LOCAL_TIMEOUT`] for each step of the exchange but the answer,
//! [`ANSWER_TIMEOUT`] for the answer (the server answers a REQUEST within its
//! `backend_timeout`, 30 s by default). A listener serves at most [`MAX_LOCAL_PEERS`]
//! connections at once; more wait to be accepted.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::link::State;
use super::{Client, ClientError, Link};
use crate::proto::credential::Credential;
use crate::proto::Status;

/// The largest local frame: a 16 MiB payload (the protocol's largest frame) and a header.
pub const MAX_LOCAL_FRAME: u32 = 16 * 1024 * 1024 + 64;
/// How long each step of a local exchange may take (connecting, the `ASK`, `ACCEPTED`).
pub const LOCAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a command waits for the answer once the listener accepted its request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// Local connections a listener serves at once.
pub const MAX_LOCAL_PEERS: usize = 64;

const MAGIC: &[u8; 4] = b"TSH1";
const KIND_REQUEST: u8 = 1;
const KIND_MESSAGE: u8 = 2;
const ACCEPTED: u8 = 1;
const NOT_SHARED: u8 = 2;
const RESPONSE: u8 = 3;
const SENT: u8 = 4;
const ERROR: u8 = 5;
const FINGERPRINT_LEN: usize = 16;
/// `sun_path` holds 108 bytes with the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Why `tally listen` cannot offer its session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// Another `tally listen` of this identity and server runs (it holds the lock).
    #[error("another `tally listen` runs for {id} at {server} (it holds {lock}): two listeners of one identity would take the session from each other; stop that one first (`tally request` and `tally message` go through it)")]
    InUse {
        /// The identity.
        id: String,
        /// The server address.
        server: String,
        /// The lock file it holds.
        lock: PathBuf,
    },
    /// The runtime directory cannot be used.
    #[error("{dir}: {why}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong, and what to do.
        why: String,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl ShareError {
    /// Whether another listener of the identity runs (rather than a problem of this
    /// machine's directories).
    pub fn is_in_use(&self) -> bool {
        matches!(self, ShareError::InUse { .. })
    }
}

fn our_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The directory of the shared-session sockets: `$XDG_RUNTIME_DIR/tally` if
/// `XDG_RUNTIME_DIR` is an absolute path, else `tally-UID` in the temporary directory.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("tally"),
        _ => std::env::temp_dir().join(format!("tally-{}", our_uid())),
    }
}

/// `listen-HASH`: the file name (without extension) of `cred`'s socket and lock.
fn base_name(cred: &Credential) -> String {
    let digest = Sha256::new()
        .chain_update(b"tally listen socket\0")
        .chain_update(cred.server.as_bytes())
        .chain_update([0])
        .chain_update(cred.id.as_str().as_bytes())
        .finalize();
    format!("listen-{}", hex::encode(&digest[..16]))
}

/// The socket a `tally listen` of `cred` offers its session on.
pub fn socket_path(cred: &Credential) -> PathBuf {
    runtime_dir().join(format!("{}.sock", base_name(cred)))
}

fn lock_path(cred: &Credential) -> PathBuf {
    runtime_dir().join(format!("{}.lock", base_name(cred)))
}

/// Names `cred`'s key without revealing it.
fn fingerprint(cred: &Credential) -> [u8; FINGERPRINT_LEN] {
    let digest = Sha256::new()
        .chain_update(b"tally listen key fingerprint\0")
        .chain_update(cred.key.expose())
        .finalize();
    let mut out = [0; FINGERPRINT_LEN];
    out.copy_from_slice(&digest[..FINGERPRINT_LEN]);
    out
}

/// Checks that `dir` is a directory of ours, closed to everyone else.
fn check_dir(dir: &Path) -> Result<(), ShareError> {
    let bad = |why: String| ShareError::Dir {
        dir: dir.to_owned(),
        why,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(|source| ShareError::Io {
        what: "cannot read",
        path: dir.to_owned(),
        source,
    })?;
    if !meta.file_type().is_dir() {
        return Err(bad(
            "is not a directory (a symbolic link?): remove it, tally makes it again".into(),
        ));
    }
    if meta.uid() != our_uid() {
        return Err(bad(format!(
            "belongs to uid {}, not to this user ({}): remove it, or set XDG_RUNTIME_DIR to a directory of yours",
            meta.uid(),
            our_uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "is open to other users (mode {mode:04o}): `chmod 700 {}`",
            dir.display()
        )));
    }
    Ok(())
}

/// The lock and socket files of a listener, removed when dropped.
#[derive(Debug)]
struct Files {
    socket: PathBuf,
    /// The socket file's (device, inode) once bound: only that file is removed.
    socket_ino: Option<(u64, u64)>,
    lock_path: PathBuf,
    lock: File,
}

fn ino(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl Drop for Files {
    fn drop(&mut self) {
        let is = |path: &Path, want: (u64, u64)| {
            std::fs::symlink_metadata(path).is_ok_and(|m| ino(&m) == want)
        };
        if let Some(want) = self.socket_ino {
            if is(&self.socket, want) {
                let _ = std::fs::remove_file(&self.socket);
            }
        }
        // Removed while still held: a listener starting meanwhile that opened this file
        // sees, once it holds the lock, that the path is no longer this file, and tries
        // again (`lock`).
        if let Ok(meta) = self.lock.metadata() {
            if is(&self.lock_path, ino(&meta)) {
                let _ = std::fs::remove_file(&self.lock_path);
            }
        }
    }
}

/// Takes `path`'s lock (created 0600), or says who holds it.
fn lock(cred: &Credential, path: &Path) -> Result<File, ShareError> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let io_err = |what, source: io::Error| ShareError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    // A lock file removed by its last holder between our open and our flock is not the
    // lock any more: try again with the new one (bounded: each round needs a listener
    // to start and end meanwhile).
    for _ in 0..8 {
        let fd = rustix::fs::open(
            path,
            OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("cannot open", e.into()))?;
        let file = File::from(fd);
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(ShareError::InUse {
                    id: cred.id.to_string(),
                    server: cred.server.clone(),
                    lock: path.to_owned(),
                })
            }
            Err(e) => return Err(io_err("cannot lock", e.into())),
        }
        let held = file.metadata().map_err(|e| io_err("cannot read", e))?;
        match std::fs::symlink_metadata(path) {
            Ok(now) if ino(&now) == ino(&held) => return Ok(file),
            _ => continue,
        }
    }
    Err(io_err(
        "cannot lock",
        io::Error::other("its file keeps being replaced"),
    ))
}

/// The socket of a `tally listen`, bound and locked, not serving yet: [`ShareSocket::serve_link`]
/// or [`ShareSocket::serve_client`] starts that.
#[derive(Debug)]
pub struct ShareSocket {
    listener: UnixListener,
    files: Files,
    fingerprint: [u8; FINGERPRINT_LEN],
}

impl ShareSocket {
    /// Makes the runtime directory if needed (0700), takes the identity's lock, replaces
    /// a stale socket file and binds the socket (0600). Fails with
    /// [`ShareError::InUse`] if another listener of `cred` runs. Call it within a tokio
    /// runtime.
    pub fn bind(cred: &Credential) -> Result<ShareSocket, ShareError> {
        let dir = runtime_dir();
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(ShareError::Io {
                    what: "cannot create",
                    path: dir,
                    source,
                })
            }
        }
        check_dir(&dir)?;
        let socket = socket_path(cred);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ShareError::Dir {
                dir,
                why: format!("is too long a path for a Unix socket (at most {MAX_SOCKET_PATH} bytes with the file name): set XDG_RUNTIME_DIR to a shorter one"),
            });
        }
        let lock_path = lock_path(cred);
        let lock = lock(cred, &lock_path)?;
        let mut files = Files {
            socket: socket.clone(),
            socket_ino: None,
            lock_path,
            lock,
        };
        // We hold the lock: a socket file there is a killed listener's.
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ShareError::Io {
                    what: "cannot remove the stale socket",
                    path: socket,
                    source,
                })
            }
        }
        let io_err = |what, source| ShareError::Io {
            what,
            path: socket.clone(),
            source,
        };
        let listener = UnixListener::bind(&socket).map_err(|e| io_err("cannot bind", e))?;
        // Bound with the umask's mode, but in a directory only we can enter.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("cannot chmod", e))?;
        let meta = std::fs::symlink_metadata(&socket).map_err(|e| io_err("cannot read", e))?;
        files.socket_ino = Some(ino(&meta));
        Ok(ShareSocket {
            listener,
            files,
            fingerprint: fingerprint(cred),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.files.socket
    }

    /// Relays requests and messages on `link`'s session, whichever is up.
    pub fn serve_link(self, link: &Link) -> Sharing {
        self.serve(Source::Link(link.watch_state()))
    }

    /// Relays requests and messages on `client`'s session.
    pub fn serve_client(self, client: &Client) -> Sharing {
        self.serve(Source::Client(client.clone()))
    }

    fn serve(self, source: Source) -> Sharing {
        let ShareSocket {
            listener,
            files,
            fingerprint,
        } = self;
        let task = tokio::spawn(accept_loop(listener, source, fingerprint));
        Sharing {
            task,
            _files: files,
        }
    }
}

/// A listener's socket being served. Dropping it stops serving and removes the socket
/// and lock files.
#[derive(Debug)]
pub struct Sharing {
    task: JoinHandle<()>,
    _files: Files,
}

impl Drop for Sharing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the listener's current session comes from.
#[derive(Clone)]
enum Source {
    Link(watch::Receiver<State>),
    Client(Client),
}

impl Source {
    /// The session, if one is up and not ended.
    fn current(&self) -> Option<Client> {
        let client = match self {
            Source::Link(state) => match &*state.borrow() {
                State::Up(c) => c.clone(),
                _ => return None,
            },
            Source::Client(c) => c.clone(),
        };
        let ended = client.ended.borrow().is_some() || client.tx.is_closed();
        (!ended).then_some(client)
    }
}

async fn accept_loop(listener: UnixListener, source: Source, fingerprint: [u8; FINGERPRINT_LEN]) {
    let uid = our_uid();
    let slots = Arc::new(Semaphore::new(MAX_LOCAL_PEERS));
    loop {
        // Never closed: acquiring fails only if it were.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: do not spin.
                tracing::warn!("shared session: cannot accept a local connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid => {}
            Ok(cred) => {
                tracing::warn!(
                    "shared session: refused a local connection from uid {}",
                    cred.uid()
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("shared session: cannot tell who connected: {e}");
                continue;
            }
        }
        let source = source.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = relay(stream, &source, &fingerprint).await {
                tracing::debug!("shared session: local connection: {e}");
            }
        });
    }
}

/// Reads one local frame, its length checked before anything is allocated (and then
/// only what arrives is).
async fn read_local(s: &mut UnixStream) -> io::Result<Vec<u8>> {
    let len = s.read_u32().await?;
    if len > MAX_LOCAL_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("local frame of {len} bytes, over {MAX_LOCAL_FRAME}"),
        ));
    }
    let mut body = Vec::new();
    (&mut *s)
        .take(u64::from(len))
        .read_to_end(&mut body)
        .await?;
    if body.len() != len as usize {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(body)
}

async fn write_local(s: &mut UnixStream, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_LOCAL_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "local frame too long"))?;
    let mut frame = Vec::with_capacity(4 + len as usize);
    frame.extend_from_slice(&len.to_be_bytes());
    for p in parts {
        frame.extend_from_slice(p);
    }
    s.write_all(&frame).await?;
    s.flush().await
}

async fn timed<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what}: no progress within {} s", limit.as_secs()),
        ))
    })
}

/// An `ASK`, parsed.
struct Ask<'a> {
    kind: u8,
    fingerprint: &'a [u8],
    payload: &'a [u8],
}

fn parse_ask(frame: &[u8]) -> Result<Ask<'_>, &'static str> {
    let rest = frame
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a request of this version (TSH1)")?;
    let (&kind, rest) = rest.split_first().ok_or("no kind")?;
    if kind != KIND_REQUEST && kind != KIND_MESSAGE {
        return Err("unknown kind");
    }
    if rest.len() < FINGERPRINT_LEN {
        return Err("no fingerprint");
    }
    let (fingerprint, payload) = rest.split_at(FINGERPRINT_LEN);
    Ok(Ask {
        kind,
        fingerprint,
        payload,
    })
}

/// An error as `tally` prints it: each cause once, on one line.
fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Serves one local connection: one `ASK`, relayed on the session.
async fn relay(
    mut s: UnixStream,
    source: &Source,
    fingerprint: &[u8; FINGERPRINT_LEN],
) -> io::Result<()> {
    let frame = timed(LOCAL_TIMEOUT, "reading the request", read_local(&mut s)).await?;
    let decline = |why: &str| [&[NOT_SHARED][..], why.as_bytes()].concat();
    let ask = match parse_ask(&frame) {
        Ok(ask) => ask,
        Err(why) => {
            let no = decline(why);
            return timed(LOCAL_TIMEOUT, "answering", write_local(&mut s, &[&no])).await;
        }
    };
    use subtle::ConstantTimeEq;
    let why = if !bool::from(ask.fingerprint.ct_eq(fingerprint)) {
        Some("this listener holds another key of the identity")
    } else {
        None
    };
    let client = match (why, source.current()) {
        (None, Some(client)) => client,
        (why, _) => {
            let no = decline(why.unwrap_or("the listener has no session now (reconnecting)"));
            return timed(LOCAL_TIMEOUT, "answering", write_local(&mut s, &[&no])).await;
        }
    };
    // Before the session sends anything: a command that is gone by now gets EPIPE here,
    // and nothing is sent.
    timed(
        LOCAL_TIMEOUT,
        "accepting",
        write_local(&mut s, &[&[ACCEPTED]]),
    )
    .await?;
    let (kind, payload) = (ask.kind, Bytes::copy_from_slice(ask.payload));
    drop(frame);
    let answer = if kind == KIND_REQUEST {
        match client.request_with_status(payload).await {
            Ok((status, body)) => [&[RESPONSE][..], &status.0.to_be_bytes(), &body].concat(),
            Err(e) => [&[ERROR][..], report(&e).as_bytes()].concat(),
        }
    } else {
        match client.message(payload).await {
            Ok(()) => vec![SENT],
            Err(e) => [&[ERROR][..], report(&e).as_bytes()].concat(),
        }
    };
    timed(LOCAL_TIMEOUT, "answering", write_local(&mut s, &[&answer])).await
}

/// What a listener made of a command's `ASK`.
enum Answer {
    Response(Status, Bytes),
    Sent,
    Error(String),
}

/// Sends `payload` as `kind` through the listener of `cred`, if one of ours runs and takes
/// it. `None`: nothing was sent, make a connection of your own.
async fn ask(cred: &Credential, kind: u8, payload: &[u8]) -> Option<Result<Answer, ClientError>> {
    let path = socket_path(cred);
    let dir = path.parent()?;
    match check_dir(dir) {
        Ok(()) => {}
        Err(ShareError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return None
        }
        Err(e) => {
            tracing::warn!("not looking for a `tally listen` to share: {e}");
            return None;
        }
    }
    // The largest payload fits; one larger fails on the session's limits anyway, and
    // does so as it would have on its own.
    if payload.len() > (MAX_LOCAL_FRAME as usize) - 64 {
        return None;
    }
    // No socket, or a killed listener's (connection refused): on our own.
    let mut s = match tokio::time::timeout(LOCAL_TIMEOUT, UnixStream::connect(&path)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if !matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) {
                tracing::warn!(
                    "not sharing `tally listen`'s session: {}: {e}",
                    path.display()
                );
            }
            return None;
        }
        Err(_) => {
            tracing::warn!(
                "not sharing `tally listen`'s session: {} did not accept within {} s",
                path.display(),
                LOCAL_TIMEOUT.as_secs()
            );
            return None;
        }
    };
    match s.peer_cred() {
        Ok(peer) if peer.uid() == our_uid() => {}
        _ => {
            tracing::warn!(
                "not sharing: {} is not a `tally listen` of this user",
                path.display()
            );
            return None;
        }
    }
    let fp = fingerprint(cred);
    let sent = timed(
        LOCAL_TIMEOUT,
        "sending",
        write_local(&mut s, &[MAGIC, &[kind], &fp, payload]),
    )
    .await;
    if sent.is_err() {
        // The listener has not got the whole request: it sent nothing.
        return None;
    }
    let shown = path.display();
    let first = match tokio::time::timeout(LOCAL_TIMEOUT, read_local(&mut s)).await {
        Ok(Ok(frame)) => frame,
        // Ended before ACCEPTED: it sent nothing.
        Ok(Err(_)) => return None,
        Err(_) => {
            return Some(Err(ClientError::Relayed(format!(
                "the `tally listen` of this identity ({shown}) did not take the request within {} s, and may still send it: is it stopped? Use --direct to go without it",
                LOCAL_TIMEOUT.as_secs()
            ))))
        }
    };
    match first.split_first() {
        Some((&ACCEPTED, [])) => {}
        Some((&NOT_SHARED, why)) => {
            tracing::debug!(
                "`tally listen` declined ({}): on our own",
                String::from_utf8_lossy(why)
            );
            return None;
        }
        _ => {
            return Some(Err(ClientError::Relayed(format!(
                "the `tally listen` of this identity ({shown}) answered something this `tally` does not understand (another version?): use --direct"
            ))))
        }
    }
    let lost = |why: String| {
        Some(Err(ClientError::Relayed(format!(
            "the `tally listen` of this identity ({shown}) took the request but {why}: it may have been carried out"
        ))))
    };
    let frame = match tokio::time::timeout(ANSWER_TIMEOUT, read_local(&mut s)).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(e)) => return lost(format!("did not answer ({e})")),
        Err(_) => {
            return lost(format!(
                "did not answer within {} s",
                ANSWER_TIMEOUT.as_secs()
            ))
        }
    };
    let answer = match frame.split_first() {
        Some((&RESPONSE, [hi, lo, body @ ..])) => Answer::Response(
            Status(u16::from_be_bytes([*hi, *lo])),
            Bytes::copy_from_slice(body),
        ),
        Some((&SENT, [])) => Answer::Sent,
        Some((&ERROR, text)) => Answer::Error(String::from_utf8_lossy(text).into_owned()),
        _ => return lost("answered something this `tally` does not understand".into()),
    };
    Some(Ok(answer))
}

/// Sends a REQUEST through the running `tally listen` of `cred` (same identity, server
/// and key, this user's), and returns its RESPONSE's status and payload, or the error
/// its session gave, as [`Client::request_with_status`] would have. `None`: there is no
/// such listener or it cannot take the request now (no session while it reconnects);
/// nothing was sent, and the caller connects on its own.
pub async fn request(
    cred: &Credential,
    payload: &[u8],
) -> Option<Result<(Status, Bytes), ClientError>> {
    Some(match ask(cred, KIND_REQUEST, payload).await? {
        Ok(Answer::Response(status, body)) => Ok((status, body)),
        Ok(Answer::Error(text)) => Err(ClientError::Relayed(text)),
        Ok(Answer::Sent) => Err(ClientError::Relayed(
            "the `tally listen` of this identity answered a request as a message (another version?)".into(),
        )),
        Err(e) => Err(e),
    })
}

/// Sends a one-way MESSAGE through the running `tally listen` of `cred`, as
/// [`request`] does: `None` if there is none to take it (nothing was sent).
pub async fn message(cred: &Credential, payload: &[u8]) -> Option<Result<(), ClientError>> {
    Some(match ask(cred, KIND_MESSAGE, payload).await? {
        Ok(Answer::Sent) => Ok(()),
        Ok(Answer::Error(text)) => Err(ClientError::Relayed(text)),
        Ok(Answer::Response(..)) => Err(ClientError::Relayed(
            "the `tally listen` of this identity answered a message as a request (another version?)".into(),
        )),
        Err(e) => Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Id, SecretKey};

    fn cred(id: &str, server: &str, key: u8) -> Credential {
        Credential {
            id: Id::new(id).unwrap(),
            key: SecretKey::from_bytes([key; 32]),
            server: server.into(),
            server_key: [9; 32],
        }
    }

    #[test]
    fn sockets_differ_by_identity_and_server_not_by_key() {
        let a = base_name(&cred("dev", "127.0.0.1:7420", 1));
        assert_eq!(a, base_name(&cred("dev", "127.0.0.1:7420", 2)));
        assert_ne!(a, base_name(&cred("dev2", "127.0.0.1:7420", 1)));
        assert_ne!(a, base_name(&cred("dev", "127.0.0.1:7421", 1)));
        // No ambiguity between the two fields.
        assert_ne!(
            base_name(&cred("a", "b:1", 1)),
            base_name(&cred("ab", ":1", 1))
        );
        assert_eq!(a.len(), "listen-".len() + 32);
        assert_ne!(
            fingerprint(&cred("dev", "s", 1)),
            fingerprint(&cred("dev", "s", 2))
        );
    }

    #[test]
    fn asks_are_parsed_strictly() {
        let fp = [7u8; FINGERPRINT_LEN];
        let ok = [&MAGIC[..], &[KIND_REQUEST], &fp, b"hi"].concat();
        let ask = parse_ask(&ok).unwrap();
        assert_eq!(
            (ask.kind, ask.fingerprint, ask.payload),
            (1, &fp[..], &b"hi"[..])
        );
        for bad in [
            &b""[..],
            b"TSH2\x01",
            b"TSH1",
            b"TSH1\x03",
            &[&MAGIC[..], &[KIND_MESSAGE], &fp[..5]].concat(),
        ] {
            assert!(parse_ask(bad).is_err(), "{bad:?}");
        }
    }

    /// A local frame's length is checked before the body is read, and a short body is
    /// an error, not a shorter frame.
    #[tokio::test]
    async fn local_frames_are_bounded() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&(MAX_LOCAL_FRAME + 1).to_be_bytes())
            .await
            .unwrap();
        let e = read_local(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&[0, 0, 0, 9, 1, 2]).await.unwrap();
        drop(a);
        let e = read_local(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_local(&mut a, &[b"ab", b"c"]).await.unwrap();
        assert_eq!(read_local(&mut b).await.unwrap(), b"abc");
    }
}
