//! Criterion benchmarks of the protocol core, each beside the floor it is measured
//! against in the same run (see benches/README.md for figures and ratios):
//!
//! - `frame/{tally,hmac}/N`: seal + open of a REQUEST with an N-byte payload in the
//!   authenticated mode, against HMAC-SHA256 computed and verified over the same bytes
//!   with a precomputed key;
//! - `frame/{tally-encrypted,chacha20poly1305}/N`: the same in the encrypted mode,
//!   against ChaCha20-Poly1305 sealing and opening the same bytes (the crate Tally uses);
//! - `aead/{chacha20poly1305,aes256gcm,aes256gcm-soft}/N`: the AEAD choice (spec 13.13):
//!   seal + open with RustCrypto's ChaCha20-Poly1305, OpenSSL's AES-256-GCM with the
//!   CPU's AES instructions, and the same without them (`OPENSSL_ia32cap` masks AES-NI
//!   and PCLMULQDQ for that group only when the benchmark is run with
//!   `TALLY_BENCH_SOFT_AES=1`: OpenSSL reads the mask once per process);
//! - `handshake/{tally,tally-encrypted}`: a whole session handshake, both sides, in each
//!   mode;
//! - `enroll/{tally,x25519}`: a whole enrollment, both sides, against the six X25519
//!   operations it needs (two key generations, four Diffie-Hellman).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::hint::black_box;
use tally::proto::enroll::{ClientAwaitReply, ClientParams, ServerAwaitConfirm, ServerParams};
use tally::proto::frame::{EnrollMode, Id};
use tally::proto::handshake::{ClientAwaitAuth, HelloReceived, ServerLimits};
use tally::proto::{Body, Mode, SecretKey, Session};
use x25519_dalek::{PublicKey, StaticSecret};

fn pair(mode: Mode) -> (Session, Session) {
    tally::proto::testing::session_pair_in(mode, 1 << 20)
}

/// Seal + open with RustCrypto's ChaCha20-Poly1305, in place, detached tag.
fn chacha_round(cipher: &chacha20poly1305::ChaCha20Poly1305, ad: &[u8], buf: &mut [u8]) {
    use chacha20poly1305::aead::AeadInOut;
    let nonce = [0u8; 12];
    let tag = cipher
        .encrypt_inout_detached((&nonce).into(), ad, (&mut *buf).into())
        .unwrap();
    cipher
        .decrypt_inout_detached((&nonce).into(), ad, buf.into(), &tag)
        .unwrap();
}

/// Seal + open with OpenSSL's AES-256-GCM.
fn aes_gcm_round(key: &[u8; 32], ad: &[u8], data: &[u8]) {
    use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
    let nonce = [0u8; 12];
    let mut tag = [0u8; 16];
    let ct = encrypt_aead(Cipher::aes_256_gcm(), key, Some(&nonce), ad, data, &mut tag).unwrap();
    black_box(decrypt_aead(Cipher::aes_256_gcm(), key, Some(&nonce), ad, &ct, &tag).unwrap());
}

