//! Interoperability: a Python backend and agent (pika) drive the real binary and validate every reply and event
//! against the JSON Schemas in `schema/`. The Python environment (pika, jsonschema) is the virtual environment
//! `target/python-venv` that `./dev test` makes before the tests (`ACM_TEST_PYTHON` names another interpreter); the
//! test fails with one line saying so when it lacks them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{test_settings, CleanupGuard};

fn venv_python() -> PathBuf {
    if let Some(p) = std::env::var_os("ACM_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let python = target.join("python-venv/bin/python");
    let ready = Command::new(&python).args(["-c", "import pika, jsonschema"]).output();
    assert!(
        ready.is_ok_and(|o| o.status.success()),
        "{} is missing or lacks pika and jsonschema: run `./dev test` (it makes the environment first)",
        python.display()
    );
    python
}

/// Longest wait for `interop.py` (a few seconds here).
const INTEROP_LIMIT: Duration = Duration::from_secs(180);

/// The worker process, killed when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_backend_and_agent_work_against_the_binary() {
    let python = venv_python();
    let settings = test_settings();
    let _guard = CleanupGuard::new(&settings);
    let child = Command::new(env!("CARGO_BIN_EXE_agent-connection-manager"))
        .arg("run")
        .env("ACM_DATABASE__URL", &settings.database.url)
        .env("ACM_AMQP__URL", &settings.amqp.url)
        .env("ACM_AMQP__PREFIX", &settings.amqp.prefix)
        .env("ACM_HTTP__LISTEN", "")
        .env("ACM_SWEEPER__CHECK_INTERVAL_SECS", "1")
        .env("ACM_SWEEPER__INSTRUCTION_RETRY_WINDOW_SECS", "1")
        .env_remove("ACM_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let worker = KillOnDrop(child);
    // The worker declares the topology; wait for the event exchange before the script binds to it.
    let events = format!("{}.events", settings.amqp.prefix);
    common::eventually("the worker to declare its topology", Duration::from_secs(30), || async {
        let (_conn, ch) = common::amqp_channel(&settings).await;
        let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
        ch.exchange_declare(events.as_str().into(), lapin::ExchangeKind::Topic, passive, Default::default()).await.ok()
    })
    .await;
    let started = Instant::now();
    let out = common::bounded::output_within(
        Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/interop.py"))
            .env("ACM_INTEROP_AMQP_URL", &settings.amqp.url)
            .env("ACM_INTEROP_PREFIX", &settings.amqp.prefix)
            .env("ACM_INTEROP_SCHEMA_DIR", Path::new(env!("CARGO_MANIFEST_DIR")).join("schema")),
        INTEROP_LIMIT,
        "interop.py",
    );
    drop(worker);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "interop.py failed after {:?}:\n{stdout}\n{stderr}", started.elapsed());
    assert!(stdout.contains("interop ok"), "{stdout}");
}
