//! Private infrastructure for the fault suite: a PostgreSQL cluster (`initdb` + `pg_ctl`) and a RabbitMQ node, both
//! on free loopback ports under a temporary directory, and the worker binary as a child process. Everything here is
//! started by the test and stopped by a `Drop` guard, also when the test fails; the machine's own PostgreSQL and
//! RabbitMQ (5432, 5672) are never touched.

use std::fs;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Polls `f` until it returns `Some`, at most `timeout`; `None` when it never did.
pub async fn poll_until<T, F, Fut>(timeout: Duration, every: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
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

/// A private PostgreSQL 15 cluster with trust authentication on a free port.
pub struct PgCluster {
    data: PathBuf,
    log: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    running: bool,
}

/// The PostgreSQL server programs: `$ACM_FAULTS_PG_BIN`, else `/usr/lib/postgresql/15/bin`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn pg_bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("ACM_FAULTS_PG_BIN") {
        return Path::new(&dir).join(name);
    }
    let preferred = Path::new("/usr/lib/postgresql/15/bin");
    if preferred.join("initdb").exists() {
        return preferred.join(name);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin.join(name)).unwrap_or_else(|| preferred.join(name))
}

/// Runs a PostgreSQL program as the `postgres` OS user when we are root (PostgreSQL refuses to run as root).
fn pg_command(program: &str, dir: &Path) -> Command {
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(program));
        c
    } else {
        Command::new(pg_bin(program))
    };
    c.current_dir(dir).stdin(Stdio::null());
    c
}

impl PgCluster {
    /// `initdb` a new cluster under `base` and start it.
    pub fn start_new(base: &Path) -> Self {
        let root = base.join("pg");
        fs::create_dir_all(&root).expect("pg dir");
        if is_root() {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&root).status();
            assert!(ok.is_ok_and(|s| s.success()), "chown {} to postgres", root.display());
        }
        let data = root.join("data");
        let out = pg_command("initdb", &root)
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--locale=C"])
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Self { data, log: root.join("postgres.log"), socket_dir: root, port: free_port(), running: false };
        pg.start();
        pg
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the cluster and waits until it accepts connections.
    pub fn start(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off \
             -c full_page_writes=off -c shared_buffers=256MB",
            self.port,
            self.socket_dir.display()
        );
        let out = pg_command("pg_ctl", &self.socket_dir)
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-o", &opts])
            .output()
            .expect("pg_ctl start runs");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log, 20)
        );
        self.running = true;
    }

    /// Stops the cluster (`pg_ctl stop -m fast`: clients are disconnected, nothing committed is lost).
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    fn stop_mode(&mut self, mode: &str) {
        let out = pg_command("pg_ctl", &self.socket_dir)
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60"])
            .output()
            .expect("pg_ctl stop runs");
        assert!(
            out.status.success() || !self.running,
            "pg_ctl stop failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = pg_command("pg_ctl", &self.socket_dir)
                .arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t", "30"])
                .output();
            self.running = false;
        }
    }
}

/// A private RabbitMQ node: its own node name, AMQP port, distribution port, epmd port, config, data and logs.
pub struct RabbitNode {
    base: PathBuf,
    pub name: String,
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    child: Option<Child>,
    starts: u32,
}

fn rabbitmq_server() -> PathBuf {
    if let Ok(p) = std::env::var("ACM_FAULTS_RABBITMQ_SERVER") {
        return p.into();
    }
    // The Debian wrapper in /usr/sbin switches to the rabbitmq user (losing our environment); run the real script.
    let direct = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if direct.exists() {
        direct.into()
    } else {
        "rabbitmq-server".into()
    }
}

impl RabbitNode {
    /// Configures a node under `base` and starts it.
    pub fn start_new(base: &Path) -> Self {
        let base = base.join("rabbitmq");
        fs::create_dir_all(&base).expect("rabbitmq dir");
        let mut node = Self {
            name: format!("acmfault-{}@localhost", random_suffix()),
            port: free_port(),
            dist_port: free_port(),
            epmd_port: free_port(),
            base,
            child: None,
            starts: 0,
        };
        fs::write(node.base.join("rabbitmq-env.conf"), "").expect("env file");
        fs::write(node.base.join("enabled_plugins"), "[].\n").expect("plugins file");
        fs::write(
            node.base.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{}\ndisk_free_limit.absolute = 50MB\nvm_memory_high_watermark.relative = 0.25\n",
                node.port
            ),
        )
        .expect("config file");
        node.start();
        node
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn env(&self, c: &mut Command) {
        let b = &self.base;
        c.env("HOME", b)
            .env("RABBITMQ_CONF_ENV_FILE", b.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", b.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", b.join("enabled_plugins"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .env("RABBITMQ_MNESIA_BASE", b.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", b.join("log"))
            .env("RABBITMQ_PID_FILE", b.join("beam.pid"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .current_dir(b);
    }

    fn log_path(&self) -> PathBuf {
        self.base.join(format!("server-{}.out", self.starts))
    }

    /// Starts the node (again, with the same data) and waits until it accepts AMQP connections.
    pub fn start(&mut self) {
        self.starts += 1;
        let out = fs::File::create(self.log_path()).expect("rabbitmq log");
        let mut c = Command::new(rabbitmq_server());
        self.env(&mut c);
        let child = c
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("rabbitmq-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("rabbitmq-server exited with {status}:\n{}", tail(&self.log_path(), 30));
            }
            assert!(
                Instant::now() < deadline,
                "RabbitMQ node {} did not listen on {} within 120 s:\n{}",
                self.name,
                self.port,
                tail(&self.log_path(), 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the node gracefully (SIGTERM to the `rabbitmq-server` script, which stops the Erlang VM), waiting for
    /// it to exit; kills it when it does not within 60 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                _ => {
                    self.kill_beam();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        // The VM may outlive the script by a moment; make sure the port is free before anyone starts it again.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill_beam(&self) {
        if let Ok(pid) = fs::read_to_string(self.base.join("beam.pid")) {
            let pid = pid.trim();
            if !pid.is_empty() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
}

impl RabbitNode {
    /// Runs `rabbitmqctl` against this node (its name, epmd port and cookie) and returns its output; fails the test
    /// when it does not succeed.
    pub fn ctl(&self, args: &[&str]) -> String {
        let direct = Path::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
        let mut c = Command::new(if direct.exists() { direct.into() } else { PathBuf::from("rabbitmqctl") });
        self.env(&mut c);
        let out = c.arg("-n").arg(&self.name).args(args).stdin(Stdio::null()).output().expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.stop();
        // The node started its own epmd on a private port: stop it too.
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

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
        let out = c.arg("migrate").output().expect("the binary runs");
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
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf)).await.ok()?.ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// `VmHWM` (peak resident set) of a process in KiB.
pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

impl WorkerProc {
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
