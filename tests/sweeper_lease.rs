//! The sweeper's task leases: one holder at a time, renewal by the holder, and a released or expired lease taken by
//! another. Each claim is one statement, on whatever connection (as behind PgBouncer in transaction pooling mode).

mod common;

use std::time::Duration;

use agent_connection_manager::db::{self, Sql};
use agent_connection_manager::sweeper::Lease;
use common::{eventually, TestApp};

const TASK: &str = "stale_connections";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claimers_racing_for_a_task_get_exactly_one_lease() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let a = Lease::new(Duration::from_secs(60));
    let b = Lease::new(Duration::from_secs(60));
    let ca = db::connect(&app.settings.database, None).await.unwrap();
    let cb = db::connect(&app.settings.database, None).await.unwrap();
    for round in 0..20 {
        // Each round starts from a free lease: released by whoever won the previous one.
        let (ra, rb) = tokio::join!(a.claim(&ca, TASK), b.claim(&cb, TASK));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra ^ rb, "round {round}: exactly one claimer holds the task (a: {ra}, b: {rb})");
        let holder: String = app.scalar(&format!("SELECT holder FROM sweeper_lease WHERE task = '{TASK}'")).await;
        let winner = if ra { &a } else { &b };
        assert_eq!(holder, winner.holder);
        // The loser keeps losing while the winner renews.
        let loser_again = if ra { b.claim(&cb, TASK).await } else { a.claim(&ca, TASK).await };
        assert!(!loser_again.unwrap(), "round {round}: the lease stays with its holder");
        assert!(winner.claim(if ra { &ca } else { &cb }, TASK).await.unwrap(), "the holder renews its own lease");
        winner.release(if ra { &ca } else { &cb }, TASK).await.unwrap();
    }
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_or_expired_lease_is_taken_by_another_holder() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let client = db::connect(&app.settings.database, None).await.unwrap();
    let a = Lease::new(Duration::from_secs(60));
    let b = Lease::new(Duration::from_secs(60));

    assert!(a.claim(&client, TASK).await.unwrap());
    assert!(!b.claim(&client, TASK).await.unwrap(), "held by a");
    // Released: b takes it at once, and a cannot.
    a.release(&client, TASK).await.unwrap();
    assert!(b.claim(&client, TASK).await.unwrap(), "a released lease is free");
    assert!(!a.claim(&client, TASK).await.unwrap(), "now held by b");
    // A release by a holder that no longer has the lease changes nothing.
    a.release(&client, TASK).await.unwrap();
    assert!(!a.claim(&client, TASK).await.unwrap(), "still held by b");

    // A holder that dies stops renewing: its lease expires on the database clock and another takes the task.
    let short = Lease::new(Duration::from_secs(1));
    b.release(&client, TASK).await.unwrap();
    assert!(short.claim(&client, TASK).await.unwrap());
    assert!(!a.claim(&client, TASK).await.unwrap(), "held by the short-lived holder until it expires");
    eventually("the dead holder's lease to expire and be taken", Duration::from_secs(10), || async {
        a.claim(&client, TASK).await.unwrap().then_some(())
    })
    .await;
    let row = client
        .typed_one(
            "SELECT holder, expires_at > now() + interval '30 seconds' FROM sweeper_lease WHERE task = $1",
            &[&TASK],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), a.holder);
    assert!(row.get::<_, bool>(1), "the new holder's lease runs for its own length");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_skips_a_task_leased_to_another_worker_until_the_lease_expires() {
    let app = TestApp::unstarted_with(|_| {}).await;
    let sid = app.manager.create_session("a1", None, None, None, None).await.unwrap();
    app.db
        .batch_execute(&format!(
            "INSERT INTO agent_connection (connection_id, session_id, agent_id, connection_type, last_heartbeat_at)
               VALUES ('quiet', '{sid}', 'a1', 'amqp', now() - interval '1 hour')"
        ))
        .await
        .unwrap();
    let other = Lease::new(Duration::from_secs(2));
    assert!(other.claim(&app.db, TASK).await.unwrap());
    let r = app.sweep().await;
    assert_eq!(r.skipped_tasks, [TASK], "{r:?}");
    assert_eq!(r.stale_connections, 0);
    // The other worker never renews (it died): once its lease has expired, the next cycle closes the connection.
    let r = eventually("the task to be taken over after the lease expired", Duration::from_secs(15), || async {
        let r = app.sweep().await;
        (!r.skipped_tasks.iter().any(|t| t == TASK)).then_some(r)
    })
    .await;
    assert_eq!(r.stale_connections, 1, "{r:?}");
    let events: i64 = app.scalar("SELECT count(*) FROM event_outbox WHERE event_type = 'agent.connection.stale'").await;
    assert_eq!(events, 1);
    app.cleanup().await;
}
