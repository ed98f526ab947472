//! HTTP/1.1 for the API socket on top of `micro_http`, the HTTP library cloud-hypervisor
//! uses (vendored in `third_party/micro_http`).
//!
//! micro_http parses a request it is handed whole and writes responses; it does not frame
//! requests on a byte stream, and it is lenient where Ferry is not. [`parse_request`] is
//! the thin layer around it: a pure function over the bytes received so far that finds
//! where one request ends, enforces Ferry's limits and checks, lets micro_http parse the
//! request line, header fields and body, and names what is wrong in words a client can
//! act on. Nothing in it panics or allocates without bound, whatever the input: it is what
//! `fuzz/` exercises.
//!
//! Ferry's part, before micro_http sees a request: leading empty lines are skipped
//! (RFC 9112 2.2); bare LF line ends, bytes in the request line that no method, target or
//! version can hold, malformed header lines (no colon, whitespace before the colon,
//! obsolete line folding, control characters, a name that is not a token), heads over
//! [`MAX_HEAD`] bytes or with more than [`MAX_HEADERS`] fields, conflicting
//! `Content-Length` values, bodies over [`MAX_BODY`] bytes, and any `Transfer-Encoding`
//! (micro_http reads bodies by `Content-Length` only) are refused. Methods micro_http does
//! not know (it knows GET, PUT, PATCH and DELETE) still reach the route table, which
//! answers 405 naming the method to use.

use std::fmt;

use micro_http::{Body, MediaType, RequestError, StatusCode, Version};

/// Largest request head (request line and header fields) in bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest number of header fields.
pub const MAX_HEADERS: usize = 64;
/// Largest request body in bytes (a VM config is a few hundred bytes).
pub const MAX_BODY: usize = 1 << 20;

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
    /// Header fields in order, names as sent (micro_http keeps only some of them).
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
    #[error(
        "request line {line:?} holds byte {byte:#04x}, which no method, target or \
         version may hold (is this HTTP?)"
    )]
    NotText { line: String, byte: u8 },
    #[error("request line {0:?} is not 'METHOD SP TARGET SP HTTP-VERSION'")]
    BadRequestLine(String),
    #[error("request line {line:?}: method {method:?} is not a valid token")]
    BadMethod { line: String, method: String },
    #[error(
        "request line {line:?}: request target {target:?} is not an absolute path \
         like /api/v1/vm.info"
    )]
    BadTarget { line: String, target: String },
    #[error("request line {line:?}: {version:?} is not an HTTP version like HTTP/1.1")]
    BadVersion { line: String, version: String },
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
    #[error(
        "Transfer-Encoding: chunked is not supported (bodies are read by Content-Length); \
         send the body with a Content-Length"
    )]
    Chunked,
    #[error("Transfer-Encoding {0:?} is not supported; send the body with a Content-Length")]
    UnsupportedTransferEncoding(String),
    /// What micro_http refused and Ferry's checks did not name first.
    #[error("{part} refused by the HTTP parser: {why}")]
    Refused { part: &'static str, why: String },
}

impl ParseError {
    /// The status code of the response to this error.
    pub fn status(&self) -> u16 {
        match self {
            ParseError::HeadTooLarge | ParseError::TooManyHeaders => 431,
            ParseError::BodyTooLarge(_) => 413,
            ParseError::Chunked => 411,
            ParseError::UnsupportedVersion(_) => 505,
            ParseError::UnsupportedTransferEncoding(_) => 501,
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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Checks a header line micro_http would take or misread; returns (name, value trimmed).
fn check_header(line: &[u8]) -> Result<(String, String), ParseError> {
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
    // micro_http trims the name, so `Content-Length : 5` would count (RFC 9112 5.1 says
    // to refuse it).
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
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value)
            .trim_matches([' ', '\t'])
            .to_string(),
    ))
}

/// Comma-separated list elements of every field named `name`.
fn list_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .map(|e| e.trim_matches([' ', '\t']))
        .filter(|e| !e.is_empty())
        .collect()
}

