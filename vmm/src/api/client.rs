//! A minimal client for the API socket: one request per connection, `Content-Length`
//! framed answers (what the server sends). Used by `ferry-remote` and the tests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::http::ErrorBody;
use super::routes::API_PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket {path}: malformed answer: {why}")]
    Malformed { path: PathBuf, why: String },
}

/// A status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The messages of a JSON error body (cloud-hypervisor's array of strings, or an
    /// older Ferry's `{"error": ...}`) joined by ": ", else the body as text.
    pub fn error_message(&self) -> String {
        #[derive(serde::Deserialize)]
        struct OldErrorBody {
            error: String,
        }
        if let Ok(v) = serde_json::from_slice::<ErrorBody>(&self.body) {
            if !v.is_empty() {
                return v.join(": ");
            }
        }
        match serde_json::from_slice::<OldErrorBody>(&self.body) {
            Ok(e) => e.error,
            Err(_) if self.body.is_empty() => format!("HTTP status {}", self.status),
            Err(_) => String::from_utf8_lossy(&self.body).into_owned(),
        }
    }

    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// Client of one API socket.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
}

/// Splits a raw answer into status, headers and body; None while incomplete.
pub fn parse_reply(raw: &[u8], eof: bool) -> Result<Option<(Reply, usize)>, String> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if eof {
            Err("connection closed before the answer's head was complete".into())
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("status line {status_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?}"));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| format!("status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for l in lines {
        let (n, v) = l
            .split_once(':')
            .ok_or_else(|| format!("header line {l:?}"))?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let start = head_end + 4;
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| {
            v.parse::<usize>()
                .map_err(|_| format!("Content-Length {v:?}"))
        })
        .transpose()?;
    let end = match length {
        Some(n) => start + n,
        None if status == 204 || (100..200).contains(&status) => start,
        // No length: the body runs to the end of the connection.
        None if eof => raw.len(),
        None => return Ok(None),
    };
    if raw.len() < end {
        return if eof {
            Err(format!(
                "connection closed after {} of {} body bytes",
                raw.len() - start,
                end - start
            ))
        } else {
            Ok(None)
        };
    }
    Ok(Some((
        Reply {
            status,
            headers,
            body: raw[start..end].to_vec(),
        },
        end,
    )))
}

impl Client {
    /// A client of the socket at `path`; `timeout` bounds each read and write (None: wait
    /// as long as the server takes, e.g. for a migration).
    pub fn new(path: impl AsRef<Path>, timeout: Option<Duration>) -> Client {
        Client {
            path: path.as_ref().to_path_buf(),
            timeout,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends raw bytes on a new connection and returns everything the server answers
    /// until it closes the connection (or the timeout passes).
    pub fn raw(&self, bytes: &[u8]) -> Result<Vec<u8>, ClientError> {
        let mut s = self.connect()?;
        // The server may answer and close before reading everything (e.g. 413).
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => Ok(out),
            Err(_) if !out.is_empty() => Ok(out),
            Err(e) => Err(self.io(e)),
        }
    }

    pub fn connect(&self) -> Result<UnixStream, ClientError> {
        let s = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: self.path.clone(),
            source,
        })?;
        s.set_read_timeout(self.timeout).map_err(|e| self.io(e))?;
        s.set_write_timeout(self.timeout).map_err(|e| self.io(e))?;
        Ok(s)
    }

    /// `method` on `/api/v1/<endpoint>` with an optional JSON body.
    pub fn request(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, ClientError> {
        let mut req = format!(
            "{method} {API_PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
        )
        .into_bytes();
        if let Some(b) = body {
            req.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    b.len()
                )
                .as_bytes(),
            );
        }
        req.extend_from_slice(b"\r\n");
        if let Some(b) = body {
            req.extend_from_slice(b);
        }
        let mut s = self.connect()?;
        s.write_all(&req).map_err(|e| self.io(e))?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = match s.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io(e)),
            };
            raw.extend_from_slice(&chunk[..n]);
            let parsed = parse_reply(&raw, n == 0).map_err(|why| ClientError::Malformed {
                path: self.path.clone(),
                why,
            })?;
            if let Some((reply, _)) = parsed {
                return Ok(reply);
            }
        }
    }

    pub fn get(&self, endpoint: &str) -> Result<Reply, ClientError> {
        self.request("GET", endpoint, None)
    }

    pub fn put(&self, endpoint: &str, body: Option<&[u8]>) -> Result<Reply, ClientError> {
        self.request("PUT", endpoint, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        let (r, n) = parse_reply(raw, false).unwrap().unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), n),
            (200, &b"{}"[..], raw.len())
        );
        assert_eq!(parse_reply(&raw[..raw.len() - 1], false), Ok(None));
        assert!(parse_reply(&raw[..raw.len() - 1], true).is_err());
        let (r, _) = parse_reply(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(r.status, 204);
        let e = Reply {
            status: 404,
            headers: vec![],
            body: br#"{"error":"no VM"}"#.to_vec(),
        };
        assert_eq!(e.error_message(), "no VM", "an older Ferry's shape");
        let e = Reply {
            body: br#"["no VM","it was deleted"]"#.to_vec(),
            ..e
        };
        assert_eq!(e.error_message(), "no VM: it was deleted");
        // Ferry's own status line, with no reason phrase.
        let (r, _) = parse_reply(
            b"HTTP/1.1 404 \r\nContent-Length: 9\r\n\r\n[\"no VM\"]",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.error_message().as_str()), (404, "no VM"));
        assert!(parse_reply(b"SPDY 200\r\n\r\n", false).is_err());
    }
}
