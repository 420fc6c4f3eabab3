//! The server's key files: the static X25519 key and the store key, each a file of 64
//! hex digits, mode 0600, written atomically. (The enrollment credentials, the open key
//! and per-identity tokens, live in the store, sealed under the store key.)
//!
//! A key is read from the systemd credentials directory (`$CREDENTIALS_DIRECTORY`,
//! `LoadCredential=`) when it is there, else from the state directory, where it is
//! created on first start.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::proto::enroll::ServerParams;
use crate::proto::SecretKey;

/// File name of the server's static X25519 secret `s`.
pub const SERVER_KEY: &str = "server.key";
/// File name of the key that wraps identity keys in the store.
pub const STORE_KEY: &str = "store.key";

/// A secret that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretsError {
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file does not hold 64 hex digits.
    #[error("{0}: not a key (expected 64 hexadecimal digits)")]
    Format(PathBuf),
    /// A key file is readable by others.
    #[error("{0}: mode {1:o} lets other users read a secret; run `chmod 600` on it")]
    Permissions(PathBuf, u32),
    /// The state directory is writable by other users.
    #[error(
        "{0}: mode {1:o} lets other users write to the state directory; run `chmod 700` on it"
    )]
    OpenDirectory(PathBuf, u32),
    /// A key is missing (its state directory exists) and may not be created here.
    #[error("{0} does not exist: this state directory has no keys yet (run `tallyd init`, or start tallyd once); if the daemon gets its keys from systemd credentials (LoadCredential=), give this command the same directory in $CREDENTIALS_DIRECTORY{1}")]
    Missing(PathBuf, RunningDaemons),
    /// The state directory itself does not exist.
    #[error("no state directory at {0}: give the --state-dir the daemon uses (the systemd unit's is /var/lib/tally), or start tallyd once to create this one{1}")]
    NoStateDir(PathBuf, RunningDaemons),
    /// A key exists but this user may not read it (or reach it).
    #[error("{path}: permission denied for user {user}: run this as the daemon's user or as root (e.g. `sudo tallyd ...`)")]
    Denied {
        /// The file.
        path: PathBuf,
        /// Who tried (name and uid).
        user: String,
    },
    /// Another daemon runs with this state directory.
    #[error("another tallyd runs with state directory {0} (it holds {0}/{LOCK_FILE}); stop it first, or give this one its own --state-dir")]
    InUse(PathBuf),
}

/// The lock file a running daemon holds in its state directory.
pub const LOCK_FILE: &str = "tallyd.lock";

/// A running daemon's hold on its state directory (an exclusive `flock` on
/// [`LOCK_FILE`], released by the kernel when the process ends, however it ends): no
/// second daemon on the same store, and no admin command changing identities behind the
/// daemon's back, which would miss its live sessions and its in-memory key index.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] File);

/// Takes the state directory's lock, or says that another daemon holds it.
pub fn lock_state_dir(dir: &Path) -> Result<StateLock, SecretsError> {
    use rustix::fs::{flock, FlockOperation};
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(StateLock(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(SecretsError::InUse(dir.to_owned())),
        Err(e) => Err(SecretsError::Io {
            path,
            source: e.into(),
        }),
    }
}

/// Whether a running daemon holds the state directory `dir`.
pub fn state_dir_in_use(dir: &Path) -> bool {
    use rustix::fs::{flock, FlockOperation};
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    matches!(
        flock(&file, FlockOperation::NonBlockingLockShared),
        Err(rustix::io::Errno::WOULDBLOCK)
    )
}

/// The tallyd processes running on this machine, each with the state directory it holds
/// (from the lock file among its open files, when this user may see them): the advice
/// for an admin command given a directory that is not the daemon's.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunningDaemons(pub Vec<(u32, Option<PathBuf>)>);

/// Whether a daemon run by `uid` is one whose state directory may be suggested to
/// `me`: our own, or, for root, a system or systemd dynamic user's. Any user can start
/// a process named `tallyd` holding a file named `tallyd.lock`: root must not be sent
/// to another user's directory (its control socket would answer root's admin commands).
pub(crate) fn trusted_owner(uid: u32, me: u32) -> bool {
    uid == me || (me == 0 && (uid < 1000 || (61184..=65519).contains(&uid)))
}

impl std::fmt::Display for RunningDaemons {
    /// Nothing if none runs; else `; the running tallyd (pid N) uses DIR: ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (pid, dir)) in self.0.iter().enumerate() {
            f.write_str(if i == 0 { "; " } else { ", and " })?;
            match dir {
                Some(dir) => write!(
                    f,
                    "the running tallyd (pid {pid}) uses {}: add `--state-dir {0}`",
                    dir.display()
                )?,
                None => write!(
                    f,
                    "a tallyd runs (pid {pid}) as another user: run this as root (`sudo`), or as the daemon's user, to see which state directory it uses"
                )?,
            }
        }
        Ok(())
    }
}

