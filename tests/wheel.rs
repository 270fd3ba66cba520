//! A wheel a team can install without Rust: the test wheel `./dev test` builds (`target/python-wheel/`, made as
//! the release wheel is, `maturin build --auditwheel repair`, with the dev profile) is an abi3 manylinux wheel; it
//! is installed into a fresh virtual environment whose `PATH` has no Rust toolchain, from the wheel alone (no
//! source build can happen), and README's FastAPI example (`python/tests/test_readme.py`) runs against it there.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::bounded::output_within;

/// Longest pip install of the example's requirements (from PyPI) and of the wheel.
const PIP_LIMIT: Duration = Duration::from_secs(300);
/// Longest run of the example's test.
const PYTEST_LIMIT: Duration = Duration::from_secs(180);
/// What README's example and its test import, beside the package: binary wheels only.
const EXAMPLE_REQUIREMENTS: &[&str] =
    &["pytest>=7", "pytest-asyncio>=0.23", "pika>=1.3", "psycopg2-binary>=2.9", "fastapi>=0.110", "httpx>=0.27"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// `PATH` without any directory that holds `cargo` or `rustc`.
fn path_without_rust(venv: &Path) -> String {
    let mut dirs = vec![venv.join("bin")];
    let system = std::env::var_os("PATH").unwrap_or_default();
    dirs.extend(std::env::split_paths(&system).filter(|d| !d.join("cargo").exists() && !d.join("rustc").exists()));
    std::env::join_paths(dirs).expect("a PATH").into_string().expect("a UTF-8 PATH")
}

fn check(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_wheel_installs_and_runs_the_readme_example_without_rust() {
    let dir = target().join("python-wheel");
    let wheel = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .unwrap_or_else(|| panic!("no wheel in {}: run `./dev test` (it builds the wheel first)", dir.display()));
    let name = wheel.file_name().and_then(|n| n.to_str()).expect("a wheel name").to_string();
    assert!(name.contains("-cp39-abi3-"), "not an abi3 wheel for CPython 3.9 or later: {name}");
    assert!(name.contains("manylinux"), "not a manylinux wheel: {name}");

    let venv = target().join("wheel-venv");
    let _ = std::fs::remove_dir_all(&venv);
    let python = std::env::var("ACM_PYTHON").unwrap_or_else(|_| "python3".into());
    let made = output_within(Command::new(&python).arg("-m").arg("venv").arg(&venv), PIP_LIMIT, "python3 -m venv");
    check("python3 -m venv", &made);
    let path = path_without_rust(&venv);
    let in_venv = |program: &str| {
        let mut c = Command::new(venv.join("bin").join(program));
        c.env("PATH", &path).env_remove("CARGO_HOME").env_remove("RUSTUP_HOME").env_remove("CARGO_TARGET_DIR");
        c
    };
    let no_rust = output_within(
        in_venv("python")
            .args(["-c", "import shutil, sys; sys.exit(1 if shutil.which('cargo') or shutil.which('rustc') else 0)"]),
        PIP_LIMIT,
        "looking for cargo",
    );
    check("a PATH without cargo and rustc", &no_rust);
    let pip = |args: &[&str], what: &str| {
        let out = output_within(
            in_venv("python")
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary", ":all:"])
                .args(args),
            PIP_LIMIT,
            what,
        );
        check(what, &out);
    };
    pip(EXAMPLE_REQUIREMENTS, "pip install (the example's requirements)");
    pip(&["--no-deps", "--no-index", wheel.to_str().expect("a UTF-8 path")], "pip install (the wheel)");

    // From the target directory, so that python/agent_connection_manager (the sources) cannot shadow the wheel.
    let out = output_within(
        in_venv("python")
            .args(["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE"])
            .arg(root().join("python").join("tests").join("test_readme.py"))
            .current_dir(target())
            .env_remove("ACM_CONFIG"),
        PYTEST_LIMIT,
        "pytest test_readme.py",
    );
    check("README's FastAPI example against the installed wheel", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 passed"), "the example's test did not run:\n{stdout}");
    let _ = std::fs::remove_dir_all(&venv);
}
