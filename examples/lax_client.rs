//! A deliberately broken client, for `tests/conformance.rs`: it speaks the protocol
//! (HELLO, the key schedule, CLIENT_FINISH, REQUEST) but checks nothing it receives: no
//! SERVER_AUTH tag, no sequence numbers, no frame tags, no length limit, no ERROR. It
//! prints the payload of the first RESPONSE-shaped frame. `tally conformance client`
//! must catch it. Never use it for anything else.
//!
//!     lax_client CREDENTIAL-FILE PAYLOAD

use std::io::{Read, Write};
use std::net::TcpStream;

use tally::proto::credential::Credential;
use tally::proto::schedule::{hmac, SessionKeys, Transcript};

fn read_frame(tcp: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    tcp.read_exact(&mut len)?;
    // No limit: the defect under test.
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_be_bytes(len) as usize, 0);
    tcp.read_exact(&mut frame[4..])?;
    Ok(frame)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).expect("credential");
    let cred = Credential::from_file(&text).expect("credential");
    let mut tcp = TcpStream::connect(&cred.server).expect("connect");
    let nc = [0x5a; 32];
    let id = cred.id.as_str().as_bytes();
    let mut hello = ((39 + id.len()) as u32).to_be_bytes().to_vec();
    hello.extend_from_slice(&[0x10, 1, id.len() as u8]);
    hello.extend_from_slice(id);
    hello.extend_from_slice(&nc);
    hello.extend_from_slice(&65536u32.to_be_bytes());
    tcp.write_all(&hello).unwrap();
    let auth = read_frame(&mut tcp).expect("SERVER_AUTH");
    if auth.len() < 77 {
        std::process::exit(1);
    }
    let mut transcript = Transcript::default();
    transcript.update(&hello);
    transcript.update(&auth[..45]);
    let th2 = transcript.hash();
    let ns: [u8; 32] = auth[5..37].try_into().unwrap();
    let keys = SessionKeys::derive(&cred.key, &nc, &ns, &th2);
    // The SERVER_AUTH tag is not checked: the defect under test.
    transcript.update(&auth[45..77]);
    let header = [0, 0, 0, 33, 0x12];
    transcript.update(&header);
    let tag = hmac(keys.client_finish.expose(), &[&transcript.hash()]);
    let mut finish = header.to_vec();
    finish.extend_from_slice(&tag);
    let payload = args[2].as_bytes();
    let mut request = ((41 + payload.len()) as u32).to_be_bytes().to_vec();
    request.push(0x20);
    request.extend_from_slice(&1u64.to_be_bytes());
    request.extend_from_slice(payload);
    let tag = hmac(keys.c2s.expose(), &[&request]);
    request.extend_from_slice(&tag);
    tcp.write_all(&finish).unwrap();
    tcp.write_all(&request).unwrap();
    // Any RESPONSE-shaped frame is taken, whatever its tag, sequence number or req_seq.
    loop {
        let Ok(frame) = read_frame(&mut tcp) else {
            std::process::exit(1)
        };
        if frame.len() >= 4 + 1 + 8 + 10 + 32 && frame[4] == 0x21 {
            let body = &frame[4 + 1 + 8 + 10..frame.len() - 32];
            std::io::stdout().write_all(body).unwrap();
            return;
        }
    }
}
