//! A node's own network, for fault tests between machines on one machine: a network
//! namespace that the test creates (and removes when dropped), joined to the host by a
//! veth pair, with a *delay line* on the host side in front of the database.
//!
//! - **Loss** and **partitions** are the kernel's: nftables rules inside the namespace
//!   drop the packets between the node and the database (at random, all of them, or
//!   only new connections), so TCP retransmits and stalls as between two machines.
//! - **Latency** is the delay line's: this kernel has no `netem` queueing discipline
//!   (`tc qdisc add dev D root netem delay 10ms` answers "Specified qdisc kind is
//!   unknown"), so the bytes of each direction are held for the delay in user space on
//!   the host, after they crossed the veth (and its loss). It delays data, not TCP's
//!   own segments: its acknowledgements come at once, as behind a proxy.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables): [`Link::create`] says why not
//! otherwise (and fails under CI, where `.ci/run` installs them).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// One node's network.
pub struct Link {
    /// The namespace's name.
    pub ns: String,
    /// The host's address on the link, and the node's.
    pub host_ip: String,
    pub node_ip: String,
    /// Where the node reaches the database: the delay line, on the host's address.
    pub db: SocketAddr,
    delay_ms: Arc<AtomicU64>,
}

/// Links made by this process (their numbers).
static MADE: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether links can be made here; if not, why (said once by the caller).
fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root (network namespaces need it)".into());
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!(
                "`{tool}` not found (apt-get install iproute2 nftables)"
            ));
        }
    }
    None
}

impl Link {
    /// A new namespace whose node reaches the database at `db` (on the host) through a
    /// delay line; `None` (after saying why) where links cannot be made, except under
    /// CI, where that fails the test.
    pub fn create(test: &str, db: SocketAddr) -> Option<Link> {
        if let Some(why) = unavailable() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: {why}, and CI must run the fault tests"
            );
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = format!("tally-{pid}-{n}");
        // Interface names have at most 15 bytes.
        let (host_if, node_if) = (format!("tv{pid}h{n}"), format!("tv{pid}n{n}"));
        // A /30 of its own (per process and link): 10.X.Y.0/30.
        let (x, y) = (100 + pid % 100, 4 * (n % 64));
        let host_ip = format!("10.{x}.{}.{}", n / 64, y + 1);
        let node_ip = format!("10.{x}.{}.{}", n / 64, y + 2);
        let setup = || -> Result<(), String> {
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &node_if,
            ])?;
            run(&["ip", "link", "set", &node_if, "netns", &ns])?;
            run(&[
                "ip",
                "addr",
                "add",
                &format!("{host_ip}/30"),
                "dev",
                &host_if,
            ])?;
            run(&["ip", "link", "set", &host_if, "up"])?;
            let inside = |args: &[&str]| {
                let mut all = vec!["ip", "netns", "exec", &ns];
                all.extend_from_slice(args);
                run(&all)
            };
            inside(&[
                "ip",
                "addr",
                "add",
                &format!("{node_ip}/30"),
                "dev",
                &node_if,
            ])?;
            inside(&["ip", "link", "set", &node_if, "up"])?;
            inside(&["ip", "link", "set", "lo", "up"])?;
            inside(&["nft", "add", "table", "inet", "faults"])?;
            for hook in ["input", "output"] {
                inside(&[
                    "nft",
                    &format!(
                        "add chain inet faults {hook} {{ type filter hook {hook} priority 0; }}"
                    ),
                ])?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = run(&["ip", "netns", "del", &ns]);
            let _ = run(&["ip", "link", "del", &host_if]);
            panic!("{test}: could not make a network namespace: {e}");
        }
        let delay_ms = Arc::new(AtomicU64::new(0));
        let listener = TcpListener::bind(format!("{host_ip}:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        delay_line(listener, db, delay_ms.clone());
        Some(Link {
            ns,
            host_ip,
            node_ip,
            db: addr,
            delay_ms,
        })
    }

    /// `program` to run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Holds every byte between the node and the database for `delay`, each way.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Replaces the faults between the node and the database (the kernel's rules):
    /// `loss` percent of packets dropped at random each way, or all of them
    /// (`partition`), or only the first packet of each new connection (`refuse_new`:
    /// open connections still work, new ones hang).
    pub fn set_faults(&self, loss: u32, partition: bool, refuse_new: bool) {
        let db = format!("{} tcp dport {}", self.to_db(), self.db.port());
        let back = format!("ip saddr {} tcp sport {}", self.host_ip, self.db.port());
        let mut rules = vec!["flush table inet faults".to_owned()];
        if partition {
            rules.push(format!("add rule inet faults output {db} drop"));
            rules.push(format!("add rule inet faults input {back} drop"));
        } else {
            if refuse_new {
                rules.push(format!(
                    "add rule inet faults output {db} tcp flags syn drop"
                ));
            }
            if loss > 0 {
                for rule in [
                    format!("add rule inet faults output {db} numgen random mod 100 < {loss} drop"),
                    format!(
                        "add rule inet faults input {back} numgen random mod 100 < {loss} drop"
                    ),
                ] {
                    rules.push(rule);
                }
            }
        }
        for rule in rules {
            let out = self.command("nft").arg(&rule).output().unwrap();
            assert!(
                out.status.success(),
                "nft {rule}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn to_db(&self) -> String {
        format!("ip daddr {}", self.host_ip)
    }

    /// Lifts every fault.
    pub fn heal(&self) {
        self.set_faults(0, false, false);
        self.set_delay(Duration::ZERO);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The veth pair goes with the namespace (its processes are the test's to stop).
        let _ = run(&["ip", "netns", "del", &self.ns]);
    }
}

/// Forwards each connection to `listener` to `to`, holding each direction's bytes for
/// `delay_ms` (read when each chunk arrives).
fn delay_line(listener: TcpListener, to: SocketAddr, delay_ms: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(upstream) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            delayed(client, upstream, delay_ms.clone());
            delayed(u2, c2, delay_ms.clone());
        }
    });
}

/// Copies `from` to `to`, each chunk written `delay` after it was read, in order.
fn delayed(mut from: TcpStream, mut to: TcpStream, delay_ms: Arc<AtomicU64>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due =
                        Instant::now() + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Read);
    });
    std::thread::spawn(move || {
        for (due, bytes) in rx {
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
