//! The operating system's secure random source: every nonce, ephemeral key and key
//! the crate makes comes from here (the protocol core takes them from its caller).

/// 32 bytes from the operating system's secure random source.
pub(crate) fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the operating system's random source failed");
    b
}
