//! An isolated environment per scenario run: a fresh database, its own AMQP prefix, the worker as a child process,
//! and cleanup even when the run fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_connection_manager::amqp::{self, Topology};
use tokio_postgres::NoTls;

use crate::opts::Opts;
use crate::{fail, worker_bin, Res};

pub struct Env {
    db_name: String,
    pub db_url: String,
    pub prefix: String,
    pub port: u16,
    log: PathBuf,
    pg_base: String,
    amqp_url: String,
    pub extra_prefixes: Vec<String>,
    worker: Option<Child>,
    cleaned: bool,
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(19090)
}

pub use crate::bounded::http_get;

/// Drops a database and deletes the broker objects of some prefixes.
async fn remove_resources(pg_base: &str, amqp_url: &str, db_name: &str, prefixes: &[String]) {
    if let Ok(conn) = amqp::connect(amqp_url, "acm bench cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            for p in prefixes {
                let _ = Topology::new(p).delete(&ch).await;
            }
        }
        let _ = conn.close(200, "done".into()).await;
    }
    if let Ok((admin, conn)) = tokio_postgres::connect(&format!("{pg_base}/postgres"), NoTls).await {
        tokio::spawn(conn);
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)")).await;
    }
}

impl Env {
    pub fn new(o: &Opts, tag: &str) -> Self {
        let suffix = random_suffix();
        let db_name = format!("acm_bench_{suffix}");
        Self {
            db_url: format!("{}/{db_name}", o.pg_base),
            db_name,
            prefix: format!("acm-bench-{tag}-{suffix}"),
            port: free_port(),
            log: std::env::temp_dir().join(format!("acm-bench-{suffix}.log")),
            pg_base: o.pg_base.clone(),
            amqp_url: o.amqp_url.clone(),
            extra_prefixes: Vec::new(),
            worker: None,
            cleaned: false,
        }
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&self.prefix)
    }

    /// The worker's variables that turn span export on, towards a collector that is down (a port nothing listens
    /// on): what tracing costs the work when every export fails (`ingest-traced`, `commands-traced`).
    pub fn traced_collector_down() -> Vec<(&'static str, String)> {
        vec![("ACM_TELEMETRY__OTLP_ENDPOINT", format!("http://127.0.0.1:{}", free_port()))]
    }

    fn command(&self, extra: &[(&str, String)]) -> Command {
        let mut c = Command::new(worker_bin());
        c.env("ACM_DATABASE__URL", &self.db_url)
            .env("ACM_AMQP__URL", &self.amqp_url)
            .env("ACM_AMQP__PREFIX", &self.prefix)
            .env("ACM_HTTP__LISTEN", format!("127.0.0.1:{}", self.port))
            .env_remove("ACM_CONFIG")
            .env_remove("RUST_LOG");
        for (k, v) in extra {
            c.env(k, v);
        }
        c
    }

    /// `agent-connection-manager migrate` (creates the database).
    pub async fn migrate(&self) -> Res<()> {
        let mut c = self.command(&[]);
        c.arg("migrate");
        let out = tokio::task::spawn_blocking(move || c.output()).await??;
        if !out.status.success() {
            return Err(fail(format!("migrate failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(())
    }

    pub async fn db(&self) -> Res<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.db_url, NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Starts `agent-connection-manager run` and waits until `/readyz` answers 200.
    pub async fn start_worker(&mut self, extra: &[(&str, String)]) -> Res<u32> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut c = self.command(extra);
        c.arg("run").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = c.spawn()?;
        let pid = child.id();
        self.worker = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if matches!(http_get(self.port, "/readyz").await, Some((200, _))) {
                return Ok(pid);
            }
            if let Some(status) = self.worker.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.worker = None;
                return Err(fail(format!("the worker exited ({status}) before ready:\n{}", self.log_tail())));
            }
            if Instant::now() > deadline {
                return Err(fail(format!("the worker was not ready within 60 s:\n{}", self.log_tail())));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The worker's peak resident set size (`VmHWM`), in MiB.
    pub fn worker_peak_rss_mib(&self) -> Option<f64> {
        let pid = self.worker.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// SIGTERM, then waits up to 20 s (SIGKILL after that).
    async fn stop_worker(&mut self) {
        let Some(mut child) = self.worker.take() else { return };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => {
                    eprintln!("    the worker did not stop within 20 s of SIGTERM; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    pub async fn cleanup(mut self) {
        self.stop_worker().await;
        let mut prefixes = vec![self.prefix.clone()];
        prefixes.extend(self.extra_prefixes.iter().cloned());
        remove_resources(&self.pg_base, &self.amqp_url, &self.db_name, &prefixes).await;
        if std::env::var_os("ACM_BENCH_KEEP_LOGS").is_some() {
            eprintln!("    worker log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
        self.cleaned = true;
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut child) = self.worker.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.cleaned {
            return;
        }
        eprintln!("    cleaning up after a failed scenario (worker log kept at {})", self.log.display());
        let (pg, amqp_url, db) = (self.pg_base.clone(), self.amqp_url.clone(), self.db_name.clone());
        let mut prefixes = vec![self.prefix.clone()];
        prefixes.extend(self.extra_prefixes.iter().cloned());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(20), remove_resources(&pg, &amqp_url, &db, &prefixes))
                            .await;
                });
            }
        })
        .join();
    }
}
