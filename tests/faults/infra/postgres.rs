//! A private PostgreSQL cluster (`initdb` + `pg_ctl`) on a free port, stopped on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{free_port, is_root, tail};

/// A private PostgreSQL 15 cluster with trust authentication on a free port.
pub struct PgCluster {
    data: PathBuf,
    log: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    running: bool,
    /// Further server options for `pg_ctl start -o` (the primary's synchronous replication).
    extra_opts: String,
}

/// A PostgreSQL server program: in `$ACM_FAULTS_PG_BIN`, else `/usr/lib/postgresql/15/bin`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has `initdb`, else on `PATH`; fails the test with one line naming it when
/// it is nowhere.
fn pg_bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("ACM_FAULTS_PG_BIN") {
        return crate::programs::require_program_in(name, &[dir.into()]);
    }
    let preferred = PathBuf::from("/usr/lib/postgresql/15/bin");
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    let newest = versions.pop().map(|(_, bin)| bin);
    let dirs: Vec<PathBuf> = std::iter::once(preferred).chain(newest).collect();
    crate::programs::require_program_in(name, &dirs)
}

/// Runs a PostgreSQL program as the `postgres` OS user when we are root (PostgreSQL refuses to run as root).
fn pg_command(program: &str, dir: &Path) -> Command {
    let mut c = if is_root() {
        let mut c = Command::new(crate::programs::require_program("runuser"));
        c.args(["-u", "postgres", "--"]).arg(pg_bin(program));
        c
    } else {
        Command::new(pg_bin(program))
    };
    c.current_dir(dir).stdin(Stdio::null());
    c
}

/// Runs `command` to its end and fails the test with its output unless it succeeded.
fn run_ok(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgCluster {
    /// `initdb` a new cluster under `base` and start it.
    pub fn start_new(base: &Path) -> Self {
        Self::start_new_as(base, "pg", "")
    }

    /// `initdb` a new cluster under `base/<dir>` and start it with `extra_opts` (server options, `-c name=value`).
    pub fn start_new_as(base: &Path, dir: &str, extra_opts: &str) -> Self {
        let root = owned_dir(base, dir);
        let data = root.join("data");
        let mut initdb = pg_command("initdb", &root);
        initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--locale=C"]);
        run_ok(initdb, "initdb");
        Self::started(root, data, extra_opts)
    }

    /// `initdb` a new cluster under `base/<dir>` whose TCP connections authenticate with `scram-sha-256` (those on
    /// its Unix socket, which `pg_ctl` uses, are trusted), the `postgres` user's password being `password`, and
    /// start it: the machine's own server trusts every connection, so a wrong password is refused only here.
    #[allow(dead_code)] // tests/errors.rs uses it, the fault suite does not
    pub fn start_new_with_password(base: &Path, dir: &str, password: &str) -> Self {
        let root = owned_dir(base, dir);
        let data = root.join("data");
        let pwfile = root.join("pwfile");
        fs::write(&pwfile, password).expect("write pwfile");
        if is_root() {
            let ok = Command::new("chown").args(["postgres:postgres"]).arg(&pwfile).status();
            assert!(ok.is_ok_and(|s| s.success()), "chown {} to postgres", pwfile.display());
        }
        let mut initdb = pg_command("initdb", &root);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["--auth-local=trust", "--auth-host=scram-sha-256", "-U", "postgres", "--pwfile"])
            .arg(&pwfile)
            .args(["-E", "UTF8", "--no-sync", "--locale=C"]);
        run_ok(initdb, "initdb");
        Self::started(root, data, "")
    }

    /// The cluster whose data directory is `data` (sockets and log in `root`), started on a free port.
    fn started(root: PathBuf, data: PathBuf, extra_opts: &str) -> Self {
        let mut pg = Self {
            data,
            log: root.join("postgres.log"),
            socket_dir: root,
            port: free_port(),
            running: false,
            extra_opts: extra_opts.to_string(),
        };
        pg.start();
        pg
    }

    /// A streaming standby of `primary` under `base/<dir>` on a free port: `pg_basebackup -R` (which writes
    /// `standby.signal` and `primary_conninfo`), then started. With the primary's `synchronous_standby_names = '*'`
    /// it is the synchronous standby: the primary reports a commit only once this standby has flushed it.
    pub fn start_standby_of(primary: &PgCluster, base: &Path, dir: &str) -> Self {
        let root = owned_dir(base, dir);
        let data = root.join("data");
        let mut backup = pg_command("pg_basebackup", &root);
        backup
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres", "-R", "-X", "stream"])
            .args(["--no-sync", "--checkpoint=fast"]);
        run_ok(backup, "pg_basebackup");
        Self::started(root, data, "")
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id (the first line of `postmaster.pid`), while it runs (for the capacity bench).
    #[allow(dead_code)]
    pub fn postmaster_pid(&self) -> Option<u32> {
        fs::read_to_string(self.data.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
    }

    /// Appends a line to `pg_hba.conf` (read at the next start or reload).
    pub fn allow(&self, hba_line: &str) {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(self.data.join("pg_hba.conf")).expect("pg_hba.conf");
        writeln!(f, "{hba_line}").expect("write pg_hba.conf");
        let out = pg_command("pg_ctl", &self.socket_dir).arg("reload").arg("-D").arg(&self.data).output();
        assert!(out.is_ok_and(|o| o.status.success()), "pg_ctl reload");
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`: no shutdown checkpoint, every
    /// client cut off).
    pub fn stop_immediate(&mut self) {
        self.stop_mode("immediate");
    }

    /// Promotes a standby to a primary (`pg_ctl promote -w`: returns once it accepts writes).
    pub fn promote(&self) {
        let out = pg_command("pg_ctl", &self.socket_dir)
            .arg("promote")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60"])
            .output()
            .expect("pg_ctl promote runs");
        assert!(
            out.status.success(),
            "pg_ctl promote failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log, 20)
        );
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the cluster and waits until it accepts connections.
    pub fn start(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off \
             -c full_page_writes=off -c shared_buffers=256MB {}",
            self.port,
            self.socket_dir.display(),
            self.extra_opts
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

/// `base/<dir>`, created and owned by the `postgres` user when we are root.
fn owned_dir(base: &Path, dir: &str) -> PathBuf {
    let root = base.join(dir);
    fs::create_dir_all(&root).expect("pg dir");
    if is_root() {
        let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&root).status();
        assert!(ok.is_ok_and(|s| s.success()), "chown {} to postgres", root.display());
    }
    root
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
