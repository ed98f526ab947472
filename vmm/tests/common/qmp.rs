//! A small QMP client for the tests: answers matched to commands, events kept.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-qmp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A QMP connection: answers are matched to commands, events kept in arrival order.
pub struct Qmp {
    pub out: UnixStream,
    pub input: BufReader<UnixStream>,
    pub greeting: Value,
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (waiting up to 30 s for the socket) and reads the greeting.
    pub fn connect(path: &Path) -> Qmp {
        let end = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < end, "{}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            out: s.try_clone().unwrap(),
            input: BufReader::new(s),
            greeting: Value::Null,
            events: vec![],
        };
        q.greeting = q.read().expect("greeting");
        q
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> Qmp {
        let mut q = Qmp::connect(path);
        assert_eq!(q.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
        q
    }

    pub fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.input.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))),
        }
    }

    /// Sends raw bytes and returns the next answer (events on the way are kept).
    pub fn raw(&mut self, bytes: &[u8]) -> Value {
        self.out.write_all(bytes).unwrap();
        self.answer()
    }

    pub fn answer(&mut self) -> Value {
        loop {
            let v = self.read().expect("an answer");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Runs a command; its whole answer (`return` or `error`).
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        self.raw(format!("{msg}\n").as_bytes())
    }

    /// Runs a command that must succeed; its `return`.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let a = self.cmd(name, args);
        a.get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {a}"))
    }

    /// Waits for event `name` whose data has `pred`; consumes events up to it.
    pub fn event(&mut self, name: &str, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let end = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && pred(&e["data"]))
            {
                let e = self.events[i].clone();
                self.events.drain(..=i);
                return e;
            }
            assert!(
                Instant::now() < end,
                "no {name} event; got {:?}",
                self.events
            );
            let left = end.saturating_duration_since(Instant::now());
            self.input
                .get_ref()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.read() {
                Some(v) => self.events.push(v),
                None => panic!("connection ended waiting for {name}; got {:?}", self.events),
            }
        }
    }
}

pub fn error_of(a: &Value) -> (String, String) {
    let e = &a["error"];
    assert!(e.is_object(), "an error expected: {a}");
    (
        e["class"].as_str().unwrap().into(),
        e["desc"].as_str().unwrap().into(),
    )
}
