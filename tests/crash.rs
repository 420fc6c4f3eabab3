//! Crash safety: kill -9 the daemon while many enrollments are in flight, restart it,
//! and check that every enrollment a device saw confirmed is present and usable, and
//! that no identity is half-written (spec 6.2 step 4: DONE only after a durable commit).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::bin::start;
use tally::client::{self, Client, ClientOptions};
use tally::proto::credential::EnrollmentToken;
use tally::proto::Id;
use tally::secrets::ServerSecrets;
use tally::store::{Store, DB_FILE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_enrollments_loses_no_confirmed_identity() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut daemon, _) = start(&state, true);
    let token =
        EnrollmentToken::parse(&tally::admin::open_token(&state, None, false).unwrap().token)
            .unwrap();
    let addr = daemon.addr.clone();

    let confirmed = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let (token, addr, confirmed) = (token.clone(), addr.clone(), confirmed.clone());
        tasks.push(tokio::spawn(async move {
            let id = Id::new(&format!("crash-{i}")).unwrap();
            if let Ok(cred) =
                client::enroll(&addr, &token, id, &client::ClientOptions::default()).await
            {
                confirmed.lock().await.push(cred);
            }
        }));
    }
    // Kill as soon as some enrollments are confirmed, with the rest still in flight.
    while confirmed.lock().await.len() < 20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    daemon.child.kill().unwrap(); // SIGKILL
    daemon.child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let confirmed = confirmed.lock().await.clone();
    assert!(
        confirmed.len() >= 20 && confirmed.len() < 300,
        "the kill landed mid-way: {}",
        confirmed.len()
    );

    // Every row is whole: a 32-byte wrapped key, a mode, and nothing revoked.
    let secrets = ServerSecrets::load(&state, None, false).unwrap();
    let store = Store::open(&state.join(DB_FILE), secrets.store_key.clone()).unwrap();
    let rows = store.list().unwrap();
    for r in &rows {
        assert!(
            store.key(&Id::new(&r.id).unwrap()).unwrap().is_some(),
            "{} is half-written",
            r.id
        );
        assert!(r.mode == "open" && r.revoked.is_none());
    }
    drop(store);

    // Restart on the same state: every confirmed device gets in.
    let (daemon, _) = start(&state, false);
    for mut cred in confirmed.clone() {
        assert!(
            rows.iter().any(|r| r.id == cred.id.as_str()),
            "{} was confirmed but is missing",
            cred.id
        );
        cred.server = daemon.addr.clone();
        let (c, _) = Client::connect(&cred, ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(
            c.request("after the crash").await.unwrap(),
            bytes::Bytes::from_static(b"after the crash")
        );
        c.close().await.unwrap();
    }
    eprintln!(
        "{} confirmed before the kill, {} rows in the store",
        confirmed.len(),
        rows.len()
    );
}
