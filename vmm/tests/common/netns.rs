//! Two "hosts" on one machine: network namespaces joined by a veth pair, made by the test
//! and removed when it ends. Traffic stays inside them.

use std::process::Command;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e} (install iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces `a` and `b` with addresses `addr_a`/`addr_b` on one veth link.
pub struct TwoHosts {
    pub a: String,
    pub b: String,
    pub addr_a: String,
    pub addr_b: String,
    veth_a: String,
}

impl TwoHosts {
    /// `tag` keeps names unique across tests running at the same time.
    pub fn new(tag: u8) -> TwoHosts {
        let pid = std::process::id() % 10000;
        let a = format!("ferry{pid}a{tag}");
        let b = format!("ferry{pid}b{tag}");
        let veth_a = format!("fva{pid}x{tag}");
        let veth_b = format!("fvb{pid}x{tag}");
        // A /30 of its own per tag (198.18.0.0/15 is reserved for benchmarking tests).
        let addr_a = format!("198.18.{tag}.1");
        let addr_b = format!("198.18.{tag}.2");
        let hosts = TwoHosts {
            a,
            b,
            addr_a,
            addr_b,
            veth_a,
        };
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &hosts.a])?;
            ip(&["netns", "add", &hosts.b])?;
            ip(&[
                "link",
                "add",
                &hosts.veth_a,
                "type",
                "veth",
                "peer",
                "name",
                &veth_b,
            ])?;
            ip(&["link", "set", &hosts.veth_a, "netns", &hosts.a])?;
            ip(&["link", "set", &veth_b, "netns", &hosts.b])?;
            for (ns, dev, addr) in [
                (&hosts.a, &hosts.veth_a, &hosts.addr_a),
                (&hosts.b, &veth_b, &hosts.addr_b),
            ] {
                ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            panic!("cannot make the test hosts: {e}");
        }
        hosts
    }

    /// Caps what host A sends over the link at `mbit` Mbit/s (a token bucket filter), so
    /// a test's guest outruns the link whatever this machine's speed.
    pub fn limit_rate(&self, mbit: u32) {
        let rate = format!("{mbit}mbit");
        let args = [
            "netns",
            "exec",
            &self.a,
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.veth_a,
            "root",
            "tbf",
            "rate",
            &rate,
            "burst",
            "256kb",
            "latency",
            "100ms",
        ];
        if let Err(e) = ip(&args) {
            panic!("cannot limit the link to {mbit} Mbit/s: {e}");
        }
    }

    /// Cuts the link silently: packets are dropped, no error reaches either side.
    pub fn cut_link(&self) {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "down"]).unwrap();
    }

    /// Mends what [`Self::cut_link`] cut.
    pub fn mend_link(&self) {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "up"]).unwrap();
        // The address comes back with the link; routes need a moment.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Runs `f` on a thread of its own that has joined network namespace `ns` (sockets it
/// makes live there and keep working from any thread afterwards).
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) on an open namespace file; it changes only this thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// [`spawn_in_netns`], waiting for `f`'s result.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f).join().unwrap()
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}
