//! HTTP/1.1 request parsing and response writing for the API socket.
//!
//! [`parse_request`] is a pure function over the bytes received so far: it either returns
//! one complete request and how many bytes it used, or says why it cannot (yet). Nothing in
//! it panics or allocates without bound, whatever the input: it is what `fuzz/` exercises.
//!
//! Accepted: `METHOD SP TARGET SP HTTP/1.0|HTTP/1.1 CRLF`, header fields `name: value CRLF`,
//! an empty line, then a body framed by `Content-Length` or `Transfer-Encoding: chunked`.
//! Refused with a 4xx (or 505/501 where RFC 9112 says so): bare LF line ends, obsolete
//! line folding, whitespace before a field's colon, control characters, conflicting or
//! malformed framing, heads over [`MAX_HEAD`] bytes, more than [`MAX_HEADERS`] fields,
//! bodies over [`MAX_BODY`] bytes.

use std::fmt;

/// Largest request head (request line and header fields) in bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest number of header fields.
pub const MAX_HEADERS: usize = 64;
/// Largest request body in bytes (a VM config is a few hundred bytes).
pub const MAX_BODY: usize = 1 << 20;
/// Longest chunk-size line (size, extensions) in a chunked body.
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// One complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method token as sent (case-sensitive: `GET`, `PUT`, ...).
    pub method: String,
    /// The path of the request target, without query; absolute-form targets
    /// (`http://host/path`) are reduced to their path.
    pub path: String,
    /// The query string after `?`, if any (the API has no use for it).
    pub query: Option<String>,
    pub version: Version,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept after the response.
    pub keep_alive: bool,
}

impl Request {
    /// The value of the first header field named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the bytes received so far lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partial {
    /// The head is complete; only (part of) the body is missing.
    pub head_complete: bool,
    /// The client sent `Expect: 100-continue` and waits for an interim response.
    pub expect_continue: bool,
    /// Total bytes the request needs, when the framing tells.
    pub needed: Option<usize>,
}

/// Why bytes are not a request; [`ParseError::status`] is the status code to answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// More bytes are needed (not an error while the connection is open).
    #[error("the connection ended before the request was complete")]
    Incomplete(Partial),
    #[error("line {line} ends with a bare LF; HTTP lines end with CRLF")]
    BareLf { line: usize },
    #[error("request line {0:?} is not 'METHOD SP TARGET SP HTTP-VERSION'")]
    BadRequestLine(String),
    #[error("method {0:?} is not a valid token")]
    BadMethod(String),
    #[error("request target {0:?} is not an absolute path like /api/v1/vm.info")]
    BadTarget(String),
    #[error("{0:?} is not an HTTP version like HTTP/1.1")]
    BadVersion(String),
    #[error("HTTP version {0:?} is not supported (HTTP/1.0 and HTTP/1.1 are)")]
    UnsupportedVersion(String),
    #[error("header line {line:?} is malformed: {why}")]
    BadHeader { line: String, why: &'static str },
    #[error("the request head is longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the request has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("Content-Length {0:?} is not a decimal byte count")]
    BadContentLength(String),
    #[error("conflicting Content-Length values {0:?} and {1:?}")]
    ConflictingContentLength(String, String),
    #[error("a body of {0} bytes is larger than the limit of {MAX_BODY} bytes")]
    BodyTooLarge(u64),
    #[error("Transfer-Encoding {0:?} is not supported (only chunked is)")]
    UnsupportedTransferEncoding(String),
    #[error("Transfer-Encoding is not allowed in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    #[error("the request has both Transfer-Encoding and Content-Length")]
    LengthAndChunked,
    #[error("chunked body: {0}")]
    BadChunk(String),
    #[error("Expect {0:?} cannot be met (only 100-continue is supported)")]
    BadExpect(String),
}

impl ParseError {
    /// The status code of the response to this error.
    pub fn status(&self) -> u16 {
        match self {
            ParseError::Incomplete(_) => 400,
            ParseError::HeadTooLarge | ParseError::TooManyHeaders => 431,
            ParseError::BodyTooLarge(_) => 413,
            ParseError::UnsupportedVersion(_) => 505,
            ParseError::UnsupportedTransferEncoding(_) => 501,
            ParseError::BadExpect(_) => 417,
            _ => 400,
        }
    }
}

