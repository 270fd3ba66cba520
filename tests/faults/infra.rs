//! Private infrastructure for the fault suite: a PostgreSQL cluster (`initdb` + `pg_ctl`) and a RabbitMQ node, both
//! on free loopback ports under a temporary directory, and the worker binary as a child process. Everything here is
//! started by the test and stopped by a `Drop` guard, also when the test fails; the machine's own PostgreSQL and
//! RabbitMQ (5432, 5672) are never stopped or reconfigured. PgBouncer (`infra/pgbouncer.rs`) runs the same way, in
//! front of a database of its test's own.

#[path = "infra/pgbouncer.rs"]
mod pgbouncer;
#[path = "infra/postgres.rs"]
mod postgres;
#[path = "infra/rabbitmq.rs"]
mod rabbitmq;
#[path = "infra/worker.rs"]
mod worker;

use std::fs;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use pgbouncer::PgBouncer;
pub use postgres::PgCluster;
pub use rabbitmq::RabbitNode;
pub use worker::{WorkerEnv, WorkerProc};

/// The worker binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_agent-connection-manager");

/// A free TCP port on the loopback interface (released again at once; taken by the caller right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port()
}

/// A random lowercase suffix.
pub fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// Polls `f` until it returns `Some`, at most `timeout`; `None` when it never did. Each attempt is bounded too (by
/// the time left, or `every` when less is left): an attempt that never answers is cut off and counts as `None`, so
/// a probe of a node that stopped answering cannot outlive the deadline.
pub async fn poll_until<T, F, Fut>(timeout: Duration, every: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(every);
        if let Ok(Some(v)) = tokio::time::timeout(left, f()).await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Awaits `fut` for at most `limit`; fails the test with `what` when it takes longer.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| panic!("{what}: no answer within {limit:?}"))
}

/// Like [`poll_until`], but fails the test with `what` when the time is up.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, Duration::from_millis(100), f).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for: {what}"),
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// The last `n` lines of a file (for failure messages).
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("({} missing)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A temporary directory removed on drop (kept when `ACM_FAULTS_KEEP=1`, for debugging).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/acm-faults-<name>-<random>`, readable by the `postgres` user.
    pub fn new(name: &str) -> Self {
        let name: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
        let path = std::env::temp_dir().join(format!("acm-faults-{name}-{}", random_suffix()));
        fs::create_dir_all(&path).expect("create temp dir");
        let _ = Command::new("chmod").arg("755").arg(&path).status();
        Self { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var("ACM_FAULTS_KEEP").as_deref() == Ok("1") {
            eprintln!("faults: kept {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}
