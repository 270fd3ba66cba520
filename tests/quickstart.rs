//! What a newcomer follows works: README's path without Docker, run with the built binary exactly as documented
//! (with its own database name, AMQP prefix and HTTP port), the worker's healthcheck in `docker-compose.yml`, the
//! protocol document's tables against the JSON Schemas in `schema/`, and the one-line failure of a test that needs a
//! host program the machine lacks.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, http_get, test_settings, CleanupGuard};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agent-connection-manager");
/// Longest wait for `/readyz` after the start (migrations, broker connection, consumers).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Longest wait for the exit after SIGTERM.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The worker process, its log file, and what to do if the test fails half-way: kill it, remove the log.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("the worker's status")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// README's "Without Docker" block, which this test follows.
fn documented_commands() -> String {
    let readme = repo_file("README.md");
    let section = readme.split("### Without Docker").nth(1).expect("README.md has a section `### Without Docker`");
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next());
    block.expect("the section has a sh block").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_path_without_docker_works() {
    let commands = documented_commands();
    for step in [
        "export ACM_DATABASE__URL=",
        "export ACM_AMQP__URL=",
        "export ACM_HTTP__LISTEN=127.0.0.1:9090",
        "cargo run --release -- run &",
        "curl localhost:9090/readyz",
        "cargo run --release -- session create --agent-id agent-1",
        "cargo run --release -- stats",
        "kill %1",
    ] {
        assert!(commands.contains(step), "README's path without Docker no longer says `{step}`:\n{commands}");
    }

    // The documented variables, pointing at this test's own database, prefix and port.
    let settings = test_settings();
    let _cleanup = CleanupGuard::new(&settings); // drops the database and the prefix's exchanges and queues
    let port = free_port();
    let env = |c: &mut Command| {
        for (k, _) in std::env::vars() {
            if k.starts_with("ACM_") {
                c.env_remove(k);
            }
        }
        c.env("ACM_DATABASE__URL", &settings.database.url)
            .env("ACM_AMQP__URL", &settings.amqp.url)
            .env("ACM_AMQP__PREFIX", &settings.amqp.prefix)
            .env("ACM_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env_remove("RUST_LOG")
            .current_dir(env!("CARGO_MANIFEST_DIR"));
    };
    let cli = |args: &[&str]| {
        let mut c = Command::new(BIN);
        env(&mut c);
        let out = c.args(args).output().expect("the binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "`{}` failed ({}): {stdout}\n{stderr}", args.join(" "), out.status);
        stdout
    };

    // `run &`, with its log in a file (a pipe nobody reads could fill up and stop the worker).
    let log = std::env::temp_dir().join(format!("acm-quickstart-{}.log", common::random_suffix()));
    let mut run = Command::new(BIN);
    env(&mut run);
    let stderr = std::fs::File::create(&log).expect("a log file");
    let child = run.arg("run").stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).spawn().expect("run starts");
    let mut worker = Worker { child, log };

    // `curl localhost:9090/readyz` until it answers 200: a bounded poll.
    let started = Instant::now();
    let ready_body = loop {
        if let Some(status) = worker.exited() {
            panic!("the worker exited ({status}) before /readyz answered 200; its log:\n{}", worker.log_tail());
        }
        let answer = http_get(port, "/readyz").await;
        if let Some((200, body)) = answer {
            break body;
        }
        assert!(
            started.elapsed() < READY_WITHIN,
            "/readyz did not answer 200 within {READY_WITHIN:?} (last answer: {answer:?}); the worker's log:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ready: Value = serde_json::from_str(&ready_body).expect("/readyz answers JSON");
    assert_eq!(ready["status"], "ready", "{ready_body}");
    // README's block shows the body as it comes: the checks, then the status.
    let shown = r#"{"checks":{...},"status":"ready"}"#;
    assert!(commands.contains(shown), "README's path without Docker no longer shows /readyz's body as {shown}");
    assert!(
        ready_body.starts_with(r#"{"checks":{"#) && ready_body.ends_with(r#"},"status":"ready"}"#),
        "/readyz's body is not what README shows ({shown}): {ready_body}"
    );

    // The worker's healthcheck in docker-compose.yml, against this worker.
    let compose = repo_file("docker-compose.yml");
    let probe = compose
        .lines()
        .find(|l| l.contains("/dev/tcp/127.0.0.1/9090"))
        .and_then(|l| l.rsplit_once("\"-c\", \"").map(|(_, rest)| rest.trim_end().trim_end_matches("\"]").to_string()))
        .expect("docker-compose.yml has the worker's healthcheck: bash -c with /dev/tcp/127.0.0.1/9090");
    let probe = probe.replace("\\\\", "\\").replace("127.0.0.1/9090", &format!("127.0.0.1/{port}"));
    let healthy = Command::new("bash").args(["-c", &probe]).status().expect("bash runs");
    assert!(healthy.success(), "the compose healthcheck fails against a ready worker: {probe}");

    // `session create --agent-id agent-1` prints the new session's id.
    let session_id = cli(&["session", "create", "--agent-id", "agent-1"]);
    uuid::Uuid::parse_str(&session_id).unwrap_or_else(|e| panic!("`session create` printed {session_id:?}: {e}"));

    // `stats` prints one JSON object that counts it.
    let stats: Value = serde_json::from_str(&cli(&["stats"])).expect("`stats` prints JSON");
    assert_eq!(stats["active_sessions"], 1, "{stats}");
    assert_eq!(stats["active_connections"], 0, "{stats}");
    for field in ["inactive_sessions", "pending_instructions", "sent_instructions", "total_instructions_pending"] {
        assert_eq!(stats[field], 0, "{field}: {stats}");
    }
    assert!(stats["timestamp"].is_string(), "{stats}");

    // `kill %1`: SIGTERM, then exit status 0 within a bound.
    let pid = worker.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = worker.exited() {
            break status;
        }
        assert!(
            stopping.elapsed() < EXIT_WITHIN,
            "the worker did not exit within {EXIT_WITHIN:?} of SIGTERM; its log:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM; the worker's log:\n{}", worker.log_tail());
    // A clean stop logs nothing at ERROR, from the worker or from the libraries under it (lapin once logged a
    // connection error for every channel it closed itself while the connection was closing).
    let log = std::fs::read_to_string(&worker.log).expect("the worker's log");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "ERROR lines in the log of a clean start and stop: {errors:#?}");

    // The healthcheck tells a stopped worker from a ready one.
    let stopped = Command::new("bash").args(["-c", &probe]).stderr(Stdio::null()).status().expect("bash runs");
    assert!(!stopped.success(), "the compose healthcheck passes with no worker");
}

/// The tables of a section of docs/protocol.md: for each row whose first cell is a backquoted name, the backquoted
/// lowercase words of the column `column` (field names, and values that [`is_value`] tells apart).
fn doc_table_fields(doc: &str, heading: &str, column: usize) -> Vec<(String, Vec<String>)> {
    let section = doc.split(heading).nth(1).unwrap_or_else(|| panic!("docs/protocol.md has no `{heading}`"));
    let section = section.split("\n## ").next().unwrap_or_default();
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        let name = cells[0].trim_matches('`').to_string();
        if !name.contains('.') {
            continue; // a header row such as `type`
        }
        let fields = cells[column]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|f| f.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .map(str::to_string)
            .collect();
        rows.push((name, fields));
    }
    rows
}

fn schema_properties(path: &Path) -> Vec<String> {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("a schema")).expect("JSON");
    let props = if schema["oneOf"].is_array() { &schema["oneOf"][0]["properties"] } else { &schema["properties"] };
    let mut names: Vec<String> = props.as_object().expect("properties").keys().cloned().collect();
    names.retain(|n| n != "type" && n != "event_type");
    names.sort();
    names
}

#[test]
fn the_protocol_document_lists_every_message_and_event_with_the_schemas_fields() {
    let doc = repo_file("docs/protocol.md");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
    for (heading, subdir, column) in [("## 3. Messages in", "messages", 1), ("## 9. Events out", "events", 1)] {
        let rows = doc_table_fields(&doc, heading, column);
        let mut listed: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
        listed.sort();
        listed.dedup();
        let mut files: Vec<String> = std::fs::read_dir(dir.join(subdir))
            .expect("schema directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().trim_end_matches(".json").to_string())
            .filter(|n| n != "all")
            .collect();
        files.sort();
        assert_eq!(listed, files, "the types `{heading}` lists against schema/{subdir}/");
        for name in &files {
            // The first table row of a type lists its fields (later tables of the section say what it does).
            let (_, fields) = rows.iter().find(|(n, _)| n == name).expect("listed");
            let mut documented: Vec<String> = fields.iter().filter(|f| !is_value(f)).cloned().collect();
            let want = schema_properties(&dir.join(subdir).join(format!("{name}.json")));
            documented.sort();
            documented.dedup();
            assert_eq!(documented, want, "fields of `{name}` in docs/protocol.md against schema/{subdir}/{name}.json");
        }
    }
}

/// Backquoted words in the field cells that are values, not field names.
fn is_value(word: &str) -> bool {
    [
        "amqp",
        "normal",
        "low",
        "high",
        "critical",
        "null",
        "received",
        "processed",
        "failed",
        "declined",
        "client_disconnect",
        "session_closed",
        "stale_connection",
        "heartbeat_backlog",
        "mass_stale",
    ]
    .contains(&word)
}

/// A test that needs a host program the machine lacks fails with one line naming it and how to get it.
#[test]
fn a_missing_host_program_fails_with_one_line_naming_it() {
    let missing = std::panic::catch_unwind(|| common::require_program("acm-no-such-program"));
    let message = missing.expect_err("a program that does not exist is not found");
    let message = message.downcast_ref::<String>().expect("a formatted message");
    assert!(
        !message.contains('\n') && message.contains("`acm-no-such-program`") && message.contains("`./dev test`"),
        "not one line naming the program and how to get it: {message}"
    );
}