/// `tchar` of RFC 9110: the characters of a token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// Printable text of at most 100 bytes, for error messages about what a client sent.
fn shown(b: &[u8]) -> String {
    let cut = &b[..b.len().min(100)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if b.len() > cut.len() {
        s.push('…');
    }
    s
}

/// Finds the next CRLF-terminated line at `from`: returns (line without CRLF, next offset),
/// None when no line end is there yet, or a bare-LF error.
fn next_line(
    buf: &[u8],
    from: usize,
    line_no: usize,
) -> Result<Option<(&[u8], usize)>, ParseError> {
    let rest = &buf[from..];
    match rest.iter().position(|&b| b == b'\n') {
        None => Ok(None),
        Some(0) => Err(ParseError::BareLf { line: line_no }),
        Some(i) if rest[i - 1] != b'\r' => Err(ParseError::BareLf { line: line_no }),
        Some(i) => Ok(Some((&rest[..i - 1], from + i + 1))),
    }
}

fn parse_version(v: &[u8]) -> Result<Version, ParseError> {
    match v {
        b"HTTP/1.1" => Ok(Version::Http11),
        b"HTTP/1.0" => Ok(Version::Http10),
        [b'H', b'T', b'T', b'P', b'/', a, b'.', b] if a.is_ascii_digit() && b.is_ascii_digit() => {
            Err(ParseError::UnsupportedVersion(shown(v)))
        }
        _ => Err(ParseError::BadVersion(shown(v))),
    }
}

/// Splits the request target into path and query; reduces absolute-form to its path.
fn parse_target(t: &[u8]) -> Result<(String, Option<String>), ParseError> {
    let bad = || ParseError::BadTarget(shown(t));
    if t.is_empty() || !t.iter().all(|&b| (0x21..0x7f).contains(&b)) || t.contains(&b'#') {
        return Err(bad());
    }
    let origin = if t[0] == b'/' {
        t
    } else {
        let lower = t.get(..7).map(|p| p.to_ascii_lowercase());
        if lower.as_deref() != Some(b"http://".as_slice()) {
            return Err(bad());
        }
        let after = &t[7..];
        match after.iter().position(|&b| b == b'/') {
            Some(i) if i > 0 => &after[i..],
            _ => return Err(bad()),
        }
    };
    // Every byte is printable ASCII, so this is UTF-8.
    let s = String::from_utf8_lossy(origin);
    Ok(match s.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (s.into_owned(), None),
    })
}

fn parse_header(line: &[u8]) -> Result<(String, String), ParseError> {
    let bad = |why| ParseError::BadHeader {
        line: shown(line),
        why,
    };
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(bad(
            "obsolete line folding (a line starting with whitespace)",
        ));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| bad("no colon"))?;
    let name = &line[..colon];
    if name.is_empty() {
        return Err(bad("empty field name"));
    }
    if matches!(name.last(), Some(b' ' | b'\t')) {
        return Err(bad("whitespace before the colon"));
    }
    if !is_token(name) {
        return Err(bad("the field name is not a token"));
    }
    let value = &line[colon + 1..];
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(bad("control character in the field value"));
    }
    let value = String::from_utf8_lossy(value);
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        value.trim_matches([' ', '\t']).to_string(),
    ))
}

/// Comma-separated list elements of every field named `name`.
fn list_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .map(|e| e.trim_matches([' ', '\t']))
        .collect()
}

enum Framing {
    None,
    Length(usize),
    Chunked,
}

