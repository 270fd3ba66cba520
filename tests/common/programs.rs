//! The host programs the tests run (`rabbitmqctl`, the fault suite's `initdb`, `pg_ctl`, `pg_basebackup`,
//! `rabbitmq-server`, `pgbouncer`, ...), found in one place: a test that needs one the machine lacks fails with one
//! line naming the program, where it was looked for and the package that has it (which `./dev test` installs).
//! Shared like `bounded.rs`: through `common` in the test binaries and the fault suite (`crate::programs`), included
//! directly in the capacity bench.

use std::path::{Path, PathBuf};

/// The Debian/Ubuntu package of each program the tests run.
const PACKAGES: &[(&str, &str)] = &[
    ("rabbitmqctl", "rabbitmq-server"),
    ("rabbitmq-server", "rabbitmq-server"),
    ("epmd", "erlang-base (a dependency of rabbitmq-server)"),
    ("initdb", "postgresql"),
    ("pg_ctl", "postgresql"),
    ("pg_basebackup", "postgresql"),
    ("pgbouncer", "pgbouncer"),
    ("runuser", "util-linux"),
    ("python3", "python3-venv"),
];

/// `name` on `PATH` (or `/usr/sbin`, which a non-root `PATH` may lack); fails the test with one line when it is
/// nowhere.
pub fn require_program(name: &str) -> PathBuf {
    require_program_in(name, &[])
}

/// `name` in the first of `dirs` that has it, else on `PATH` or in `/usr/sbin`; fails the test with one line naming
/// the program, the places looked in and its package when it is nowhere.
pub fn require_program_in(name: &str, dirs: &[PathBuf]) -> PathBuf {
    find_program_in(name, dirs).unwrap_or_else(|| {
        let package = PACKAGES.iter().find(|(p, _)| *p == name).map_or("the package that has it", |(_, pkg)| pkg);
        let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        let looked = if looked.is_empty() { "PATH".to_string() } else { format!("{}, PATH", looked.join(", ")) };
        panic!(
            "this test runs `{name}`, which is not installed (looked in {looked}, /usr/sbin): install {package} \
             (`./dev test` installs every program the tests need)"
        )
    })
}

/// `name` in the first of `dirs` that has it, else on `PATH` or in `/usr/sbin`; `None` when it is nowhere (for
/// clean-ups in `Drop`, which must not panic).
pub fn find_program_in(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    let sbin = [PathBuf::from("/usr/sbin")];
    dirs.iter().chain(&path_dirs).chain(&sbin).map(|d| d.join(name)).find(|p| is_executable(p))
}

/// Where to look first for the `rabbitmqctl` that reaches the machine's broker. Debian's `/usr/sbin/rabbitmqctl` runs
/// only for root (as the rabbitmq user); another user runs the script itself, in `/usr/lib/rabbitmq/bin`, with the
/// broker's Erlang cookie in `~/.erlang.cookie` (which `./dev test` copies there).
pub fn rabbitmqctl_dirs() -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if root {
        Vec::new()
    } else {
        vec![PathBuf::from("/usr/lib/rabbitmq/bin")]
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}
