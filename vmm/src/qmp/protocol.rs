//! QMP's wire shapes: the greeting, commands, answers, errors and events, and the framing
//! of the byte stream into JSON values (QMP sends JSON objects back to back; a line end
//! between them is customary, not required).

use serde_json::{json, Map, Value};

/// Largest message taken, in bytes: a longer one gets an error and is skipped up to the
/// next line end.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// QEMU's version Ferry announces: the QMP dialect its commands follow (QEMU 7.2).
pub const QEMU_VERSION: (u64, u64, u64) = (7, 2, 0);

/// QMP's error classes Ferry uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// A command's failure, as QMP reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub class: ErrorClass,
    pub desc: String,
}

impl Failure {
    pub fn generic(desc: impl Into<String>) -> Failure {
        Failure {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn not_found(desc: impl Into<String>) -> Failure {
        Failure {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

/// `version` as `query-version` and the greeting give it.
pub fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": concat!("ferry ", env!("CARGO_PKG_VERSION")),
    })
}

/// What the server sends first on every connection.
pub fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": []}})
}

/// A command as sent: `{"execute": NAME, "arguments": {...}, "id": ANY}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub name: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Reads a command out of a JSON value; the error carries the `id` when one was readable,
/// so that the answer still names it.
pub fn parse_command(v: Value) -> Result<Command, (Failure, Option<Value>)> {
    let Value::Object(mut obj) = v else {
        return Err((Failure::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    let fail = |desc: String, id: &Option<Value>| Err((Failure::generic(desc), id.clone()));
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "exec-oob"))
    {
        return fail(format!("QMP input member '{k}' is unexpected"), &id);
    }
    if obj.contains_key("exec-oob") {
        return fail(
            "QMP input member 'exec-oob' is unexpected: out-of-band execution is not \
             available (the greeting lists no 'oob' capability)"
                .into(),
            &id,
        );
    }
    let name = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => return fail("QMP input member 'execute' must be a string".into(), &id),
        None => return fail("QMP input lacks member 'execute'".into(), &id),
    };
    let arguments = match obj.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into(), &id),
    };
    Ok(Command {
        name,
        arguments,
        id,
    })
}

/// `{"return": ..., "id": ...}`.
pub fn success(ret: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// `{"error": {"class": ..., "desc": ...}, "id": ...}`.
pub fn error(f: &Failure, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert(
        "error".into(),
        json!({"class": f.class.name(), "desc": f.desc}),
    );
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// `{"event": NAME, "data": ..., "timestamp": {"seconds": S, "microseconds": US}}`, with
/// the wall-clock time as QEMU gives it.
pub fn event(name: &str, data: Value) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    })
}

/// The bytes of one message on the wire (QEMU ends each with CR LF).
pub fn to_wire(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.extend_from_slice(b"\r\n");
    b
}

/// What the framer found next in the stream.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Value(Value),
    /// Not JSON: the message (serde's), the rest of its line is skipped.
    Invalid(String),
    /// Longer than [`MAX_MESSAGE`]: skipped up to the next line end.
    TooLong,
}

impl Frame {
    /// The error answer for a frame that is not a value.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            Frame::Value(_) => None,
            Frame::Invalid(e) => Some(Failure::generic(format!("JSON parse error, {e}"))),
            Frame::TooLong => Some(Failure::generic(format!(
                "JSON parse error, message longer than {MAX_MESSAGE} bytes"
            ))),
        }
    }
}

/// Splits the bytes a client sends into JSON values, whatever the read boundaries.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Skipping the rest of a bad or too long message, up to the next line end.
    skipping: bool,
}