fn framing(headers: &[(String, String)], version: Version) -> Result<Framing, ParseError> {
    let te = list_values(headers, "transfer-encoding");
    let has_te = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    let has_cl = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    if has_te {
        if has_cl {
            return Err(ParseError::LengthAndChunked);
        }
        if version == Version::Http10 {
            return Err(ParseError::TransferEncodingInHttp10);
        }
        let codings: Vec<&str> = te.iter().copied().filter(|e| !e.is_empty()).collect();
        if codings.len() != 1 || !codings[0].eq_ignore_ascii_case("chunked") {
            return Err(ParseError::UnsupportedTransferEncoding(shown(
                te.join(", ").as_bytes(),
            )));
        }
        return Ok(Framing::Chunked);
    }
    if !has_cl {
        return Ok(Framing::None);
    }
    let values = list_values(headers, "content-length");
    let first = values[0];
    for v in &values[1..] {
        if *v != first {
            return Err(ParseError::ConflictingContentLength(
                shown(first.as_bytes()),
                shown(v.as_bytes()),
            ));
        }
    }
    if first.is_empty() || first.len() > 19 || !first.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadContentLength(shown(first.as_bytes())));
    }
    let n: u64 = first
        .parse()
        .map_err(|_| ParseError::BadContentLength(shown(first.as_bytes())))?;
    if n > MAX_BODY as u64 {
        return Err(ParseError::BodyTooLarge(n));
    }
    Ok(Framing::Length(n as usize))
}

/// Decodes a chunked body starting at `from`: the body and the offset after it.
fn parse_chunked(
    buf: &[u8],
    from: usize,
    partial: Partial,
) -> Result<(Vec<u8>, usize), ParseError> {
    let incomplete = ParseError::Incomplete(partial);
    let mut body = Vec::new();
    let mut at = from;
    loop {
        let rest = &buf[at..];
        // The line with its CRLF is shorter than MAX_CHUNK_LINE.
        let Some(nl) = rest.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
            if rest.len() >= MAX_CHUNK_LINE {
                return Err(ParseError::BadChunk(format!(
                    "chunk-size line of {MAX_CHUNK_LINE} bytes or more"
                )));
            }
            return Err(incomplete);
        };
        if nl == 0 || rest[nl - 1] != b'\r' {
            return Err(ParseError::BadChunk(
                "chunk-size line ends with a bare LF".into(),
            ));
        }
        let line = &rest[..nl - 1];
        let size_part = match line.iter().position(|&b| b == b';') {
            Some(i) => &line[..i],
            None => line,
        };
        let size_part = size_part
            .iter()
            .rposition(|&b| b != b' ' && b != b'\t')
            .map_or(&size_part[..0], |e| &size_part[..=e]);
        if size_part.is_empty()
            || size_part.len() > 8
            || !size_part.iter().all(|b| b.is_ascii_hexdigit())
        {
            return Err(ParseError::BadChunk(format!(
                "chunk size {:?} is not a hexadecimal number of at most 8 digits",
                shown(size_part)
            )));
        }
        if line[size_part.len()..]
            .iter()
            .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(ParseError::BadChunk(
                "control character in a chunk extension".into(),
            ));
        }
        // At most 8 hex digits: fits in u64 without overflow.
        let size = u64::from_str_radix(&String::from_utf8_lossy(size_part), 16)
            .map_err(|e| ParseError::BadChunk(e.to_string()))?;
        at += nl + 1;
        if size == 0 {
            break;
        }
        let total = body.len() as u64 + size;
        if total > MAX_BODY as u64 {
            return Err(ParseError::BodyTooLarge(total));
        }
        let size = size as usize;
        if buf.len() < at + size + 2 {
            return Err(incomplete);
        }
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(ParseError::BadChunk(format!(
                "chunk data of {size} bytes is not followed by CRLF"
            )));
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
    }
    // Trailer fields, then an empty line: at most MAX_HEAD bytes in all.
    let trailer_start = at;
    let mut trailers = 0;
    loop {
        match next_line(buf, at, 0) {
            Ok(None) => {
                if buf.len() - trailer_start > MAX_HEAD {
                    return Err(ParseError::HeadTooLarge);
                }
                return Err(incomplete);
            }
            Err(_) => {
                return Err(ParseError::BadChunk(
                    "trailer line ends with a bare LF".into(),
                ))
            }
            Ok(Some((line, next))) => {
                if next - trailer_start > MAX_HEAD {
                    return Err(ParseError::HeadTooLarge);
                }
                at = next;
                if line.is_empty() {
                    return Ok((body, at));
                }
                parse_header(line)?;
                trailers += 1;
                if trailers > MAX_HEADERS {
                    return Err(ParseError::TooManyHeaders);
                }
            }
        }
    }
}