/// Parses `bytes` (one whole request) with micro_http. A method micro_http does not know,
/// and GET or DELETE with a body (which micro_http refuses), are parsed as PUT so that the
/// rest is still checked and the route table answers for the method actually sent: 405
/// naming the right one, or, on an endpoint that takes that method, the body ignored as
/// the route table says.
fn micro_parse(
    bytes: &[u8],
    method_len: usize,
    has_body: bool,
) -> Result<micro_http::Request, RequestError> {
    let method = &bytes[..method_len];
    let as_is = match micro_http::Method::try_from(method) {
        Ok(micro_http::Method::Get | micro_http::Method::Delete) => !has_body,
        Ok(_) => true,
        Err(_) => !is_token(method),
    };
    if as_is {
        return micro_http::Request::try_from(bytes, Some(MAX_HEAD + MAX_BODY + 1));
    }
    let mut as_put = b"PUT".to_vec();
    as_put.extend_from_slice(&bytes[method_len..]);
    micro_http::Request::try_from(&as_put, Some(MAX_HEAD + MAX_BODY + 4))
}

/// Says which part of the request line micro_http refused, and why.
fn request_line_error(line: &[u8], e: RequestError) -> ParseError {
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let version = parts.next().unwrap_or_default();
    match e {
        RequestError::InvalidHttpMethod(_) => ParseError::BadMethod {
            line: shown(line),
            method: shown(method),
        },
        RequestError::InvalidHttpVersion(_) => match version {
            [b'H', b'T', b'T', b'P', b'/', a, b'.', b]
                if a.is_ascii_digit() && b.is_ascii_digit() =>
            {
                ParseError::UnsupportedVersion(shown(version))
            }
            _ => ParseError::BadVersion {
                line: shown(line),
                version: shown(version),
            },
        },
        RequestError::InvalidUri(_) if !target.is_empty() => ParseError::BadTarget {
            line: shown(line),
            target: shown(target),
        },
        _ => ParseError::BadRequestLine(shown(line)),
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
    let incomplete_head = ParseError::Incomplete(Partial {
        head_complete: false,
        expect_continue: false,
        needed: None,
    });
    // The head ends at the first empty line, within MAX_HEAD bytes.
    let window = &buf[at..buf.len().min(at + MAX_HEAD)];
    let head_end = find(window, b"\r\n\r\n").map(|i| at + i + 4);
    let head = &buf[at..head_end.unwrap_or(buf.len().min(at + MAX_HEAD + 1))];

    // Bare LFs, and bytes the request line cannot hold, as soon as they arrive: a client
    // that is not speaking HTTP/1.1 with CRLFs gets an answer rather than a timeout.
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            let line = 1 + head[..i].iter().filter(|&&c| c == b'\n').count();
            return Err(ParseError::BareLf { line });
        }
    }
    let line_end = find(head, b"\r\n");
    let line = &head[..line_end.unwrap_or(head.len())];
    // A trailing CR may be the start of the CRLF still to come.
    let checked = match line_end {
        None => line.strip_suffix(b"\r").unwrap_or(line),
        Some(_) => line,
    };
    if let Some(&byte) = checked.iter().find(|&&b| !(0x20..0x7f).contains(&b)) {
        return Err(ParseError::NotText {
            line: shown(line),
            byte,
        });
    }
    let Some(head_end) = head_end else {
        if buf.len() - at > MAX_HEAD {
            return Err(ParseError::HeadTooLarge);
        }
        return Err(incomplete_head);
    };
    // The head is complete, so is its request line.
    let line_end = at + line_end.unwrap_or(0);

    // The request line, by micro_http, as a head without fields.
    let method_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let mut bare = line.to_vec();
    bare.extend_from_slice(b"\r\n\r\n");
    let parsed_line =
        micro_parse(&bare, method_len, false).map_err(|e| request_line_error(line, e))?;
    let path = parsed_line.uri().get_abs_path();
    if path.is_empty() {
        let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
        return Err(ParseError::BadTarget {
            line: shown(line),
            target: shown(target),
        });
    }

    // Header fields: Ferry's checks, then micro_http's reading of them.
    let fields = &buf[line_end + 2..head_end - 2];
    let mut headers = Vec::new();
    for l in fields.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        if headers.len() == MAX_HEADERS {
            return Err(ParseError::TooManyHeaders);
        }
        headers.push(check_header(l.strip_suffix(b"\r").unwrap_or(l))?);
    }
    // micro_http ignores a coding it does not know, and reads a chunked body by
    // Content-Length: either would take body bytes for the next request.
    let te = list_values(&headers, "transfer-encoding");
    let has_te = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    if has_te {
        if !te.is_empty() && te.iter().all(|c| c.eq_ignore_ascii_case("chunked")) {
            return Err(ParseError::Chunked);
        }
        return Err(ParseError::UnsupportedTransferEncoding(shown(
            te.join(", ").as_bytes(),
        )));
    }
    // micro_http keeps the last Content-Length and takes `+5`; RFC 9112 6.3 wants digits,
    // and one value.
    let lengths: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_str())
        .collect();
    if let Some(bad) = lengths
        .iter()
        .find(|v| v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(ParseError::BadContentLength(shown(bad.as_bytes())));
    }
    if let Some(other) = lengths.iter().find(|v| **v != lengths[0]) {
        return Err(ParseError::ConflictingContentLength(
            shown(lengths[0].as_bytes()),
            shown(other.as_bytes()),
        ));
    }
    let fields = micro_http::Headers::try_from(fields).map_err(|e| match e {
        // Digits only (checked above), so too many for micro_http's u32.
        RequestError::HeaderError(micro_http::HttpHeaderError::InvalidValue(n, v))
            if n.trim().eq_ignore_ascii_case("content-length") =>
        {
            let v = v.trim();
            match v.parse::<u64>() {
                Ok(n) => ParseError::BodyTooLarge(n),
                Err(_) => ParseError::BadContentLength(shown(v.as_bytes())),
            }
        }
        e => ParseError::Refused {
            part: "the header fields were",
            why: e.to_string(),
        },
    })?;
    let length = fields.content_length();
    if length as usize > MAX_BODY {
        return Err(ParseError::BodyTooLarge(length.into()));
    }
    let end = head_end + length as usize;
    if buf.len() < end {
        return Err(ParseError::Incomplete(Partial {
            head_complete: true,
            expect_continue: fields.expect(),
            needed: Some(end),
        }));
    }

    // The whole request, by micro_http.
    let parsed =
        micro_parse(&buf[at..end], method_len, length > 0).map_err(|e| ParseError::Refused {
            part: "the request was",
            why: e.to_string(),
        })?;
    let version = parsed.http_version();
    let connection = list_values(&headers, "connection");
    let has = |t: &str| connection.iter().any(|c| c.eq_ignore_ascii_case(t));
    let keep_alive = match version {
        Version::Http11 => !has("close"),
        Version::Http10 => has("keep-alive") && !has("close"),
    };
    let target = parsed.uri().get_abs_path();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    Ok((
        Request {
            method: String::from_utf8_lossy(&line[..method_len]).into_owned(),
            path,
            query,
            version,
            headers,
            body: parsed.body.map(|b| b.body).unwrap_or_default(),
            keep_alive,
        },
        end,
    ))
}

