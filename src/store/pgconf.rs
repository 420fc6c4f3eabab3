//! The connection settings of the shared store (`store = "postgres://..."`): the parts
//! of libpq's that the driver does not know, handled here.
//!
//! * **TLS.** libpq's `sslmode` (`disable`, `prefer`, the default, `require`,
//!   `verify-ca`, `verify-full`), `sslrootcert` (a PEM file of the CAs to trust, or
//!   `system`), `sslcert` and `sslkey` (a client certificate) are taken out of the URL
//!   ([`Settings::parse`]); the rest goes to `tokio_postgres::Config`. One OpenSSL
//!   connector ([`TlsSettings::connector`]) serves the pool and the fleet's notification
//!   connection. As in libpq, a root certificate makes `prefer` and `require` verify the
//!   server's chain (as `verify-ca`); only `verify-full` checks the host name too.
//! * **The password** ([`resolve_password`]), first found of: the URL, the systemd
//!   credential [`CREDENTIAL`], `store_password_file`, `$PGPASSWORD`, the password file
//!   of libpq (`$PGPASSFILE`, else `~/.pgpass`). The files holding it must not be
//!   readable by others.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use postgres_openssl::MakeTlsConnector;
use zeroize::Zeroizing;

/// The systemd credential holding the database password (`LoadCredential=db-password:FILE`),
/// read from `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL: &str = "db-password";

/// The longest password file read.
const MAX_PASSWORD_FILE: u64 = 64 * 1024;

/// Connection settings that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgConfError {
    /// The driver refuses the rest of the URL.
    #[error("not a valid connection URL: {0}")]
    Url(String),
    /// An `sslmode` libpq does not have.
    #[error("sslmode={0:?} is not a mode tallyd knows: use disable, prefer, require, verify-ca or verify-full")]
    BadMode(String),
    /// `verify-ca` or `verify-full` without the CA to verify with.
    #[error("sslmode={0} needs sslrootcert=FILE (the PEM certificate of the CA that signed the database server's certificate) in the store URL, or sslrootcert=system for the system's CAs")]
    NoRootCert(SslMode),
    /// `sslrootcert=system` with a mode that does not verify the host (as libpq).
    #[error("sslrootcert=system needs sslmode=verify-full (any certificate from a public CA would pass a weaker check)")]
    SystemWeak,
    /// Only one of `sslcert`, `sslkey`.
    #[error(
        "sslcert and sslkey go together: give both (the client certificate and its key) or neither"
    )]
    HalfClientCert,
    /// A TLS file cannot be used.
    #[error("{path}: cannot use it as {what}: {reason}")]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Which setting (`the CA certificate (sslrootcert)`...).
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The client key is readable by others.
    #[error("{0}: mode {1:o} lets other users read the client key (sslkey); run `chmod 600 {0}`")]
    KeyMode(PathBuf, u32),
    /// OpenSSL failed to set up.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// A file meant to hold the password is readable by others.
    #[error("{0}: mode {1:o} lets other users read the database password; run `chmod 600 {0}` (owned by the user tallyd runs as), or pass it as the systemd credential {CREDENTIAL}")]
    PasswordFileMode(PathBuf, u32),
    /// The password file cannot be read.
    #[error("{path}: cannot read the database password: {source}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The password file holds nothing.
    #[error("{0}: the database password file is empty")]
    EmptyPassword(PathBuf),
    /// A password in the URL and a password file: which one is meant?
    #[error("the store URL holds a password and store_password_file is set too: keep one (better the file: a configuration file holding a password must not be readable by other users)")]
    TwoPasswords,
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it (unverified unless `sslrootcert` is given).
    #[default]
    Prefer,
    /// TLS or nothing (verified as `verify-ca` if `sslrootcert` is given).
    Require,
    /// TLS, the server's certificate signed by `sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the host connected to.
    VerifyFull,
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

impl std::str::FromStr for SslMode {
    type Err = PgConfError;

    fn from_str(s: &str) -> Result<Self, PgConfError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            // `allow` (plaintext first, TLS if refused) is not worth its weakness here.
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(PgConfError::BadMode(other.to_owned())),
        })
    }
}

/// The CAs that verify the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// The certificates of a PEM file.
    File(PathBuf),
    /// The system's trusted CAs (`sslrootcert=system`).
    System,
}

/// The TLS parameters of the URL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_cert: Option<RootCert>,
    /// `sslcert`: a client certificate (PEM, with its chain).
    pub cert: Option<PathBuf>,
    /// `sslkey`: its private key (PEM).
    pub key: Option<PathBuf>,
}