/// Parses one request from the start of `buf`.
///
/// Returns the request and the number of bytes it took (the rest belongs to the next
/// request on the connection), [`ParseError::Incomplete`] when `buf` holds only a prefix of
/// a valid request, or the first error found. Errors are reported as soon as the bytes
/// that show them have arrived, before the whole request is there.
pub fn parse_request(buf: &[u8]) -> Result<(Request, usize), ParseError> {
    // RFC 9112 2.2: ignore empty lines before the request line.
    let mut at = 0;
    while buf[at..].starts_with(b"\r\n") && at < MAX_HEAD {
        at += 2;
    }
    let head_partial = Partial {
        head_complete: false,
        expect_continue: false,
        needed: None,
    };
    // Request line.
    let Some((line, mut next)) = next_line(buf, at, 1)? else {
        if buf.len() - at > MAX_HEAD {
            return Err(ParseError::HeadTooLarge);
        }
        // Check what is there already, so garbage is refused before its line ends.
        check_request_line_prefix(&buf[at..])?;
        return Err(ParseError::Incomplete(head_partial));
    };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::BadRequestLine(shown(line)));
    };
    if !is_token(method) {
        return Err(ParseError::BadMethod(shown(method)));
    }
    let (path, query) = parse_target(target)?;
    let version = parse_version(version)?;
    if next - at > MAX_HEAD {
        return Err(ParseError::HeadTooLarge);
    }

    // Header fields.
    let mut headers = Vec::new();
    let mut line_no = 2;
    loop {
        match next_line(buf, next, line_no)? {
            None => {
                if buf.len() - at > MAX_HEAD {
                    return Err(ParseError::HeadTooLarge);
                }
                // A partial field line that is already wrong.
                let rest = &buf[next..];
                if matches!(rest.first(), Some(b' ' | b'\t')) {
                    return Err(parse_header(rest).unwrap_err());
                }
                return Err(ParseError::Incomplete(head_partial));
            }
            Some((l, n)) => {
                // The head, up to and including its final empty line, fits in MAX_HEAD.
                if n - at > MAX_HEAD {
                    return Err(ParseError::HeadTooLarge);
                }
                next = n;
                line_no += 1;
                if l.is_empty() {
                    break;
                }
                if headers.len() == MAX_HEADERS {
                    return Err(ParseError::TooManyHeaders);
                }
                headers.push(parse_header(l)?);
            }
        }
    }
    let head_end = next;

    let mut expect_continue = false;
    for e in list_values(&headers, "expect") {
        if e.eq_ignore_ascii_case("100-continue") {
            expect_continue = true;
        } else {
            return Err(ParseError::BadExpect(shown(e.as_bytes())));
        }
    }
    let connection = list_values(&headers, "connection");
    let has = |t: &str| connection.iter().any(|c| c.eq_ignore_ascii_case(t));
    let keep_alive = match version {
        Version::Http11 => !has("close"),
        Version::Http10 => has("keep-alive") && !has("close"),
    };

    let (body, end) = match framing(&headers, version)? {
        Framing::None => (Vec::new(), head_end),
        Framing::Length(n) => {
            let end = head_end + n;
            if buf.len() < end {
                return Err(ParseError::Incomplete(Partial {
                    head_complete: true,
                    expect_continue,
                    needed: Some(end),
                }));
            }
            (buf[head_end..end].to_vec(), end)
        }
        Framing::Chunked => parse_chunked(
            buf,
            head_end,
            Partial {
                head_complete: true,
                expect_continue,
                needed: None,
            },
        )?,
    };
    Ok((
        Request {
            method: String::from_utf8_lossy(method).into_owned(),
            path,
            query,
            version,
            headers,
            body,
            keep_alive,
        },
        end,
    ))
}