/// A response: status, optional JSON body, and whether the connection closes after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    /// Value of an `Allow` header (405 answers): `GET` or `PUT`.
    pub allow: Option<&'static str>,
    pub close: bool,
}

/// The JSON body of every error answer, cloud-hypervisor's shape: an array of messages,
/// the error first and then its causes (Ferry's messages already name their cause, so
/// one entry).
pub type ErrorBody = Vec<String>;

/// micro_http's status code for `status`, or one of the same class to stand in for it
/// (its `StatusCode` has no 408, 411, 415, 431 or 505).
fn status_code(status: u16) -> StatusCode {
    match status {
        100 => StatusCode::Continue,
        204 => StatusCode::NoContent,
        401 => StatusCode::Unauthorized,
        404 => StatusCode::NotFound,
        405 => StatusCode::MethodNotAllowed,
        409 => StatusCode::Conflict,
        413 => StatusCode::PayloadTooLarge,
        429 => StatusCode::TooManyRequests,
        501 => StatusCode::NotImplemented,
        503 => StatusCode::ServiceUnavailable,
        // 200, 400 and 500 themselves, and stand-ins for the codes of their class that
        // StatusCode lacks (to_bytes puts the real digits in after writing).
        200..=299 => StatusCode::OK,
        400..=499 => StatusCode::BadRequest,
        _ => StatusCode::InternalServerError,
    }
}

