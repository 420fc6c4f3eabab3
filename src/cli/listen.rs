//! `tally listen`: a session kept open, what the server sends printed, its requests and
//! queued deliveries answered by a handler (`--echo`, `--exec`), a bounded number at once.

use bytes::Bytes;
use clap::Args;

use super::{connect, offer_session, printable, stop_signal, ConnArgs};
use crate::client::{self, Incoming, LinkEvent};
use crate::proto::{Id, Status};

/// `tally listen`.
#[derive(Args)]
pub struct ListenArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Answer server requests with their own payload.
    #[arg(long, conflicts_with = "exec")]
    pub echo: bool,
    /// Answer each server request by running this shell command: the request payload on
    /// its stdin, $TALLY_ID set; exit 0 answers OK with its stdout, another exit status
    /// answers status 2 (BACKEND_ERROR) with its stderr. Without --echo or --exec,
    /// requests are answered with status 4 (REFUSED).
    #[arg(long, value_name = "COMMAND")]
    pub exec: Option<String>,
    /// At most N handlers (--exec commands) run at once. Server requests beyond them
    /// wait, in order of arrival, for one to finish; when 64 already wait, a request
    /// is answered at once with status 1 (UNAVAILABLE) and a reason, and the sender
    /// may try again. (tallyd holds at most limits.server_requests_in_flight, 32 by
    /// default, unanswered requests per device itself.)
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_handlers: u16,
    /// Exit when the session ends. By default a lost session is made again (the
    /// server restarted, the network was cut) after a jittered, growing delay: from
    /// about 1 s up to 60 s, and from 10 s up to 10 min after a takeover by another
    /// connection of this identity or a refusal; it stops only when the identity is
    /// revoked or removed.
    #[arg(long)]
    pub no_reconnect: bool,
    /// Do not offer this session to `tally request` and `tally message`. By default
    /// they send through it (a Unix socket of mode 0600 in $XDG_RUNTIME_DIR/tally/,
    /// else /tmp/tally-UID/, removed at exit) instead of taking it over, and a second
    /// `tally listen` of the identity is refused while this one runs.
    #[arg(long)]
    pub no_share: bool,
}

/// `tally listen`: runs until Ctrl-C or SIGTERM, or (with `--no-reconnect`) the session's
/// end, or the identity's revocation or removal.
pub async fn run(a: ListenArgs) -> anyhow::Result<()> {
    let ListenArgs {
        conn,
        echo,
        exec,
        max_handlers,
        no_reconnect,
        no_share,
    } = a;
    let (cred, opts) = conn.credential_and_options()?;
    // Before connecting: a second listener of the identity is refused before it
    // takes the first one's session.
    let share = if no_share {
        None
    } else {
        offer_session(&cred)?
    };
    // Ctrl-C or SIGTERM close the session and remove the socket (dropped on return).
    let stop = stop_signal();
    tokio::pin!(stop);
    let handlers = Handlers::new(usize::from(max_handlers));
    let answer = |id: Id| {
        let exec = exec.clone();
        move |payload: Bytes| async move {
            match (&exec, echo) {
                (Some(cmd), _) => run_handler(cmd, &id, &payload).await,
                (None, true) => (Status::OK, payload),
                (None, false) => (
                    Status::REFUSED,
                    Bytes::from_static(b"tally listen has no handler (use --echo or --exec)"),
                ),
            }
        }
    };
    if no_reconnect {
        let (client, mut incoming) = connect(&cred, opts).await?;
        let _sharing = share.map(|s| s.serve_client(&client));
        eprintln!(
            "connected as {}; waiting for the server (Ctrl-C to stop)",
            client.id()
        );
        loop {
            tokio::select! {
                item = incoming.recv() => match item {
                    Some(Incoming::Message(p)) => println!("message: {}", printable(&p)),
                    Some(Incoming::Request(req)) => handlers.take(req, answer(client.id().clone())),
                    Some(Incoming::Delivery(d)) => handlers.take_delivery(d, answer(client.id().clone())),
                    None => return Err(client.closed().await.into()),
                },
                _ = &mut stop => { client.close().await?; return Ok(()) }
                e = client.closed() => return Err(e.into()),
            }
        }
    }
    let what = format!("session with {} as {}", cred.server, cred.id);
    let id = cred.id.clone();
    let (link, mut events) = client::Link::start(cred, opts, client::Backoff::link());
    let _sharing = share.map(|s| s.serve_link(&link));
    let mut ever_up = false;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(LinkEvent::Up(_)) => {
                    let again = if ever_up { "reconnected" } else { "connected" };
                    eprintln!("{again} as {id}; waiting for the server (Ctrl-C to stop)");
                    ever_up = true;
                }
                Some(LinkEvent::Down { error, retry_in, was_up }) => {
                    // Not even a first failure ends it: a refusal before the
                    // session (a bad tag, an ERROR, garbage) is unauthenticated,
                    // someone on the path can forge it (the Link slows down).
                    let lost = if was_up { "session lost" } else { "cannot connect" };
                    let hint = match &error {
                        client::ClientError::Closed { code, .. }
                            if *code == crate::proto::CloseCode::TAKEN_OVER =>
                        {
                            " (another connection of this identity replaced the session: is it used by two devices?)"
                        }
                        _ => "",
                    };
                    eprintln!(
                        "{lost}: {}; reconnecting in {:.1} s{hint}",
                        crate::logging::error_report(&anyhow::Error::new(error)),
                        retry_in.as_secs_f64()
                    );
                }
                Some(LinkEvent::Incoming(Incoming::Message(p))) => println!("message: {}", printable(&p)),
                Some(LinkEvent::Incoming(Incoming::Request(req))) => {
                    handlers.take(req, answer(id.clone()));
                }
                Some(LinkEvent::Incoming(Incoming::Delivery(d))) => {
                    handlers.take_delivery(d, answer(id.clone()));
                }
                Some(LinkEvent::Stopped(error)) => {
                    return Err(anyhow::Error::new(error).context(what))
                }
                // The last word did not fit in a full queue: ask the link.
                None => match link.session().await {
                    Err(e) => return Err(anyhow::Error::new(e).context(what)),
                    Ok(_) => anyhow::bail!("{what}: the link ended"),
                },
            },
            _ = &mut stop => { link.close().await; return Ok(()) }
        }
    }
}