/// Refuses an unfinished request line whose bytes already cannot start a valid one.
fn check_request_line_prefix(p: &[u8]) -> Result<(), ParseError> {
    let p = p.strip_suffix(b"\r").unwrap_or(p);
    let mut parts = p.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if !method.iter().all(|&b| is_tchar(b)) || (method.is_empty() && !p.is_empty()) {
        return Err(ParseError::BadMethod(shown(method)));
    }
    if let Some(target) = parts.next() {
        if target.iter().any(|&b| !(0x21..0x7f).contains(&b)) {
            return Err(ParseError::BadTarget(shown(target)));
        }
    }
    if let Some(version) = parts.next() {
        if !b"HTTP/".starts_with(&version[..version.len().min(5)]) {
            return Err(ParseError::BadVersion(shown(version)));
        }
    }
    if parts.next().is_some() || p.contains(&b'\r') {
        return Err(ParseError::BadRequestLine(shown(p)));
    }
    Ok(())
}

/// A response: status, optional JSON body, and whether the connection closes after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    /// Value of an `Allow` header (405 answers).
    pub allow: Option<&'static str>,
    pub close: bool,
}

/// The JSON body of every error answer, cloud-hypervisor's shape: an array of messages,
/// the error first and then its causes (Ferry's messages already name their cause, so
/// one entry).
pub type ErrorBody = Vec<String>;