/// A `store` URL, parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What the driver takes (its `sslmode` set from [`TlsSettings::mode`]).
    pub config: tokio_postgres::Config,
    /// TLS.
    pub tls: TlsSettings,
}

/// The parameters taken out of the URL for [`TlsSettings`].
const TLS_PARAMS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Percent-decodes `s` (a `%` not followed by two hex digits stays as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits `url` into what the driver gets (the URL without the TLS parameters) and the
/// TLS parameters (`name`, decoded value), in order. A string that is not a
/// `postgres://` URL (libpq's `key=value` form) is returned whole.
fn split_tls_params(url: &str) -> (String, Vec<(String, String)>) {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return (url.to_owned(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut tls = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k);
        if TLS_PARAMS.contains(&k.as_str()) {
            tls.push((k, percent_decode(v)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, tls)
}

/// `url` without its TLS parameters, as the driver parses it (for [`super::redacted`]).
pub fn without_tls_params(url: &str) -> String {
    split_tls_params(url).0
}

impl Settings {
    /// Parses a `store` URL (`postgres://user@host:port/db?param=value&...`).
    pub fn parse(url: &str) -> Result<Settings, PgConfError> {
        let (rest, params) = split_tls_params(url);
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| PgConfError::Url(e.to_string()))?;
        let mut tls = TlsSettings::default();
        for (name, value) in params {
            match name.as_str() {
                "sslmode" => tls.mode = value.parse()?,
                "sslrootcert" if value == "system" => tls.root_cert = Some(RootCert::System),
                "sslrootcert" => tls.root_cert = Some(RootCert::File(value.into())),
                "sslcert" => tls.cert = Some(value.into()),
                "sslkey" => tls.key = Some(value.into()),
                _ => unreachable!("TLS_PARAMS"),
            }
        }
        tls.check()?;
        // PostgreSQL has no TLS on Unix sockets; libpq ignores sslmode there.
        let tcp = config
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Tcp(_)));
        config.ssl_mode(match tls.mode {
            _ if !tcp => tokio_postgres::config::SslMode::Disable,
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(Settings { config, tls })
    }

    /// Whether the URL itself holds a password (`user:password@`, `?password=`).
    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }
}

impl TlsSettings {
    fn check(&self) -> Result<(), PgConfError> {
        let verify = matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull);
        if verify && self.root_cert.is_none() {
            return Err(PgConfError::NoRootCert(self.mode));
        }
        if self.root_cert == Some(RootCert::System) && self.mode != SslMode::VerifyFull {
            return Err(PgConfError::SystemWeak);
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(PgConfError::HalfClientCert);
        }
        Ok(())
    }

    /// Whether the server's certificate chain is verified.
    pub fn verifies(&self) -> bool {
        self.mode != SslMode::Disable && self.root_cert.is_some()
    }

    /// The connector of the pool and the notification connection. Reads the files now:
    /// a CA file that cannot be read fails the start, not every connection.
    pub fn connector(&self) -> Result<MakeTlsConnector, PgConfError> {
        let ssl = |e: openssl::error::ErrorStack| PgConfError::Tls(e.to_string());
        let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(ssl)?;
        // As libpq's default ssl_min_protocol_version.
        b.set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(ssl)?;
        match &self.root_cert {
            Some(RootCert::File(path)) => {
                let what = "the CA certificate (sslrootcert)";
                let bad = |reason: String| PgConfError::TlsFile {
                    path: path.clone(),
                    what,
                    reason,
                };
                let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
                let certs = X509::stack_from_pem(&pem)
                    .map_err(|e| bad(format!("not PEM certificates ({e})")))?;
                if certs.is_empty() {
                    return Err(bad("it holds no PEM certificate".into()));
                }
                // Only these CAs: not the system's too (SslConnector's default).
                let mut store = X509StoreBuilder::new().map_err(ssl)?;
                for cert in certs {
                    store.add_cert(cert).map_err(ssl)?;
                }
                b.set_cert_store(store.build());
                b.set_verify(SslVerifyMode::PEER);
            }
            Some(RootCert::System) => {
                b.set_default_verify_paths().map_err(ssl)?;
                b.set_verify(SslVerifyMode::PEER);
            }
            None => b.set_verify(SslVerifyMode::NONE),
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            b.set_certificate_chain_file(cert)
                .map_err(|e| PgConfError::TlsFile {
                    path: cert.clone(),
                    what: "the client certificate (sslcert)",
                    reason: e.to_string(),
                })?;
            check_key_mode(key)?;
            b.set_private_key_file(key, SslFiletype::PEM)
                .and_then(|()| b.check_private_key())
                .map_err(|e| PgConfError::TlsFile {
                    path: key.clone(),
                    what: "the client key (sslkey)",
                    reason: e.to_string(),
                })?;
        }
        let mut connector = MakeTlsConnector::new(b.build());
        let full = self.mode == SslMode::VerifyFull;
        connector.set_callback(move |c, _host| {
            c.set_verify_hostname(full);
            Ok(())
        });
        Ok(connector)
    }

    /// A driver's error message, with what to do about it when it is about TLS.
    pub fn explain(&self, message: String) -> String {
        let mode = self.mode;
        if message.contains("server does not support TLS") {
            return format!(
                "the server does not offer TLS and sslmode={mode} requires it: turn on ssl in the server's postgresql.conf (with its certificate and key), or connect to a server that has it ({message})"
            );
        }
        if message.contains("certificate verify failed") {
            let ca = match &self.root_cert {
                Some(RootCert::File(p)) => format!("sslrootcert={}", p.display()),
                _ => "the system's CAs (sslrootcert=system)".to_owned(),
            };
            if message.contains("mismatch") {
                return format!(
                    "the server's certificate does not name the host of the store URL (sslmode=verify-full checks it): connect by a name or address the certificate holds ({message})"
                );
            }
            return format!(
                "the server's certificate does not verify against {ca}: the wrong CA file, or an expired certificate ({message})"
            );
        }
        message
    }
}

/// libpq's rule for a client key: 0600 or less if ours, 0640 or less if root's.
fn check_key_mode(key: &Path) -> Result<(), PgConfError> {
    let meta = std::fs::metadata(key).map_err(|e| PgConfError::TlsFile {
        path: key.to_owned(),
        what: "the client key (sslkey)",
        reason: e.to_string(),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(PgConfError::KeyMode(key.to_owned(), mode));
    }
    Ok(())
}

/// Where the password may come from besides the URL and the environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct PasswordSources<'a> {
    /// systemd's `$CREDENTIALS_DIRECTORY` (`--credentials-dir`): [`CREDENTIAL`] there.
    pub credentials_dir: Option<&'a Path>,
    /// `store_password_file`.
    pub password_file: Option<&'a Path>,
}

/// Where the password came from (for the log: never the password).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// The store URL.
    Url,
    /// The systemd credential.
    Credential(PathBuf),
    /// `store_password_file`.
    File(PathBuf),
    /// `$PGPASSWORD`.
    Environment,
    /// A line of libpq's password file.
    PgPass(PathBuf),
    /// None: the server may not ask (trust, peer, a client certificate).
    None,
}

