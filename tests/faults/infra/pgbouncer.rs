//! PgBouncer as a child process: its own ini on a free loopback port, in front of one database of the machine's
//! PostgreSQL, stopped by `Drop`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, is_root, poll_until, tail};

/// The PgBouncer binary (Debian's package puts it in /usr/sbin); fails the test with one line naming it when there
/// is none.
pub fn pgbouncer_bin() -> PathBuf {
    crate::programs::require_program("pgbouncer")
}

/// A running PgBouncer.
pub struct PgBouncer {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl PgBouncer {
    /// Starts PgBouncer under `dir` in front of `dbname` on `upstream` (`host:port`, trust authentication as
    /// `postgres`), in `pool_mode` with `pool_size` server connections per database and user, and waits until it
    /// accepts connections.
    pub async fn start(dir: &Path, upstream: (&str, u16), dbname: &str, pool_mode: &str, pool_size: usize) -> Self {
        let port = free_port();
        let userlist = dir.join("userlist.txt");
        fs::write(&userlist, "\"postgres\" \"\"\n").expect("write userlist.txt");
        let ini = dir.join("pgbouncer.ini");
        // No unix socket (no clash with another PgBouncer), no pid or log file (the log is stderr, kept by this
        // process), trust authentication for the users of userlist.txt; `extra_float_digits` is sent by many
        // clients and ignored, and so is `options`, which a worker left at `database.pooler = "none"` sends (the
        // undeclared-pooler scenario: an operator who made PgBouncer accept the worker but forgot the setting).
        fs::write(
            &ini,
            format!(
                "[databases]\n\
                 {dbname} = host={host} port={upstream_port} dbname={dbname} user=postgres\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {userlist}\n\
                 admin_users = postgres\n\
                 pool_mode = {pool_mode}\n\
                 default_pool_size = {pool_size}\n\
                 min_pool_size = 0\n\
                 reserve_pool_size = 0\n\
                 max_client_conn = 2000\n\
                 max_db_connections = {pool_size}\n\
                 server_lifetime = 3600\n\
                 ignore_startup_parameters = extra_float_digits,options\n",
                host = upstream.0,
                upstream_port = upstream.1,
                userlist = userlist.display(),
            ),
        )
        .expect("write pgbouncer.ini");
        let log = dir.join("pgbouncer.log");
        let file = fs::File::create(&log).expect("pgbouncer log");
        let mut c = Command::new(pgbouncer_bin());
        // PgBouncer refuses to run as root: it switches to the postgres user itself.
        if is_root() {
            c.args(["-u", "postgres"]);
        }
        let child =
            c.arg(&ini).stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().expect("pgbouncer starts");
        let mut bouncer = Self { child: Some(child), port, log };
        let up = poll_until(Duration::from_secs(20), Duration::from_millis(100), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
        if up.is_none() {
            let exited = bouncer.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!("pgbouncer not listening within 20 s (exit status {exited:?}); log:\n{}", tail(&bouncer.log, 30));
        }
        bouncer
    }

    /// The URL of `dbname` through this PgBouncer.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- {} (last lines) ----\n{}", self.log.display(), tail(&self.log, 40));
        }
    }
}
