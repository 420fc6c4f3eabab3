//! The C library's credential reader, `read_credential` of c/examples/common.h (what C
//! programs copy to read the file `tally enroll` writes, spec 9.2), compiled by
//! build.rs, against the Rust client's reader and the model of
//! `common/credential_model.rs`.
//!
//! The C code is built by the system's C compiler without coverage instrumentation:
//! libFuzzer is steered by the Rust reader and the model, run on the same input.
#![no_main]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tally::proto::credential::Credential;

#[path = "common/credential_model.rs"]
mod model;

extern "C" {
    fn tally_fuzz_read_credential(
        path: *const std::ffi::c_char,
        id: *mut [u8; 65],
        key: *mut [u8; 32],
        server: *mut [u8; 256],
    ) -> i32;
}

/// The file the C reader reads (it takes a path): one per process, mode 0600.
fn path() -> &'static (PathBuf, std::ffi::CString) {
    static PATH: OnceLock<(PathBuf, std::ffi::CString)> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let p = dir.join(format!("tally-fuzz-{}.cred", std::process::id()));
        let c = std::ffi::CString::new(p.to_str().expect("UTF-8 path")).expect("no NUL");
        (p, c)
    })
}

/// `read_credential` on `data`: the id, key and server, or `None` (refused).
fn read_c(data: &[u8]) -> Option<(String, [u8; 32], String)> {
    let (p, c) = path();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .expect("temporary file");
    f.write_all(data).expect("written");
    drop(f);
    let (mut id, mut key, mut server) = ([0u8; 65], [0u8; 32], [0u8; 256]);
    let r = unsafe { tally_fuzz_read_credential(c.as_ptr(), &mut id, &mut key, &mut server) };
    if r != 0 {
        assert_eq!(r, -1);
        // A refusal leaves nothing of the key (or anything else) behind.
        assert!(
            id.iter().chain(&key).chain(&server).all(|&b| b == 0),
            "not wiped"
        );
        return None;
    }
    let s = |b: &[u8]| {
        let n = b.iter().position(|&c| c == 0).expect("NUL-terminated");
        b[..n].to_vec()
    };
    let (id, server) = (s(&id), s(&server));
    // What it accepts fits: an id of 1..=64 bytes, a server of 1..=255, no quote.
    assert!((1..=64).contains(&id.len()) && (1..=255).contains(&server.len()));
    assert!(!id.contains(&b'"') && !server.contains(&b'"'));
    Some((
        String::from_utf8_lossy(&id).into_owned(),
        key,
        String::from_utf8_lossy(&server).into_owned(),
    ))
}

fuzz_target!(|data: &[u8]| {
    let c = read_c(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let rust = Credential::from_file(text)
        .ok()
        .map(|r| (r.id.as_str().to_owned(), *r.key.expose(), r.server.clone()));
    // Where both read the file, they read the same credential (the C reader may refuse
    // TOML beyond the minimal form, spec 9.2, but must not misread it).
    if let (Some(c), Some(r)) = (&c, &rust) {
        assert_eq!(c, r, "the C and Rust readers disagree");
    }
    // A file of the minimal form with a valid credential is read (lines within the C
    // reader's 511 bytes).
    if let Some(entries) = model::minimal(text) {
        if let Some(want) = model::expected(&entries) {
            if !want.2.is_empty() && want.2.len() <= 255 && text.split('\n').all(|l| l.len() < 511)
            {
                assert_eq!(c.as_ref(), Some(&want), "minimal form {entries:?}");
            }
        }
    }
    // The file `tally enroll` writes for what the Rust reader accepts is read by the C
    // reader with the same values, when the values need no escape (spec 9.2: ids and
    // addresses need none).
    if let Some(r) = &rust {
        if !r.2.is_empty()
            && r.2.len() <= 255
            && r.2
                .chars()
                .all(|ch| ch != '"' && ch != '\\' && !ch.is_control())
        {
            let written = Credential::from_file(text).unwrap().to_file();
            assert_eq!(
                read_c(written.as_bytes()).as_ref(),
                Some(r),
                "{:?}",
                *written
            );
        }
    }
});