impl Response {
    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
            allow: None,
            close: false,
        }
    }

    /// 200 with `value` as JSON.
    pub fn json<T: serde::Serialize>(value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status: 200,
                body: Some(body),
                allow: None,
                close: false,
            },
            Err(e) => Response::error(500, format!("cannot encode the answer as JSON: {e}")),
        }
    }

    /// `status` with `["message"]`.
    pub fn error(status: u16, message: impl fmt::Display) -> Response {
        let body: ErrorBody = vec![message.to_string()];
        let body = serde_json::to_vec(&body).unwrap_or_else(|_| b"[\"unknown\"]".to_vec());
        Response {
            status,
            body: Some(body),
            allow: None,
            close: false,
        }
    }

    /// The bytes to send.
    pub fn to_bytes(&self) -> Vec<u8> {
        // No reason phrase (RFC 9112 allows an empty one): cloud-hypervisor's client reads
        // everything after the version up to the line end as the status code.
        let mut out = format!("HTTP/1.1 {} \r\nServer: Ferry\r\n", self.status);
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        if self.close {
            out.push_str("Connection: close\r\n");
        }
        // RFC 9110 8.6: no Content-Length in a 204.
        let body = if self.status == 204 {
            &[][..]
        } else {
            let b = self.body.as_deref().unwrap_or_default();
            if !b.is_empty() {
                out.push_str("Content-Type: application/json\r\n");
            }
            out.push_str(&format!("Content-Length: {}\r\n", b.len()));
            b
        };
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> (Request, usize) {
        parse_request(s.as_bytes()).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &[u8]) -> ParseError {
        match parse_request(s) {
            Ok(r) => panic!("{:?} parsed as {r:?}", String::from_utf8_lossy(s)),
            Err(e) => e,
        }
    }

    #[test]
    fn simple_get() {
        let s = "GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let (r, n) = ok(s);
        assert_eq!(n, s.len());
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/api/v1/vm.info");
        assert_eq!(r.header("HOST"), Some("localhost"));
        assert!(r.keep_alive);
        assert!(r.body.is_empty());
    }

    #[test]
    fn body_by_length_and_pipelining() {
        let s = "PUT /a HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcdGET /b HTTP/1.0\r\n\r\n";
        let (r, n) = ok(s);
        assert_eq!(r.body, b"abcd");
        let (r2, n2) = ok(&s[n..]);
        assert_eq!(r2.path, "/b");
        assert!(!r2.keep_alive);
        assert_eq!(n + n2, s.len());
    }

    #[test]
    fn chunked_body() {
        let s = "PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n";
        let (r, n) = ok(s);
        assert_eq!(r.body, b"abcde");
        assert_eq!(n, s.len());
        for cut in 0..s.len() {
            assert!(
                matches!(
                    parse_request(&s.as_bytes()[..cut]),
                    Err(ParseError::Incomplete(_))
                ),
                "prefix of {cut} bytes"
            );
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let s = "\r\nPUT http://localhost/api/v1/vm.create?x=1 HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}";
        let (r, _) = ok(s);
        assert_eq!(r.path, "/api/v1/vm.create");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        for cut in 0..s.len() {
            match parse_request(&s.as_bytes()[..cut]) {
                Err(ParseError::Incomplete(p)) => {
                    if p.head_complete {
                        assert!(p.expect_continue);
                        assert_eq!(p.needed, Some(s.len()));
                    }
                }
                other => panic!("prefix of {cut} bytes: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_and_their_status() {
        let cases: &[(&[u8], u16)] = &[
            (b"GET /x HTTP/1.1\n\n", 400),
            (b"GET  /x HTTP/1.1\r\n\r\n", 400),
            (b"G(T /x HTTP/1.1\r\n\r\n", 400),
            (b"GET x HTTP/1.1\r\n\r\n", 400),
            (b"GET /x HTTP/2.0\r\n\r\n", 505),
            (b"GET /x HTTQ/1.1\r\n\r\n", 400),
            (b"GET /x HTTP/1.1\r\nA : b\r\n\r\n", 400),
            (b"GET /x HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400),
            (b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"PUT /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
            (b"PUT /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (
                b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
                400,
            ),
            (
                b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                400,
            ),
            (b"PUT /x HTTP/1.1\r\nExpect: 200-ok\r\n\r\n", 417),
            (b"\x00\x01\x02", 400),
        ];
        for (s, status) in cases {
            let e = err(s);
            assert_eq!(e.status(), *status, "{:?}: {e}", String::from_utf8_lossy(s));
        }
    }

    #[test]
    fn limits() {
        let big = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(err(big.as_bytes()), ParseError::HeadTooLarge);
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(err(many.as_bytes()), ParseError::TooManyHeaders);
        let endless = "GET / HTTP/1.1\r\nX: ".to_string() + &"y".repeat(MAX_HEAD);
        assert_eq!(err(endless.as_bytes()), ParseError::HeadTooLarge);
    }

    #[test]
    fn head_limit_is_exact_and_prefixes_stay_incomplete() {
        let head = |pad: usize| format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(pad));
        let pad = MAX_HEAD - head(0).len();
        let s = head(pad);
        assert_eq!(s.len(), MAX_HEAD);
        assert_eq!(ok(&s).1, MAX_HEAD);
        for cut in (0..s.len()).step_by(97).chain(s.len() - 4..s.len()) {
            assert!(
                matches!(
                    parse_request(&s.as_bytes()[..cut]),
                    Err(ParseError::Incomplete(_))
                ),
                "prefix of {cut} bytes"
            );
        }
        assert_eq!(err(head(pad + 1).as_bytes()), ParseError::HeadTooLarge);
        assert_eq!(
            err(&head(pad + 1).as_bytes()[..MAX_HEAD + 1]),
            ParseError::HeadTooLarge
        );
    }

    #[test]
    fn response_bytes() {
        let r = Response::error(404, "no such endpoint \"/x\"");
        let b = String::from_utf8(r.to_bytes()).unwrap();
        assert!(b.starts_with("HTTP/1.1 404 \r\n"), "{b}");
        assert!(
            b.ends_with("\r\n\r\n[\"no such endpoint \\\"/x\\\"\"]"),
            "{b}"
        );
        // As cloud-hypervisor's client reads it: everything after the version up to the
        // line end, trimmed, is the code.
        for r in [Response::json(&1), Response::no_content(), r] {
            let b = String::from_utf8(r.to_bytes()).unwrap();
            let code = &b["HTTP/1.1 ".len()..b.find('\r').unwrap()];
            assert_eq!(code.trim().parse::<u16>(), Ok(r.status), "{b}");
        }
        let b = String::from_utf8(Response::no_content().to_bytes()).unwrap();
        assert!(!b.contains("Content-Length"), "{b}");
    }
}