impl std::fmt::Display for PasswordSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordSource::Url => f.write_str("the store URL"),
            PasswordSource::Credential(p) => write!(f, "the systemd credential {}", p.display()),
            PasswordSource::File(p) => write!(f, "store_password_file {}", p.display()),
            PasswordSource::Environment => f.write_str("$PGPASSWORD"),
            PasswordSource::PgPass(p) => write!(f, "the password file {}", p.display()),
            PasswordSource::None => f.write_str("nowhere (none given)"),
        }
    }
}

/// Reads a password file: a regular file, not readable by group or others (checked on
/// the open file), its text up to an end-of-line.
fn read_password_file(path: &Path) -> Result<Zeroizing<String>, PgConfError> {
    let io = |source| PgConfError::PasswordFile {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PgConfError::PasswordFileMode(path.to_owned(), mode));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_PASSWORD_FILE)
        .read_to_string(&mut text)
        .map_err(io)?;
    let password = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
    if password.is_empty() {
        return Err(PgConfError::EmptyPassword(path.to_owned()));
    }
    Ok(password)
}

/// Sets `config`'s password from the first source that has one (module docs), with
/// `var` reading the environment. `warn` is told of a libpq password file ignored (as
/// libpq does) because others may read it.
pub fn resolve_password(
    config: &mut tokio_postgres::Config,
    sources: PasswordSources<'_>,
    var: &dyn Fn(&str) -> Option<OsString>,
    warn: &dyn Fn(String),
) -> Result<PasswordSource, PgConfError> {
    if config.get_password().is_some() {
        if sources.password_file.is_some() {
            return Err(PgConfError::TwoPasswords);
        }
        return Ok(PasswordSource::Url);
    }
    if let Some(dir) = sources.credentials_dir {
        let path = dir.join(CREDENTIAL);
        if path.exists() {
            config.password(read_password_file(&path)?.as_bytes());
            return Ok(PasswordSource::Credential(path));
        }
    }
    if let Some(path) = sources.password_file {
        config.password(read_password_file(path)?.as_bytes());
        return Ok(PasswordSource::File(path.to_owned()));
    }
    if let Some(pw) = var("PGPASSWORD").filter(|v| !v.is_empty()) {
        config.password(pw.as_encoded_bytes());
        return Ok(PasswordSource::Environment);
    }
    let file = match var("PGPASSFILE") {
        Some(f) if !f.is_empty() => PathBuf::from(f),
        _ => match var("HOME") {
            Some(home) if !home.is_empty() => Path::new(&home).join(".pgpass"),
            _ => return Ok(PasswordSource::None),
        },
    };
    let Ok(meta) = std::fs::metadata(&file) else {
        return Ok(PasswordSource::None);
    };
    if !meta.is_file() {
        return Ok(PasswordSource::None);
    }
    if meta.permissions().mode() & 0o077 != 0 {
        warn(format!(
            "password file {} has group or world access and is ignored (as libpq does); permissions should be u=rw (0600) or less: chmod 600 {0}",
            file.display()
        ));
        return Ok(PasswordSource::None);
    }
    let Ok(text) = std::fs::read_to_string(&file).map(Zeroizing::new) else {
        return Ok(PasswordSource::None);
    };
    let Some(user) = config.get_user().map(str::to_owned) else {
        return Ok(PasswordSource::None);
    };
    let db = config.get_dbname().unwrap_or(&user).to_owned();
    let ports = config.get_ports().to_vec();
    for (i, host) in config.get_hosts().iter().enumerate() {
        let host = match host {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            // libpq matches a Unix socket as `localhost`.
            tokio_postgres::config::Host::Unix(_) => "localhost".to_owned(),
        };
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        if let Some(pw) = pgpass_lookup(&text, &host, port, &db, &user) {
            config.password(pw.as_bytes());
            return Ok(PasswordSource::PgPass(file));
        }
    }
    Ok(PasswordSource::None)
}