impl Framer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held, waiting for the rest of a message.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Skips to just past the next line end; without one, drops everything and keeps
    /// skipping.
    fn skip_line(&mut self) {
        match self.buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                self.buf.drain(..=i);
                self.skipping = false;
            }
            None => {
                self.buf.clear();
                self.skipping = true;
            }
        }
    }

    /// The next complete frame, None until more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        if self.skipping {
            self.skip_line();
            if self.skipping {
                return None;
            }
        }
        let start = self.buf.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start else {
            self.buf.clear();
            return None;
        };
        self.buf.drain(..start);
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match values.next()? {
            Ok(v) => {
                let used = values.byte_offset();
                self.buf.drain(..used);
                if used > MAX_MESSAGE {
                    return Some(Frame::TooLong);
                }
                Some(Frame::Value(v))
            }
            Err(e) if e.is_eof() => {
                if self.buf.len() > MAX_MESSAGE {
                    self.skip_line();
                    return Some(Frame::TooLong);
                }
                None
            }
            Err(e) => {
                self.skip_line();
                Some(Frame::Invalid(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::default();
        let mut out = vec![];
        for c in chunks {
            f.push(c);
            while let Some(x) = f.next_frame() {
                out.push(x);
            }
        }
        out
    }

    #[test]
    fn values_are_framed_whatever_the_read_boundaries() {
        let all = br#"{"execute": "a"}{"execute":"b"} {"execute": "c", "id": 1}
"#;
        for cut in 0..all.len() {
            let got = frames(&[&all[..cut], &all[cut..]]);
            assert_eq!(got.len(), 3, "cut at {cut}: {got:?}");
        }
    }

    #[test]
    fn bad_json_is_reported_and_the_line_skipped() {
        let got = frames(&[b"{\"execute\": nope}\n{\"execute\": \"x\"}\n"]);
        assert!(matches!(&got[0], Frame::Invalid(_)), "{got:?}");
        assert_eq!(got[1], Frame::Value(json!({"execute": "x"})));
        let d = got[0].failure().unwrap().desc;
        assert!(d.starts_with("JSON parse error, "), "{d}");
    }

    #[test]
    fn a_message_longer_than_the_limit_is_refused_then_the_next_one_served() {
        let long = format!("{{\"execute\": \"{}\"}}\n", "x".repeat(MAX_MESSAGE + 10));
        let mut chunks: Vec<&[u8]> = long.as_bytes().chunks(4096).collect();
        chunks.push(b"{\"execute\": \"y\"}");
        let got = frames(&chunks);
        assert_eq!(got[0], Frame::TooLong);
        assert_eq!(got[1], Frame::Value(json!({"execute": "y"})));
        assert_eq!(got.len(), 2, "{got:?}");
        // In one piece too.
        let got = frames(&[long.as_bytes(), b"{\"execute\": \"y\"}"]);
        assert_eq!(got[0], Frame::TooLong);
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn commands_are_checked_and_the_id_kept_in_errors() {
        let c = parse_command(json!({"execute": "stop", "id": {"a": [1]}})).unwrap();
        assert_eq!(c.name, "stop");
        assert_eq!(c.id, Some(json!({"a": [1]})));
        for (v, needle) in [
            (json!([1]), "must be a JSON object"),
            (json!({"id": 7}), "lacks member 'execute'"),
            (json!({"execute": 1, "id": 7}), "'execute' must be a string"),
            (
                json!({"execute": "x", "arguments": [], "id": 7}),
                "'arguments' must be an object",
            ),
            (
                json!({"execute": "x", "foo": 1, "id": 7}),
                "'foo' is unexpected",
            ),
        ] {
            let (f, id) = parse_command(v.clone()).unwrap_err();
            assert!(f.desc.contains(needle), "{v}: {}", f.desc);
            if v.get("id").is_some() {
                assert_eq!(id, Some(json!(7)));
            }
        }
    }

    #[test]
    fn shapes() {
        let g = greeting();
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], 7);
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        assert_eq!(
            success(json!({}), Some(json!("x"))),
            json!({"return": {}, "id": "x"})
        );
        assert_eq!(
            error(&Failure::not_found("n"), None),
            json!({"error": {"class": "CommandNotFound", "desc": "n"}})
        );
        let e = event("STOP", json!({}));
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 0);
        assert!(to_wire(&e).ends_with(b"}\r\n"));
    }

    /// Arbitrary bytes never panic the framer, and it never holds much more than the limit.
    #[test]
    fn arbitrary_bytes_do_not_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"{}[]\":,0123456789.eE+-truefalsnl \n\\u\x00\xff";
        for _ in 0..300 {
            let mut f = Framer::default();
            for _ in 0..20 {
                let mut chunk = vec![];
                for _ in 0..(seed % 700) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    chunk.push(alphabet[(seed % alphabet.len() as u64) as usize]);
                }
                f.push(&chunk);
                while let Some(fr) = f.next_frame() {
                    if let Frame::Value(v) = fr {
                        let _ = parse_command(v);
                    }
                }
                assert!(f.pending() <= MAX_MESSAGE + 700);
            }
        }
    }
}
