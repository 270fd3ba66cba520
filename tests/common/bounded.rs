//! Waits with a bound on things outside the test process: child commands and HTTP requests. Shared by the test
//! helpers (`common`), the fault suite's infrastructure (`faults/infra.rs`, which reaches this file as
//! `crate::bounded`: through `common` in the fault suite, included directly in the capacity bench) and the throughput
//! bench.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `GET path` on 127.0.0.1:`port` (hyper's HTTP/1 client): the status and the body; `None` while nothing answers,
/// or when the answer does not come within 5 s.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let ask = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
        let driver = tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
            .body(Empty::<hyper::body::Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        driver.abort();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
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