/// The password of the first line of a libpq password file (`host:port:database:user:
/// password`; `*` matches anything in the first four fields, `\` escapes `:` and `\`,
/// `#` starts a comment line) that matches.
pub fn pgpass_lookup(
    text: &str,
    host: &str,
    port: u16,
    db: &str,
    user: &str,
) -> Option<Zeroizing<String>> {
    let port = port.to_string();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        // Split on unescaped ':' into at most five fields, unescaping as we go.
        let mut fields: Vec<Zeroizing<String>> = vec![Zeroizing::new(String::new())];
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        fields.last_mut().expect("one field").push(next);
                    }
                }
                ':' if fields.len() < 5 => fields.push(Zeroizing::new(String::new())),
                c => fields.last_mut().expect("one field").push(c),
            }
        }
        if fields.len() < 5 {
            continue;
        }
        let matches = |field: &str, value: &str| field == "*" || field == value;
        if matches(&fields[0], host)
            && matches(&fields[1], &port)
            && matches(&fields[2], db)
            && matches(&fields[3], user)
            && !fields[4].is_empty()
        {
            return Some(fields.swap_remove(4));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Settings, PgConfError> {
        Settings::parse(url)
    }

    #[test]
    fn tls_parameters_are_taken_out_and_the_rest_goes_to_the_driver() {
        let s = parse(
            "postgres://tally:pw@db.example:5433/tally?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Ftally%2Fdb-ca.crt&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(s.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            s.tls.root_cert,
            Some(RootCert::File("/etc/tally/db-ca.crt".into()))
        );
        assert_eq!(s.config.get_application_name(), Some("x"));
        assert_eq!(s.config.get_dbname(), Some("tally"));
        assert_eq!(
            s.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert!(s.has_password());
        assert_eq!(
            without_tls_params("postgres://u@h/d?sslmode=require&sslrootcert=/x"),
            "postgres://u@h/d"
        );
        assert_eq!(
            without_tls_params("postgres://u@h/d?a=1&sslkey=k&b=2"),
            "postgres://u@h/d?a=1&b=2"
        );
        // The key=value form is left as it is.
        assert_eq!(
            without_tls_params("host=h sslmode=require"),
            "host=h sslmode=require"
        );
    }

    #[test]
    fn modes_default_to_prefer_and_map_onto_the_driver() {
        use tokio_postgres::config::SslMode as Driver;
        let s = parse("postgres://u@h/d").unwrap();
        assert_eq!(s.tls.mode, SslMode::Prefer);
        assert_eq!(s.config.get_ssl_mode(), Driver::Prefer);
        assert!(!s.has_password());
        assert!(!s.tls.verifies());
        for (mode, driver) in [
            ("disable", Driver::Disable),
            ("prefer", Driver::Prefer),
            ("require", Driver::Require),
            ("verify-ca", Driver::Require),
            ("verify-full", Driver::Require),
        ] {
            let s = parse(&format!(
                "postgres://u@h/d?sslmode={mode}&sslrootcert=ca.pem"
            ))
            .unwrap();
            assert_eq!(s.tls.mode.to_string(), mode);
            assert_eq!(s.config.get_ssl_mode(), driver, "{mode}");
            assert_eq!(s.tls.verifies(), mode != "disable", "{mode}");
        }
        // require without a CA: encrypted, not verified.
        assert!(!parse("postgres://u@h/d?sslmode=require")
            .unwrap()
            .tls
            .verifies());
        // No TLS on Unix sockets.
        let s = parse("postgres://u@%2Frun%2Fpostgresql/d?sslmode=require").unwrap();
        assert_eq!(s.config.get_ssl_mode(), Driver::Disable);
    }

    #[test]
    fn what_to_fix_is_said() {
        let e = |url: &str| parse(url).unwrap_err().to_string();
        let m = e("postgres://u@h/d?sslmode=verify-full");
        assert!(
            m.contains("sslmode=verify-full needs sslrootcert=FILE"),
            "{m}"
        );
        let m = e("postgres://u@h/d?sslmode=verify-ca");
        assert!(m.contains("sslmode=verify-ca needs sslrootcert"), "{m}");
        let m = e("postgres://u@h/d?sslmode=allow");
        assert!(m.contains("\"allow\"") && m.contains("verify-full"), "{m}");
        let m = e("postgres://u@h/d?sslmode=require&sslrootcert=system");
        assert!(m.contains("verify-full"), "{m}");
        let m = e("postgres://u@h/d?sslcert=c.pem");
        assert!(m.contains("sslcert and sslkey"), "{m}");
        let m = e("postgres://u@h/d?nonsense=1");
        assert!(m.contains("not a valid connection URL"), "{m}");
        parse("postgres://u@h/d?sslmode=verify-full&sslrootcert=system").unwrap();

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing-ca.pem");
        let tls = parse(&format!(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert={}",
            missing.display()
        ))
        .unwrap()
        .tls;
        let m = tls.connector().err().unwrap().to_string();
        assert!(
            m.contains("missing-ca.pem") && m.contains("sslrootcert"),
            "{m}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let tls = parse(&format!(
            "postgres://u@h/d?sslmode=verify-ca&sslrootcert={}",
            junk.display()
        ))
        .unwrap()
        .tls;
        let m = tls.connector().err().unwrap().to_string();
        assert!(m.contains("junk.pem") && m.contains("PEM"), "{m}");
        // A connector without verification builds.
        parse("postgres://u@h/d").unwrap().tls.connector().unwrap();

        let m = tls.explain("error performing TLS handshake: server does not support TLS".into());
        assert!(
            m.contains("the server does not offer TLS and sslmode=verify-ca requires it"),
            "{m}"
        );
        let m = tls.explain("error performing TLS handshake: error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed: unable to get local issuer certificate".into());
        assert!(m.contains("does not verify against sslrootcert="), "{m}");
        assert_eq!(tls.explain("other".into()), "other");
    }

    #[test]
    fn pgpass_lines_match_as_libpq() {
        let text = "# comment\n\
                    db.example:5432:tally:tally:first\n\
                    *:*:tally:tally:second\n\
                    *:5433:*:*:any\\:thing\\\\\n\
                    esc\\:host:*:*:*:escaped\n\
                    short:line\n\
                    *:*:*:empty:\n";
        let find = |host, port, db, user| {
            pgpass_lookup(text, host, port, db, user).map(|p| p.as_str().to_owned())
        };
        assert_eq!(
            find("db.example", 5432, "tally", "tally").as_deref(),
            Some("first")
        );
        assert_eq!(
            find("other", 5432, "tally", "tally").as_deref(),
            Some("second")
        );
        assert_eq!(
            find("other", 5433, "x", "y").as_deref(),
            Some("any:thing\\")
        );
        assert_eq!(find("esc:host", 1, "x", "y").as_deref(), Some("escaped"));
        assert_eq!(find("other", 5432, "x", "y"), None);
        assert_eq!(find("short", 5432, "x", "y"), None);
        assert_eq!(find("h", 5432, "x", "empty"), None);
    }

    #[test]
    fn the_password_comes_from_the_first_source_that_has_one() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        let file = write("db-password", "from-file\n", 0o600);
        let pgpass = write("pgpass", "127.0.0.1:5432:tally:tally:from-pgpass\n", 0o600);
        let env = |pw: Option<&str>, passfile: &Path| {
            let pw = pw.map(OsString::from);
            let passfile = passfile.as_os_str().to_owned();
            move |name: &str| match name {
                "PGPASSWORD" => pw.clone(),
                "PGPASSFILE" => Some(passfile.clone()),
                _ => None,
            }
        };
        let warnings = std::cell::RefCell::new(Vec::new());
        let warn = |w: String| warnings.borrow_mut().push(w);
        let resolve =
            |url: &str, sources: PasswordSources, var: &dyn Fn(&str) -> Option<OsString>| {
                let mut c = parse(url).unwrap().config;
                let source = resolve_password(&mut c, sources, var, &warn)?;
                let pw = c
                    .get_password()
                    .map(|p| String::from_utf8(p.to_vec()).unwrap());
                Ok::<_, PgConfError>((source, pw))
            };
        let url = "postgres://tally@127.0.0.1/tally";
        let all = PasswordSources {
            credentials_dir: Some(&creds),
            password_file: Some(&file),
        };
        // The URL's own.
        let (s, pw) = resolve(
            "postgres://tally:in-url@127.0.0.1/tally",
            PasswordSources::default(),
            &env(Some("env"), &pgpass),
        )
        .unwrap();
        assert_eq!((s, pw.as_deref()), (PasswordSource::Url, Some("in-url")));
        let e = resolve("postgres://tally:in-url@h/d", all, &env(None, &pgpass)).unwrap_err();
        assert!(matches!(e, PgConfError::TwoPasswords), "{e}");
        // The credential, when it is there.
        let cred = creds.join(CREDENTIAL);
        std::fs::write(&cred, "from-credential").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o400)).unwrap();
        let (s, pw) = resolve(url, all, &env(Some("env"), &pgpass)).unwrap();
        assert_eq!(
            (s, pw.as_deref()),
            (
                PasswordSource::Credential(cred.clone()),
                Some("from-credential")
            )
        );
        std::fs::remove_file(&cred).unwrap();
        // The configured file, its end of line cut.
        let (s, pw) = resolve(url, all, &env(Some("env"), &pgpass)).unwrap();
        assert_eq!(
            (s, pw.as_deref()),
            (PasswordSource::File(file.clone()), Some("from-file"))
        );
        // ...which others must not read.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let m = resolve(url, all, &env(None, &pgpass))
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("db-password") && m.contains("640") && m.contains("chmod 600"),
            "{m}"
        );
        assert!(!m.contains("from-file"), "{m}");
        let empty = write("empty", "\n", 0o600);
        let m = resolve(
            url,
            PasswordSources {
                password_file: Some(&empty),
                ..Default::default()
            },
            &env(None, &pgpass),
        )
        .unwrap_err()
        .to_string();
        assert!(m.contains("empty"), "{m}");
        // Then $PGPASSWORD, then the password file of libpq.
        let none = PasswordSources::default();
        let (s, pw) = resolve(url, none, &env(Some("env"), &pgpass)).unwrap();
        assert_eq!(
            (s, pw.as_deref()),
            (PasswordSource::Environment, Some("env"))
        );
        let (s, pw) = resolve(url, none, &env(None, &pgpass)).unwrap();
        assert_eq!(
            (s, pw.as_deref()),
            (PasswordSource::PgPass(pgpass.clone()), Some("from-pgpass"))
        );
        let (s, pw) = resolve(
            "postgres://other@127.0.0.1/tally",
            none,
            &env(None, &pgpass),
        )
        .unwrap();
        assert_eq!((s, pw), (PasswordSource::None, None));
        assert!(warnings.borrow().is_empty());
        // A password file others may read is ignored, with a warning.
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (s, pw) = resolve(url, none, &env(None, &pgpass)).unwrap();
        assert_eq!((s, pw), (PasswordSource::None, None));
        let w = warnings.borrow();
        assert!(w.len() == 1 && w[0].contains("chmod 600"), "{w:?}");
    }
}
