//! Child processes run with a bound: for the test helpers (`common`) and the fault suite's infrastructure
//! (`faults/infra.rs`, which reaches it as `crate::process`, from `common` in the fault suite and included directly
//! in the capacity bench).

use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs `command` to its end and returns its output, waiting at most `limit`: past it the process is killed and the
/// test fails with `what` (a command talking to a node that stopped answering must not hang the suite).
pub fn output_within(command: &mut Command, limit: Duration, what: &str) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    // The waiting thread owns the child; this one keeps the pid to kill it when the time is up.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("{what} did not finish within {limit:?}; killed it (pid {pid})");
        }
    }
}
