//! A private RabbitMQ node on free ports, stopped on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, random_suffix, tail};

/// Longest run of one `rabbitmqctl` command (joining a cluster takes seconds; a node that stopped answering, forever).
const CTL_LIMIT: Duration = Duration::from_secs(180);

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

/// Where Debian's RabbitMQ package keeps its real scripts: the wrappers in /usr/sbin switch to the rabbitmq user
/// (losing our environment).
const DEBIAN_SCRIPTS: &str = "/usr/lib/rabbitmq/bin";

fn rabbitmq_server() -> PathBuf {
    if let Ok(p) = std::env::var("ACM_FAULTS_RABBITMQ_SERVER") {
        return p.into();
    }
    crate::programs::require_program_in("rabbitmq-server", &[DEBIAN_SCRIPTS.into()])
}

impl RabbitNode {
    /// Configures a node under `base` and starts it.
    pub fn start_new(base: &Path) -> Self {
        let mut node = Self::configure(&base.join("rabbitmq"), "acmfault", free_port(), None);
        node.start();
        node
    }

    /// Configures (without starting) a node in the directory `base`, named `<name>-<random>@localhost`, using the
    /// epmd on `epmd_port` and, when given, an Erlang cookie (nodes of one cluster share both).
    pub fn configure(base: &Path, name: &str, epmd_port: u16, cookie: Option<&str>) -> Self {
        let base = base.to_path_buf();
        fs::create_dir_all(&base).expect("rabbitmq dir");
        let node = Self {
            name: format!("{name}-{}@localhost", random_suffix()),
            port: free_port(),
            dist_port: free_port(),
            epmd_port,
            base,
            child: None,
            starts: 0,
        };
        if let Some(cookie) = cookie {
            // HOME is the node's directory, for the server and for rabbitmqctl alike.
            let path = node.base.join(".erlang.cookie");
            fs::write(&path, cookie).expect("cookie file");
            let _ = Command::new("chmod").arg("400").arg(&path).status();
        }
        fs::write(node.base.join("rabbitmq-env.conf"), "").expect("env file");
        // The consistent-hash exchange serves the heartbeat shards.
        fs::write(node.base.join("enabled_plugins"), "[rabbitmq_consistent_hash_exchange].\n").expect("plugins file");
        fs::write(
            node.base.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{}\ndisk_free_limit.absolute = 50MB\nvm_memory_high_watermark.relative = 0.25\n",
                node.port
            ),
        )
        .expect("config file");
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

    /// SIGKILL the Erlang VM and its `rabbitmq-server` script at once (no shutdown of any kind), then reap.
    pub fn kill9(&mut self) {
        self.kill_beam();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
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
    /// The Erlang VM's (`beam.smp`) process id, once the node has written it (for the capacity bench).
    #[allow(dead_code)]
    pub fn beam_pid(&self) -> Option<u32> {
        fs::read_to_string(self.base.join("beam.pid")).ok()?.trim().parse().ok()
    }

    /// Runs `rabbitmqctl` against this node (its name, epmd port and cookie) and returns its output; fails the test
    /// when it does not succeed.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut c = Command::new(crate::programs::require_program_in("rabbitmqctl", &[DEBIAN_SCRIPTS.into()]));
        self.env(&mut c);
        c.arg("-n").arg(&self.name).args(args).stdin(Stdio::null());
        let out = crate::bounded::output_within(&mut c, CTL_LIMIT, &format!("rabbitmqctl {args:?}"));
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
        let Some(epmd) = crate::programs::find_program_in("epmd", &[]) else { return };
        let _ = Command::new(epmd)
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
