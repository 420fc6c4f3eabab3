//! The Rust client's readers of what an operator hands to a device: the credential file
//! (spec 9.2, `Credential::from_file`) and the enrollment token (spec 9.1,
//! `EnrollmentToken::parse`), each against the model of `common/credential_model.rs`
//! and its own writer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::proto::credential::{Credential, EnrollmentToken};
use tally::proto::frame::EnrollMode;
use tally::proto::Id;

#[path = "common/credential_model.rs"]
mod model;

fn credential(text: &str) {
    let read = Credential::from_file(text);
    // A file of the minimal form is read exactly as the spec says.
    if let Some(entries) = model::minimal(text) {
        match (model::expected(&entries), &read) {
            (Some((id, key, server)), Ok(c)) => {
                assert_eq!(c.id.as_str(), id);
                assert_eq!(c.key.expose(), &key);
                assert_eq!(c.server, server);
            }
            (None, Err(_)) => {}
            (want, got) => panic!(
                "minimal form {entries:?}: model {}, reader {got:?}",
                want.is_some()
            ),
        }
    }
    let Ok(c) = read else { return };
    // What it accepts is a credential: an id of spec 4.1.
    assert!(Id::new(c.id.as_str()).is_ok());
    // The writer writes it back and the reader reads the same values; writing again
    // gives the same text.
    let text2 = c.to_file();
    let back = Credential::from_file(&text2).unwrap_or_else(|e| panic!("{:?}: {e}", *text2));
    assert_eq!(back.id, c.id);
    assert!(back.key.ct_eq(&c.key));
    assert_eq!(back.server, c.server);
    assert_eq!(*back.to_file(), *text2);
}

fn token(text: &str) {
    let read = EnrollmentToken::parse(text);
    match (model::token(text), &read) {
        (Some((open, cred, server)), Ok(t)) => {
            assert_eq!(
                t.mode,
                if open {
                    EnrollMode::Open
                } else {
                    EnrollMode::Token
                }
            );
            assert_eq!(t.credential.expose(), &cred);
            assert_eq!(t.server_static, server);
        }
        (None, Err(_)) => {}
        (want, got) => panic!("token {text:?}: model {}, reader {got:?}", want.is_some()),
    }
    let Ok(t) = read else { return };
    // The writer's line is the input without its whitespace, in lower case, and reads back.
    let line = t.encode();
    let trimmed = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    assert_eq!(*line, trimmed.to_ascii_lowercase());
    let back = EnrollmentToken::parse(&line).expect("the writer's token reads");
    assert_eq!(back.mode, t.mode);
    assert!(back.credential.ct_eq(&t.credential));
    assert_eq!(back.server_static, t.server_static);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    credential(text);
    token(text);
});
