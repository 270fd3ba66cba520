//! What `deploy/` ships, checked with the tools operators use:
//! - every Kubernetes manifest against the Kubernetes 1.30 schemas in strict mode (`kubernetes-validate`, offline),
//!   and what no schema covers (the kustomizations, the KEDA and Prometheus Operator resources, the Deployment's
//!   settings) cross-checked by `tests/deploy/check.py`; the worker accepts `deploy/kubernetes/config.toml`;
//! - the alert rules with `promtool check rules` and their unit tests with `promtool test rules`, every alert with
//!   a runbook section in docs/operations.md and a test that fires it and one that keeps it quiet;
//! - the Grafana dashboard's structure, and that every metric the dashboard or an alert names is served by a
//!   running worker's `/metrics`, so a renamed metric cannot leave a dead panel or a silent alert.
//!
//! `kubernetes-validate` (with PyYAML) is installed from PyPI into `target/deploy-venv` when missing. `promtool`
//! comes from Debian's `prometheus` package and must be on `PATH`: the promtool test fails with one line saying so.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use common::{http_get, output_within, TestApp};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// What the checks import from PyPI.
const REQUIREMENT: &str = "kubernetes-validate>=1.30,<2";

/// The Kubernetes version the manifests must validate against.
const KUBERNETES_VERSION: &str = "1.30.0";

/// Kinds kubernetes-validate has no schema for (custom resources); `check.py manifests` covers them instead.
const UNVALIDATED_KINDS: &[&str] = &["ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"];

/// One test at a time creates the virtual environment.
static VENV: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The virtual environment's `bin/` with kubernetes-validate installed (installing it when missing).
fn venv_bin() -> PathBuf {
    let _one = VENV.lock().unwrap_or_else(|p| p.into_inner());
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let venv = target.join("deploy-venv");
    let bin = venv.join("bin");
    if !bin.join("python").exists() {
        let python = std::env::var("ACM_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = output_within(
            Command::new(&python).args(["-m", "venv"]).arg(&venv),
            Duration::from_secs(120),
            "python3 -m venv",
        );
        assert!(out.status.success(), "python3 -m venv (on Debian: apt-get install python3-venv): {}", text(&out));
    }
    let have = output_within(
        Command::new(bin.join("python")).args(["-c", "import kubernetes_validate, yaml"]),
        Duration::from_secs(60),
        "checking for kubernetes-validate",
    );
    if !have.status.success() {
        let out = output_within(
            Command::new(bin.join("python")).args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                REQUIREMENT,
            ]),
            Duration::from_secs(300),
            "pip install kubernetes-validate",
        );
        assert!(out.status.success(), "pip install {REQUIREMENT} failed: {}", text(&out));
    }
    bin
}

/// Runs `check.py WHAT` and returns its output; fails the test with its problems.
fn check_py(bin: &Path, what: &str) -> String {
    let out = output_within(
        Command::new(bin.join("python")).arg(root().join("tests/deploy/check.py")).arg(what).arg(root()),
        Duration::from_secs(60),
        "tests/deploy/check.py",
    );
    assert!(out.status.success(), "check.py {what} found problems:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir` ending in `.yaml`, recursively, but the kustomizations.
fn manifests(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            manifests(&path, into);
        } else if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
            into.push(path);
        }
    }
}

#[test]
fn kubernetes_manifests_validate_against_kubernetes_1_30_in_strict_mode() {
    let bin = venv_bin();
    let mut files = Vec::new();
    manifests(&root().join("deploy/kubernetes"), &mut files);
    files.sort();
    assert!(files.len() >= 6, "too few manifests found: {files:?}");
    let out = output_within(
        Command::new(bin.join("kubernetes-validate")).args(["-k", KUBERNETES_VERSION, "--strict"]).args(&files),
        Duration::from_secs(120),
        "kubernetes-validate",
    );
    let report = text(&out);
    assert!(out.status.success(), "kubernetes-validate --strict -k {KUBERNETES_VERSION} failed:\n{report}");
    // A core resource with a mistyped kind or apiVersion would have no schema either and pass unvalidated: only the
    // custom resources may.
    for line in report.lines().filter(|l| l.contains("Couldn't find schema")) {
        assert!(
            UNVALIDATED_KINDS.iter().any(|k| line.contains(&format!("for kind {k} "))),
            "a manifest no schema validates: {line}"
        );
    }
    let passed = report.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(passed, 5, "Deployment, Service, PodDisruptionBudget, two Secrets and nothing else:\n{report}");
    check_py(&bin, "manifests");
}

#[test]
fn the_worker_accepts_the_kubernetes_config_file() {
    let config = root().join("deploy/kubernetes/config.toml");
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_agent-connection-manager")).arg("config").env("ACM_CONFIG", &config),
        Duration::from_secs(30),
        "agent-connection-manager config",
    );
    let printed = text(&out);
    assert!(out.status.success(), "the worker refuses {}: {printed}", config.display());
    assert!(printed.contains(r#"listen = "0.0.0.0:9090""#), "http.listen not taken from the file:\n{printed}");
    assert!(printed.contains(r#"format = "json""#), "log.format not taken from the file:\n{printed}");
}

#[test]
fn alert_rules_pass_promtool_and_each_has_a_runbook_and_tests() {
    let promtool = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("promtool")).find(|f| f.is_file()))
        .unwrap_or_else(|| panic!("promtool not found on PATH: install Debian's prometheus package (see .ci/run)"));
    let dir = root().join("deploy/prometheus");
    for args in [["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]] {
        let out =
            output_within(Command::new(&promtool).args(args).current_dir(&dir), Duration::from_secs(60), "promtool");
        assert!(out.status.success(), "promtool {} failed:\n{}", args.join(" "), text(&out));
    }
    let summary = check_py(&venv_bin(), "alerts");
    eprintln!("{summary}");
}

/// Every sample name a `/metrics` body serves.
fn served(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_name_only_metrics_a_worker_serves() {
    let bin = tokio::task::spawn_blocking(venv_bin).await.expect("venv");
    eprintln!("{}", check_py(&bin, "dashboard"));
    let named: BTreeSet<String> = check_py(&bin, "names").lines().map(str::to_string).collect();
    assert!(named.len() >= 25, "too few metric names found in the dashboard and alerts: {named:?}");

    let app = TestApp::start().await;
    let stop = CancellationToken::new();
    let addr = "127.0.0.1:0".parse().expect("an address");
    let (bound, _server) =
        agent_connection_manager::http::serve(app.manager.clone(), addr, stop.clone()).await.expect("serves HTTP");
    let port = bound.port();
    // A command and a heartbeat, so that the families labelled by message type have a series.
    let sid = app.session("agent-deploy").await;
    let conn = app.ok(json!({"type": "connection.open", "agent_id": "agent-deploy", "session_id": sid})).await;
    let cid = conn["connection_id"].as_str().expect("connection_id").to_string();
    app.client.heartbeat("agent-deploy", &sid, &cid).await.expect("heartbeat published");
    let body = common::eventually("a heartbeat counted on /metrics", Duration::from_secs(20), || async {
        let (status, body) = http_get(port, "/metrics").await?;
        (status == 200 && body.contains(r#"acm_messages_consumed_total{type="agent.heartbeat""#)).then_some(body)
    })
    .await;
    let served = served(&body);
    let missing: Vec<&String> = named.iter().filter(|n| !served.contains(*n)).collect();
    assert!(missing.is_empty(), "named by the dashboard or an alert but not served: {missing:?}\n/metrics:\n{body}");
    stop.cancel();
    app.cleanup().await;
}
