//! One plain HTTP/1.1 request to the agent's `[http]` endpoint on loopback, written by
//! hand so the tests depend on no HTTP client of the project's own stack.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One request to `127.0.0.1:port`; the status code and the body.
pub fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    http_with(port, method, path, "")
}

/// As [`http`], with extra header lines (each ending in `\r\n`).
pub fn http_with(port: u16, method: &str, path: &str, headers: &str) -> (u16, String) {
    let (status, _, body) = exchange(port, method, path, headers);
    (status, body)
}

/// One request; the status code, the response head and the body.
pub fn exchange(port: u16, method: &str, path: &str, headers: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    (status, head.to_string(), body.to_string())
}
