//! Waits with a bound on things outside the test process: child commands and HTTP requests. Shared by the test
//! helpers (`common`), the fault suite's infrastructure (`faults/infra.rs`, which reaches this file as
//! `crate::bounded`: through `common` in the fault suite, included directly in the capacity bench) and the throughput
//! bench.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on 127.0.0.1:`port`: the status and the body; `None` while nothing answers, or when the answer does not
/// come within 5 s.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), ask).await.ok()?
}

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