/// Finds the running daemons: processes named `tallyd` (other than this one) that hold
/// a [`LOCK_FILE`] open. Linux only (`/proc`); elsewhere, or if `/proc` cannot be read,
/// none.
pub fn running_daemons() -> RunningDaemons {
    let me = std::process::id();
    let my_uid = rustix::process::getuid().as_raw();
    let Ok(procs) = fs::read_dir("/proc") else {
        return RunningDaemons::default();
    };
    let mut found: Vec<(u32, Option<PathBuf>)> = procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "tallyd")
        })
        .filter_map(|pid| {
            use std::os::unix::fs::MetadataExt;
            let uid = fs::metadata(format!("/proc/{pid}")).ok()?.uid();
            if !trusted_owner(uid, my_uid) {
                return Some((pid, None));
            }
            let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
                // Another user's process: it runs, but its files are not ours to see.
                return Some((pid, None));
            };
            let held = fds.filter_map(Result::ok).find_map(|fd| {
                let target = fs::read_link(fd.path()).ok()?;
                (target.file_name()? == LOCK_FILE).then(|| target.parent().map(Path::to_owned))?
            });
            // A tallyd holding no lock is an admin command, not a daemon.
            held.map(|dir| (pid, Some(dir)))
        })
        .collect();
    found.sort();
    RunningDaemons(found)
}

#[cfg(test)]
mod running_tests {
    /// Review finding: any user could make root's hint name their directory.
    #[test]
    fn only_our_own_or_system_daemons_are_suggested() {
        use super::trusted_owner;
        assert!(trusted_owner(1000, 1000), "our own");
        assert!(!trusted_owner(1001, 1000), "another user's, to a user");
        assert!(trusted_owner(0, 0) && trusted_owner(998, 0) && trusted_owner(61200, 0));
        assert!(
            !trusted_owner(1000, 0),
            "a user's daemon is not suggested to root"
        );
        assert!(
            !trusted_owner(0, 1000),
            "nor root's to a user (it cannot see it anyway)"
        );
    }
}

/// Permission denied on `path`, naming this process's user.
fn denied(path: &Path) -> SecretsError {
    let uid = rustix::process::getuid().as_raw();
    let name = fs::read_to_string("/etc/passwd").ok().and_then(|passwd| {
        passwd.lines().find_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            (f.nth(1)? == uid.to_string()).then(|| name.to_owned())
        })
    });
    SecretsError::Denied {
        path: path.to_owned(),
        user: match name {
            Some(name) => format!("{name} (uid {uid})"),
            None => format!("uid {uid}"),
        },
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretsError + '_ {
    move |source| SecretsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The directory holding `path`. `parent()` of a bare file name is "", which names no
/// directory: that is the current one.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `contents` to `path` atomically with mode 0600: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), SecretsError> {
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

fn read_key(path: &Path) -> Result<SecretKey, SecretsError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretsError::Permissions(path.to_owned(), mode));
    }
    let text = match fs::read_to_string(path) {
        Ok(text) => Zeroizing::new(text),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(denied(path)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut bytes = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), bytes.as_mut())
        .map_err(|_| SecretsError::Format(path.to_owned()))?;
    Ok(SecretKey::from_bytes(*bytes))
}

/// Refuses a state directory that other users can write to: they could replace the
/// control socket, the database or a key file with their own.
pub fn check_state_dir(dir: &Path) -> Result<(), SecretsError> {
    let mode = fs::metadata(dir).map_err(io_err(dir))?.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(SecretsError::OpenDirectory(dir.to_owned(), mode & 0o777));
    }
    Ok(())
}

/// 32 bytes from the operating system's secure random source.
pub fn random_bytes() -> [u8; 32] {
    crate::random::random_bytes()
}

/// Where a key comes from: the credentials directory if it has the file, else the
/// state directory.
fn locate(state_dir: &Path, credentials_dir: Option<&Path>, name: &str) -> PathBuf {
    if let Some(dir) = credentials_dir {
        let p = dir.join(name);
        if p.exists() {
            return p;
        }
    }
    state_dir.join(name)
}