/// Server requests `tally listen` keeps waiting for a free handler (`--max-handlers`);
/// beyond, they are answered UNAVAILABLE at once.
const WAITING_REQUESTS: usize = 64;

/// `tally listen`'s bound on its handlers: a slot to run, and a ticket to wait for one.
#[derive(Clone)]
struct Handlers {
    /// One permit per handler that may run (`--max-handlers`).
    running: std::sync::Arc<tokio::sync::Semaphore>,
    /// One permit per request running or waiting: `--max-handlers` + [`WAITING_REQUESTS`].
    admitted: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl Handlers {
    fn new(max: usize) -> Self {
        Handlers {
            running: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
            admitted: std::sync::Arc::new(tokio::sync::Semaphore::new(max + WAITING_REQUESTS)),
            max,
        }
    }

    /// Takes `req` in (printed as it arrives) and answers it on a task of its own: with
    /// `answer` once a handler is free, or UNAVAILABLE at once if too many wait already.
    /// A slow handler holds up neither the other requests nor Ctrl-C; a session lost
    /// while answering is the caller's to report.
    fn take<F>(&self, req: client::IncomingRequest, answer: impl FnOnce(Bytes) -> F)
    where
        F: std::future::Future<Output = (Status, Bytes)> + Send + 'static,
    {
        println!("request: {}", printable(&req.payload));
        let Ok(ticket) = self.admitted.clone().try_acquire_owned() else {
            let why = format!(
                "tally listen is busy: --max-handlers {} running and {WAITING_REQUESTS} requests waiting; try again later",
                self.max
            );
            tokio::spawn(async move {
                println!("answered: {}", Status::UNAVAILABLE);
                let _ = req.respond(Status::UNAVAILABLE, Bytes::from(why)).await;
            });
            return;
        };
        let running = self.running.clone();
        // Lazy: the handler starts when awaited, once it has a slot.
        let handler = answer(req.payload.clone());
        tokio::spawn(async move {
            let _ticket = ticket;
            // Never closed: acquiring fails only if it were.
            let Ok(_slot) = running.acquire_owned().await else {
                return;
            };
            let (status, body) = handler.await;
            println!("answered: {status}");
            let _ = req.respond(status, body).await;
        });
    }

    /// Takes a queued message or request (spec 8.8; printed as it arrives) and
    /// acknowledges it once handled: a message at once, a request with `answer`'s reply
    /// once a handler is free (a delivery waits for one: the server sends no more than
    /// its window). Unacknowledged (the session lost first), it comes again.
    fn take_delivery<F>(&self, d: client::IncomingDelivery, answer: impl FnOnce(Bytes) -> F)
    where
        F: std::future::Future<Output = (Status, Bytes)> + Send + 'static,
    {
        println!(
            "queued {} {}: {}",
            d.kind.as_str(),
            d.msg_id,
            printable(&d.payload)
        );
        if d.kind == crate::proto::DeliveryKind::Message {
            tokio::spawn(async move {
                let msg_id = d.msg_id;
                if d.ack(Status::OK, Bytes::new()).await.is_ok() {
                    println!("acknowledged: {msg_id}");
                }
            });
            return;
        }
        let running = self.running.clone();
        let handler = answer(d.payload.clone());
        tokio::spawn(async move {
            let Ok(_slot) = running.acquire_owned().await else {
                return;
            };
            let (status, body) = handler.await;
            let msg_id = d.msg_id;
            if d.ack(status, body).await.is_ok() {
                println!("acknowledged: {msg_id} ({status})");
            }
        });
    }
}

/// Runs `cmd` with `payload` on stdin; its stdout (exit 0) or stderr (otherwise) answers.
async fn run_handler(cmd: &str, id: &Id, payload: &[u8]) -> (Status, Bytes) {
    use tokio::io::AsyncWriteExt;
    let child = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .env("TALLY_ID", id.as_str())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return (
                Status::BACKEND_ERROR,
                Bytes::from(format!("cannot run handler: {e}")),
            )
        }
    };
    let mut stdin = child.stdin.take().expect("piped");
    let input = payload.to_vec();
    let feed = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let out = child.wait_with_output().await;
    let _ = feed.await;
    match out {
        Ok(o) if o.status.success() => (Status::OK, Bytes::from(o.stdout)),
        Ok(o) => (Status::BACKEND_ERROR, Bytes::from(o.stderr)),
        Err(e) => (
            Status::BACKEND_ERROR,
            Bytes::from(format!("handler failed: {e}")),
        ),
    }
}