impl Response {
    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
            allow: None,
            close: false,
        }
    }

    /// The interim answer to `Expect: 100-continue`.
    pub fn proceed() -> Response {
        Response {
            status: 100,
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

    /// The bytes to send, written by micro_http.
    ///
    /// Its status line, `HTTP/1.1 404 ` then CRLF with no reason phrase, is what
    /// cloud-hypervisor's client reads: everything after the version up to the line end
    /// is the code. Two things are put right afterwards: the three digits of a status its
    /// `StatusCode` lacks, and `Connection: keep-alive`, which it always writes, when the
    /// connection closes after this answer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let status = if (100..=599).contains(&self.status) {
            self.status
        } else {
            500
        };
        let mut r = micro_http::Response::new(Version::Http11, status_code(status));
        r.set_server("Ferry");
        // RFC 9110 8.6 and 15.2: no Content-Length in a 204 or a 1xx.
        if status != 204 && status >= 200 {
            if let Some(body) = self.body.as_ref().filter(|b| !b.is_empty()) {
                r.set_body(Body::new(body.clone()));
                r.set_content_type(MediaType::ApplicationJson);
            }
        }
        if let Some(allow) = self.allow {
            r.set_allow(
                allow
                    .split(',')
                    .filter_map(|m| micro_http::Method::try_from(m.trim().as_bytes()).ok())
                    .collect(),
            );
        }
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = r.write_all(&mut out);
        let prefix = b"HTTP/1.1 ".len();
        if let Some(code) = out.get_mut(prefix..prefix + 3) {
            code.copy_from_slice(format!("{status:03}").as_bytes());
        }
        if self.close {
            const KEEP: &[u8] = b"\r\nConnection: keep-alive\r\n";
            if let Some(i) = find(&out, KEEP) {
                out.splice(
                    i..i + KEEP.len(),
                    b"\r\nConnection: close\r\n".iter().copied(),
                );
            }
        }
        out
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
    fn a_method_micro_http_does_not_know_still_reaches_the_router() {
        let (r, _) = ok("POST /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!((r.method.as_str(), r.body.as_slice()), ("POST", &b"{}"[..]));
        let (r, _) = ok("get /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
        assert_eq!(r.method, "get");
        // micro_http refuses a body on GET; the router answers it instead.
        let (r, _) = ok("GET /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!((r.method.as_str(), r.body.as_slice()), ("GET", &b"{}"[..]));
        assert!(matches!(
            err(b"G@T /api/v1/vmm.ping HTTP/1.1\r\n\r\n"),
            ParseError::BadMethod { .. }
        ));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let s = "\r\nPUT http://localhost/api/v1/vm.create?x=1 HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}";
        let (r, _) = ok(s);
        assert_eq!(r.path, "/api/v1/vm.create");
        assert_eq!(r.query.as_deref(), Some("x=1"));
        assert_eq!(r.body, b"{}");
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
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
                413,
            ),
            (b"PUT /x HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
            (b"PUT /x HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n", 501),
            (b"PUT /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (
                b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
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
        // line end, trimmed, is the code; also for codes micro_http has no name for.
        let mut closing = Response::error(431, "too long");
        closing.close = true;
        for r in [
            Response::json(&1),
            Response::no_content(),
            Response::error(415, "form"),
            Response::error(505, "HTTP/2.0"),
            closing.clone(),
            r,
        ] {
            let b = String::from_utf8(r.to_bytes()).unwrap();
            let code = &b["HTTP/1.1 ".len()..b.find('\r').unwrap()];
            assert_eq!(code, format!("{} ", r.status), "{b}");
        }
        let b = String::from_utf8(Response::no_content().to_bytes()).unwrap();
        assert!(!b.contains("Content-Length"), "{b}");
        let b = String::from_utf8(closing.to_bytes()).unwrap();
        assert!(b.contains("\r\nConnection: close\r\n"), "{b}");
        assert!(!b.contains("keep-alive"), "{b}");
        let mut r = Response::error(405, "use PUT");
        r.allow = Some("PUT");
        let b = String::from_utf8(r.to_bytes()).unwrap();
        assert!(b.contains("\r\nAllow: PUT\r\n"), "{b}");
    }
}
