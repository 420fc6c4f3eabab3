//! Compiles the C credential reader of c/examples/common.h for the `c_credential` target.
fn main() {
    println!("cargo:rerun-if-changed=c_credential.c");
    println!("cargo:rerun-if-changed=../c/examples/common.h");
    cc::Build::new()
        .file("c_credential.c")
        .warnings(true)
        .compile("tally_fuzz_c_credential");
}