/// Reads a key; creates it in the state directory if it does not exist and `create`.
fn load_or_create(
    state_dir: &Path,
    creds: Option<&Path>,
    name: &str,
    create: bool,
) -> Result<(SecretKey, bool), SecretsError> {
    let path = locate(state_dir, creds, name);
    // Not `exists()`: it says "no" for a file this user may not reach, and the advice
    // for a missing key (create one) is wrong for a key that is there.
    match fs::metadata(&path) {
        Ok(_) => return Ok((read_key(&path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(denied(&path));
        }
        Err(_) if create => {}
        Err(_) => {
            return Err(match fs::metadata(state_dir) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => denied(&path),
                Err(_) => SecretsError::NoStateDir(state_dir.to_owned(), running_daemons()),
                Ok(_) => SecretsError::Missing(path, running_daemons()),
            })
        }
    }
    let key = SecretKey::from_bytes(random_bytes());
    write_secret_file(&path, hex::encode(key.expose()).as_bytes())?;
    Ok((key, true))
}

/// The server's two key files.
pub struct ServerSecrets {
    /// The static secret `s`.
    pub static_secret: StaticSecret,
    /// The key that wraps identity keys in the store.
    pub store_key: SecretKey,
    /// Whether any of them was created by this call (first start).
    pub created: bool,
}

impl std::fmt::Debug for ServerSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSecrets")
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl ServerSecrets {
    /// Loads the secrets, creating the state directory (0700) and missing keys if `create`.
    pub fn load(
        state_dir: &Path,
        credentials_dir: Option<&Path>,
        create: bool,
    ) -> Result<Self, SecretsError> {
        if create && !state_dir.exists() {
            fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
            fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err(state_dir))?;
        }
        let (server, b) = load_or_create(state_dir, credentials_dir, SERVER_KEY, create)?;
        let (store_key, c) = load_or_create(state_dir, credentials_dir, STORE_KEY, create)?;
        Ok(ServerSecrets {
            static_secret: StaticSecret::from(*server.expose()),
            store_key,
            created: b || c,
        })
    }

    /// The enrollment parameters of the protocol core.
    pub fn enroll_params(&self, allow_open: bool) -> ServerParams {
        ServerParams {
            static_secret: self.static_secret.clone(),
            allow_open,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = ServerSecrets::load(&state, None, true).unwrap();
        assert!(a.created);
        for name in [SERVER_KEY, STORE_KEY] {
            let mode = fs::metadata(state.join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let b = ServerSecrets::load(&state, None, false).unwrap();
        assert!(!b.created);
        assert!(a.store_key.ct_eq(&b.store_key));
        assert_eq!(a.static_secret.to_bytes(), b.static_secret.to_bytes());
        // no temporary files left behind
        assert_eq!(fs::read_dir(&state).unwrap().count(), 2);
    }

    #[test]
    fn bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("tally.cred")), Path::new("."));
        assert_eq!(parent_dir(Path::new("a/tally.cred")), Path::new("a"));
        assert_eq!(parent_dir(Path::new("/tally.cred")), Path::new("/"));
    }

    #[test]
    fn missing_key_without_create_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ServerSecrets::load(dir.path(), None, false),
            Err(SecretsError::Missing(..))
        ));
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        ServerSecrets::load(dir.path(), None, true).unwrap();
        fs::set_permissions(
            dir.path().join(SERVER_KEY),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            ServerSecrets::load(dir.path(), None, false),
            Err(SecretsError::Permissions(_, 0o644))
        ));
    }

    #[test]
    fn credentials_directory_takes_precedence() {
        let state = tempfile::tempdir().unwrap();
        let creds = tempfile::tempdir().unwrap();
        write_secret_file(&creds.path().join(STORE_KEY), "ab".repeat(32).as_bytes()).unwrap();
        let s = ServerSecrets::load(state.path(), Some(creds.path()), true).unwrap();
        assert_eq!(s.store_key.expose(), &[0xab; 32]);
        assert!(!state.path().join(STORE_KEY).exists());
    }

    #[test]
    fn garbage_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_secret_file(&dir.path().join(STORE_KEY), b"not hex").unwrap();
        assert!(matches!(
            load_or_create(dir.path(), None, STORE_KEY, false),
            Err(SecretsError::Format(_))
        ));
    }
}
