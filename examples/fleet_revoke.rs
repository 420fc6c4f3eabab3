//! A revocation across a fleet, timed: from `tallyd revoke` started on one node to the
//! CLOSE `REVOKED` that a session held by another node receives (`benches/fleet.sh`,
//! `benches/README.md` section 8).
//!
//! Usage: `fleet_revoke TALLYD NODE_A_CONFIG CRED_DIR NODE_B_ADDR N`: for each of
//! `bench-0 .. bench-(N-1)` in CRED_DIR (credentials `tally bench` enrolled), opens a
//! session on node B, makes one request, then revokes the identity through node A's
//! control socket, and prints the medians and the worst of: the revoke command's run
//! (a process start, the store's transaction, the answer) and the CLOSE's arrival.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tally::client::{Client, ClientError, ClientOptions};
use tally::proto::credential::Credential;
use tally::proto::CloseCode;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [tallyd, config, dir, node_b, n] = &args[..] else {
        bail!("usage: fleet_revoke TALLYD NODE_A_CONFIG CRED_DIR NODE_B_ADDR N");
    };
    let n: usize = n.parse().context("N")?;
    let (mut commands, mut closes) = (Vec::new(), Vec::new());
    for i in 0..n {
        let path = std::path::Path::new(dir).join(format!("bench-{i}.cred"));
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let mut cred = Credential::from_file(&text)?;
        cred.server = node_b.clone();
        let (client, _incoming) = Client::connect(&cred, ClientOptions::default()).await?;
        // Answered: the session is established (claimed and registered) on node B.
        client.request(&b"ping"[..]).await?;
        let start = Instant::now();
        let closed = tokio::spawn(async move { (client.closed().await, Instant::now()) });
        let out = tokio::process::Command::new(tallyd)
            .args(["--config", config, "revoke", cred.id.as_str()])
            .output()
            .await?;
        let command = start.elapsed();
        ensure!(
            out.status.success(),
            "tallyd revoke: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (why, at) = tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .context("no CLOSE within 5 s of the revocation")??;
        match why {
            ClientError::Closed { code, .. } if code == CloseCode::REVOKED => {}
            other => bail!("the session ended otherwise: {other}"),
        }
        commands.push(command);
        closes.push(at.duration_since(start));
    }
    for (what, mut xs) in [
        ("revoke command ran", commands),
        ("CLOSE REVOKED arrived on node B", closes),
    ] {
        xs.sort();
        println!(
            "{what}: median {:.1} ms, p90 {:.1} ms, max {:.1} ms ({} revocations)",
            ms(xs[xs.len() / 2]),
            ms(xs[xs.len() * 9 / 10]),
            ms(xs[xs.len() - 1]),
            xs.len()
        );
    }
    Ok(())
}
