//! `breakwater check-health URL`: one `GET` over plain HTTP, success on a 2xx answer. A
//! container's `HEALTHCHECK` (or any supervisor) runs it, so a runtime image needs neither
//! curl nor a shell.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The URL is not `http://HOST:PORT/PATH`.
    #[error("{0:?} is not an http:// URL with a host")]
    BadUrl(String),
    /// Nothing answered, or the connection broke.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The answer is not HTTP.
    #[error("{0}: the answer is not HTTP")]
    NotHttp(String),
    /// The answer's status is not 2xx.
    #[error("{0}: status {1}")]
    Status(String, u16),
}

/// Connect, read and write deadline each.
const TIMEOUT: Duration = Duration::from_secs(3);
/// The most of an answer read: the status line is all that matters.
const MAX_ANSWER: u64 = 64 << 10;

/// Checks `url`; `Ok(status)` for a 2xx answer.
pub fn check(url: &str) -> Result<u16, CheckError> {
    let parsed = url::Url::parse(url).map_err(|_| CheckError::BadUrl(url.to_string()))?;
    let host = match parsed.host_str() {
        Some(h) if parsed.scheme() == "http" && !h.is_empty() => h,
        _ => return Err(CheckError::BadUrl(url.to_string())),
    };
    let port = parsed.port().unwrap_or(80);
    let io = |e| CheckError::Io(url.to_string(), e);
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| CheckError::BadUrl(url.to_string()))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(io)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let path = &parsed[url::Position::BeforePath..url::Position::AfterQuery];
    let authority = &parsed[url::Position::BeforeHost..url::Position::AfterPort];
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: {authority}\r\nuser-agent: breakwater-check-health\r\nconnection: close\r\n\r\n",
        path = if path.is_empty() { "/" } else { path },
    )
    .map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(io)?;
    let status = status_of(&answer).ok_or_else(|| CheckError::NotHttp(url.to_string()))?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(CheckError::Status(url.to_string(), status))
    }
}

/// The status code of an HTTP/1.x answer's status line.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\n').next()?;
    let mut parts = line.split(|b| *b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_is_read_strictly() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n\r\n"), Some(200));
        assert_eq!(
            status_of(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(status_of(b""), None);
    }

    #[test]
    fn only_http_urls_with_a_host_are_checked() {
        for bad in [
            "https://127.0.0.1/healthz",
            "127.0.0.1:8080",
            "http://:8080/",
            "ftp://h/",
        ] {
            assert!(matches!(check(bad), Err(CheckError::BadUrl(_))), "{bad}");
        }
    }
}
