//! The Python package (`python/`): installs it into a virtual environment under `target/` (`pip install ./python`,
//! built by maturin) and runs its pytest suite there, against the same PostgreSQL and RabbitMQ as the other tests.
//! Fails, with pytest's output, when pytest fails.
//!
//! The wheel is built in `target/python/` (its own cargo target directory: this test runs while `cargo test` holds
//! the root one), so later runs rebuild only what changed. It is built with the `dev` profile, which compiles in a
//! third of the CPU time of `release`; `ACM_PYTHON_WHEEL_PROFILE=release` tests the wheel users get. `ACM_PYTHON`
//! names the interpreter (default `python3`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

/// What the tests import beside the package, and maturin for building it without an isolated build environment.
const TEST_REQUIREMENTS: &[&str] = &[
    "maturin>=1.7,<2",
    "pytest>=7",
    "pytest-asyncio>=0.23",
    "pika>=1.3",
    "psycopg2-binary>=2.9",
    "sqlalchemy[asyncio]>=2",
    "asyncpg>=0.29",
    "fastapi>=0.110",
    "httpx>=0.27",
    "mypy>=1.10",
];

/// The modules those requirements provide (checked before asking pip).
const TEST_MODULES: &str =
    "import maturin, pytest, pytest_asyncio, pika, psycopg2, sqlalchemy, greenlet, asyncpg, fastapi, httpx, mypy";

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// `PATH` with `dir` first (where the build backend finds the `maturin` program).
fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
    std::env::join_paths(dirs).unwrap_or_default()
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let started = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
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

#[test]
fn python_package_tests_pass() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = target_dir(&root);
    let venv = target.join("python-venv");
    let python = venv.join("bin").join("python");

    if !python.exists() {
        let interpreter = std::env::var("ACM_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = run("creating the virtual environment", Command::new(&interpreter).arg("-m").arg("venv").arg(&venv));
        check("python3 -m venv (on Debian: apt-get install python3-venv)", &out);
    }

    let have = run("checking the test requirements", Command::new(&python).arg("-c").arg(TEST_MODULES));
    if !have.status.success() {
        let out = run(
            "installing the test requirements",
            Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .args(TEST_REQUIREMENTS),
        );
        check("pip install (test requirements)", &out);
    }

    let profile = std::env::var("ACM_PYTHON_WHEEL_PROFILE").unwrap_or_else(|_| "dev".into());
    let out = run(
        "building and installing the package",
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--force-reinstall"])
            .arg("--no-build-isolation")
            .arg(root.join("python"))
            .env("PATH", path_with(&venv.join("bin")))
            .env("MATURIN_PEP517_ARGS", format!("--profile {profile}"))
            .env("CARGO_TARGET_DIR", target.join("python")),
    );
    check("pip install ./python", &out);

    // Run from the target directory, so that `python/agent_connection_manager` (the sources, without the built
    // extension) cannot shadow the installed package.
    let out = run(
        "pytest",
        Command::new(&python)
            .args(["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--durations=5"])
            .arg(root.join("python").join("tests"))
            .current_dir(&target)
            .env_remove("ACM_CONFIG"),
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    check("pytest python/tests", &out);
}
