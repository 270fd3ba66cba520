//! The worker binary as a child process: its environment, readiness, peak memory and how it is stopped.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, poll_until, tail, BIN};

/// One run of the worker binary (`run`), with its log and its peak memory.
pub struct WorkerProc {
    child: Option<Child>,
    pub pid: u32,
    pub http_port: u16,
    pub log: PathBuf,
    peak_kb: u64,
}

/// Environment of a worker: database, broker, prefix and extra `ACM_*` settings.
#[derive(Clone)]
pub struct WorkerEnv {
    pub database_url: String,
    pub amqp_url: String,
    pub prefix: String,
    pub extra: Vec<(String, String)>,
    pub log_dir: PathBuf,
}

impl WorkerEnv {
    /// Applies the environment to a command of the binary.
    pub fn apply(&self, c: &mut Command) {
        // The binary reads every `ACM_*` variable as configuration (and refuses unknown keys such as this suite's
        // own `ACM_FAULTS_*`): start from none of them.
        for (k, _) in std::env::vars() {
            if k.starts_with("ACM_") {
                c.env_remove(k);
            }
        }
        c.env("ACM_DATABASE__URL", &self.database_url)
            .env("ACM_AMQP__URL", &self.amqp_url)
            .env("ACM_AMQP__PREFIX", &self.prefix)
            .env("RUST_LOG", std::env::var("ACM_FAULTS_RUST_LOG").unwrap_or_else(|_| "info".into()));
        for (k, v) in &self.extra {
            c.env(k, v);
        }
    }

    /// Runs `migrate` to completion.
    pub fn migrate(&self) {
        let mut c = Command::new(BIN);
        self.apply(&mut c);
        c.arg("migrate").stdin(Stdio::null());
        let out = crate::bounded::output_within(&mut c, Duration::from_secs(120), "migrate");
        assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts `run` with its own HTTP port; its stderr goes to `<log_dir>/<name>.log`.
    pub fn spawn(&self, name: &str) -> WorkerProc {
        let http_port = free_port();
        let log = self.log_dir.join(format!("{name}.log"));
        let file = fs::File::create(&log).expect("worker log");
        let mut c = Command::new(BIN);
        self.apply(&mut c);
        c.env("ACM_HTTP__LISTEN", format!("127.0.0.1:{http_port}"));
        let child =
            c.arg("run").stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().expect("the worker starts");
        WorkerProc { pid: child.id(), child: Some(child), http_port, log, peak_kb: 0 }
    }
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    crate::bounded::http_get(port, path).await.map(|(status, _)| status)
}

/// `VmHWM` (peak resident set) of a process in KiB.
pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

impl WorkerProc {
    /// Whether `/readyz` answers 200 now.
    pub async fn ready(&self) -> bool {
        http_status(self.http_port, "/readyz").await == Some(200)
    }

    /// Waits until `/readyz` answers 200 (broker connected, database answering, consumers running).
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let port = self.http_port;
        let ready = poll_until(timeout, Duration::from_millis(100), || async move {
            (http_status(port, "/readyz").await == Some(200)).then_some(())
        })
        .await;
        if ready.is_none() {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!(
                "worker {} not ready within {timeout:?} (exit status {exited:?}); log:\n{}",
                self.pid,
                tail(&self.log, 30)
            );
        }
    }

    /// Peak memory so far (KiB), remembered across the process's end.
    pub fn peak_kb(&mut self) -> u64 {
        if let Some(kb) = vm_hwm_kb(self.pid) {
            self.peak_kb = self.peak_kb.max(kb);
        }
        self.peak_kb
    }

    /// SIGKILL, then reap; returns the peak memory measured just before.
    pub fn sigkill(&mut self) -> u64 {
        let peak = self.peak_kb();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        peak
    }

    /// SIGTERM and wait for a clean exit (failing the test when it is not clean within `timeout`).
    pub async fn sigterm(&mut self, timeout: Duration) -> u64 {
        let peak = self.peak_kb();
        let Some(mut c) = self.child.take() else {
            return peak;
        };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(s)) = c.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("worker {} did not stop within {timeout:?} of SIGTERM:\n{}", self.pid, tail(&self.log, 30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "worker {} exited with {status} after SIGTERM:\n{}", self.pid, tail(&self.log, 30));
        peak
    }
}

impl Drop for WorkerProc {
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
