//! The spec is enough: `spec/vectors/check.py`, an implementation written from
//! `spec/PROTOCOL.md` alone in standard-library Python, reproduces every vector.

mod common;

use std::process::Command;

#[test]
fn independent_python_implementation_reproduces_the_vectors() {
    if !common::python3_or_skip("independent_python_implementation_reproduces_the_vectors") {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/spec/vectors/check.py");
    let out = Command::new("python3")
        .arg(script)
        .output()
        .expect("python3 runs spec/vectors/check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all values reproduced"), "{stdout}");
}