fn aead(c: &mut Criterion) {
    use chacha20poly1305::KeyInit as _;
    let soft = std::env::var_os("TALLY_BENCH_SOFT_AES").is_some();
    let mut g = c.benchmark_group("aead");
    let cipher = chacha20poly1305::ChaCha20Poly1305::new((&[7u8; 32]).into());
    for size in [64usize, 1024, 16 * 1024] {
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0xabu8; size];
        let ad = [0u8; 13];
        g.bench_with_input(BenchmarkId::new("chacha20poly1305", size), &size, |b, _| {
            b.iter(|| chacha_round(&cipher, &ad, &mut buf))
        });
        let data = vec![0xabu8; size];
        let name = if soft { "aes256gcm-soft" } else { "aes256gcm" };
        g.bench_with_input(BenchmarkId::new(name, size), &data, |b, data| {
            b.iter(|| aes_gcm_round(&[7; 32], &ad, data))
        });
    }
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for size in [0usize, 64, 1024, 16 * 1024] {
        g.throughput(Throughput::Bytes(size as u64));
        // The payload as a caller hands it over (moved in, as a backend's reply is): a
        // static buffer, so that cloning it for each frame here costs nothing, as a move
        // would not (a clone of a shared `Bytes` is two atomic operations).
        let payload = Bytes::from_static(Box::leak(vec![0xab; size].into_boxed_slice()));
        for (name, mode) in [
            ("tally", Mode::Authenticated),
            ("tally-encrypted", Mode::Encrypted),
        ] {
            let (mut client, mut server) = pair(mode);
            let mut out = BytesMut::with_capacity(size + 64);
            g.bench_with_input(BenchmarkId::new(name, size), &payload, |b, payload| {
                b.iter(|| {
                    client
                        .seal(
                            &Body::Request {
                                payload: payload.clone(),
                            },
                            &mut out,
                        )
                        .unwrap();
                    let frame = server.open(out.split().freeze()).unwrap();
                    black_box(frame);
                })
            });
        }
        // The encrypted mode's floor: the AEAD alone over the same bytes.
        {
            use chacha20poly1305::KeyInit as _;
            let cipher = chacha20poly1305::ChaCha20Poly1305::new((&[7u8; 32]).into());
            let mut buf = vec![0xabu8; size];
            let ad = [0u8; 13];
            g.bench_with_input(BenchmarkId::new("chacha20poly1305", size), &size, |b, _| {
                b.iter(|| chacha_round(&cipher, &ad, &mut buf))
            });
        }
        // The floor: one HMAC to tag the frame's bytes, one to verify them.
        let key = Hmac::<Sha256>::new_from_slice(&[7; 32]).unwrap();
        let bytes = vec![0xabu8; size + 13];
        g.bench_with_input(BenchmarkId::new("hmac", size), &bytes, |b, bytes| {
            b.iter(|| {
                let mut m = key.clone();
                m.update(bytes);
                let tag = m.finalize().into_bytes();
                let mut v = key.clone();
                v.update(black_box(bytes));
                v.verify_slice(&tag).unwrap();
            })
        });
    }
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let id = Id::new("bench").unwrap();
    let s_pub = PublicKey::from(&StaticSecret::from([0x20; 32])).to_bytes();
    for (name, mode) in [
        ("tally", Mode::Authenticated),
        ("tally-encrypted", Mode::Encrypted),
    ] {
        c.bench_function(&format!("handshake/{name}"), |b| {
            b.iter(|| {
                let mut hello = BytesMut::new();
                let client = match mode {
                    Mode::Authenticated => ClientAwaitAuth::start(
                        &id,
                        SecretKey::from_bytes([9; 32]),
                        [1; 32],
                        65536,
                        &mut hello,
                    ),
                    Mode::Encrypted => ClientAwaitAuth::start_sealed(
                        &id,
                        SecretKey::from_bytes([9; 32]),
                        &s_pub,
                        &mut [1; 32],
                        65536,
                        &mut hello,
                    )
                    .unwrap(),
                };
                let mut auth = BytesMut::new();
                let server = HelloReceived::parse(
                    &hello,
                    &tally::proto::handshake::ServerKey::from(&x25519_dalek::StaticSecret::from(
                        [0x20; 32],
                    )),
                )
                .unwrap()
                .respond(
                    Some(SecretKey::from_bytes([9; 32])),
                    SecretKey::from_bytes([0; 32]),
                    &mut [2; 32],
                    ServerLimits {
                        max_frame_len: 65536,
                        keepalive: std::time::Duration::from_secs(30),
                    },
                    &mut auth,
                );
                let mut fin = BytesMut::new();
                let s = client.handle_server_auth(&auth, &mut fin).unwrap();
                black_box((s, server.handle_finish(&fin).unwrap()));
            })
        });
    }
}

fn enroll(c: &mut Criterion) {
    let srv = ServerParams {
        static_secret: StaticSecret::from([2; 32]),
        allow_open: true,
    };
    let id = Id::new("bench").unwrap();
    let params = ClientParams {
        id: id.clone(),
        mode: EnrollMode::Token,
        credential: SecretKey::from_bytes([1; 32]),
        server_static: srv.static_public(),
    };
    let mut g = c.benchmark_group("enroll");
    g.bench_function("tally", |b| {
        b.iter(|| {
            let mut init = BytesMut::new();
            let client = ClientAwaitReply::start(params.clone(), [3; 32], &mut init);
            let mut reply = BytesMut::new();
            let server = ServerAwaitConfirm::handle_init(
                &srv,
                &init,
                |_, _| SecretKey::from_bytes([1; 32]),
                [4; 32],
                &mut reply,
            )
            .unwrap();
            let mut confirm = BytesMut::new();
            let client = client.handle_reply(&reply, &mut confirm).unwrap();
            let pending = server.handle_confirm(&confirm).unwrap();
            let mut done = BytesMut::new();
            pending.committed(&mut done);
            black_box(client.handle_done(&done).unwrap());
        })
    });
    let s_pub = srv.static_public();
    g.bench_function("x25519", |b| {
        b.iter(|| {
            let x = StaticSecret::from(black_box([3; 32]));
            let y = StaticSecret::from(black_box([4; 32]));
            let (xp, yp) = (PublicKey::from(&x), PublicKey::from(&y));
            let a = x.diffie_hellman(&yp);
            let b2 = x.diffie_hellman(&PublicKey::from(s_pub));
            let c2 = y.diffie_hellman(&xp);
            let d = srv.static_secret.diffie_hellman(&xp);
            black_box((a, b2, c2, d));
        })
    });
    g.finish();
}

criterion_group!(benches, frames, aead, handshake, enroll);
criterion_main!(benches);
