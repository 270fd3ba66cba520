//! The Python package (`python/`): installs its test wheel into the virtual environment `target/python-venv` and runs
//! its pytest suite there, against the same PostgreSQL and RabbitMQ as the other tests. Fails, with pytest's output,
//! when pytest fails.
//!
//! `./dev test` makes the environment (the test requirements from PyPI, maturin) and builds the wheel into
//! `target/python-wheel/` before `cargo test` starts: cargo holds the lock of the target directory while tests run,
//! and the wheel is built in that same directory (`.cargo/config.toml`), reusing what `cargo test` compiled, so it
//! cannot be built from here. A missing environment, or a wheel missing or older than the sources it is built from,
//! fails the test with one line saying to run `./dev test`. The wheel has the `dev` profile unless
//! `ACM_PYTHON_WHEEL_PROFILE=release` was set for `./dev test`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

// Only `output_within` is used here.
#[allow(dead_code)]
#[path = "common/bounded.rs"]
mod bounded;

/// Longest wait for pip to install the test wheel (no dependencies: it only unpacks the wheel).
const PIP_LIMIT: Duration = Duration::from_secs(300);
/// Longest wait for the pytest suite (about a minute here; `test_exit.py` alone starts 200 interpreters).
const PYTEST_LIMIT: Duration = Duration::from_secs(900);

/// The modules the tests import (`./dev test` installs them: the package's `test` extra).
const TEST_MODULES: &str =
    "import pytest, pytest_asyncio, pika, psycopg2, sqlalchemy, greenlet, asyncpg, fastapi, httpx, mypy, \
     opentelemetry.propagate";

/// What the wheel is built from (as `./dev`'s `wheel_sources`): a newer file among these makes it stale.
const WHEEL_SOURCES: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    ".cargo/config.toml",
    "src",
    "sql",
    "python/Cargo.toml",
    "python/Cargo.lock",
    "python/pyproject.toml",
    "python/src",
    "python/agent_connection_manager",
];

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// Runs `cmd` to its end, killed and failed when it takes longer than `limit`.
fn run(what: &str, cmd: &mut Command, limit: Duration) -> Output {
    let started = Instant::now();
    let out = bounded::output_within(cmd, limit, what);
    eprintln!("{what}: {:.1}s", started.elapsed().as_secs_f64());
    out
}

fn check(what: &str, out: &Output) {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The newest modification time under `path` (a file or a directory), skipping `__pycache__`.
fn newest(path: &Path) -> Option<(SystemTime, PathBuf)> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return Some((meta.modified().ok()?, path.to_path_buf()));
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter(|e| e.file_name() != "__pycache__")
        .filter_map(|e| newest(&e.path()))
        .max_by_key(|(t, _)| *t)
}

/// The test wheel in `dir`; fails with one line when it is missing or older than a source.
fn ready_wheel(root: &Path, dir: &Path) -> PathBuf {
    let wheel = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .unwrap_or_else(|| panic!("no test wheel in {}: run `./dev test` (it builds the wheel first)", dir.display()));
    let built = std::fs::metadata(&wheel).and_then(|m| m.modified()).expect("the wheel's modification time");
    let source = WHEEL_SOURCES.iter().filter_map(|s| newest(&root.join(s))).max_by_key(|(t, _)| *t);
    if let Some((_, file)) = source.filter(|(t, _)| *t > built) {
        panic!(
            "the test wheel {} is older than {}: run `./dev test` (it rebuilds the wheel first)",
            wheel.display(),
            file.display()
        );
    }
    wheel
}

#[test]
fn python_package_tests_pass() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = target_dir(&root);
    let python = target.join("python-venv").join("bin").join("python");
    let have = Command::new(&python).arg("-c").arg(TEST_MODULES).output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "{} is missing or lacks the test requirements: run `./dev test` (it makes the environment first)",
        python.display()
    );
    let wheel = ready_wheel(&root, &target.join("python-wheel"));

    let out = run(
        "installing the test wheel",
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--force-reinstall"])
            .arg(&wheel),
        PIP_LIMIT,
    );
    check("pip install (the test wheel)", &out);

    // Run from the target directory, so that `python/agent_connection_manager` (the sources, without the built
    // extension) cannot shadow the installed package.
    let out = run(
        "pytest",
        Command::new(&python)
            .args(["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--durations=5"])
            .arg(root.join("python").join("tests"))
            .current_dir(&target)
            .env_remove("ACM_CONFIG"),
        PYTEST_LIMIT,
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    check("pytest python/tests", &out);
}
