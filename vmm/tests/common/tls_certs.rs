//! Certificates for the TLS migration tests, made with the `openssl` command (Debian's
//! `openssl` package): a CA, a receiver certificate with an IP subjectAltName, a sender
//! (client) certificate, and an unrelated second CA, laid out as `tls_dir`s.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e} (install the openssl package)"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA: its directory holds `ca-cert.pem` and `ca-key.pem`.
pub struct Ca {
    pub dir: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        std::fs::create_dir_all(dir).unwrap();
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
            ],
            dir,
        );
        Ca {
            dir: dir.to_path_buf(),
        }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// Issues `out/STEM-cert.pem` and `out/STEM-key.pem` (mode 0600) with `ext` as the
    /// certificate's extensions (openssl's syntax, one per line).
    pub fn issue(&self, out: &Path, stem: &str, cn: &str, ext: &str) {
        std::fs::create_dir_all(out).unwrap();
        let (key, csr, cert, extf) = (
            out.join(format!("{stem}-key.pem")),
            out.join(format!("{stem}.csr")),
            out.join(format!("{stem}-cert.pem")),
            out.join(format!("{stem}.ext")),
        );
        std::fs::write(&extf, ext).unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_string();
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &s(&key),
                "-out",
                &s(&csr),
            ],
            &self.dir,
        );
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &s(&extf),
                "-out",
                &s(&cert),
            ],
            &self.dir,
        );
        let _ = std::fs::remove_file(csr);
        let _ = std::fs::remove_file(extf);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Copies this CA's certificate into `dir` as its `ca-cert.pem`.
    pub fn trust_in(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(self.cert(), dir.join("ca-cert.pem")).unwrap();
    }
}

pub fn server_ext(ip: &str) -> String {
    format!(
        "subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n"
    )
}

pub const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n";

/// The `tls_dir`s of one test, under `root`.
pub struct TlsDirs {
    /// The receiver's: CA, server certificate for `server_ip`, its key.
    pub receiver: PathBuf,
    /// The sender's: the same CA, a client certificate, its key.
    pub sender: PathBuf,
    /// A sender trusting an unrelated CA (its own certificate is good).
    pub sender_wrong_ca: PathBuf,
    /// A sender whose client certificate the receiver's CA did not sign.
    pub sender_foreign_cert: PathBuf,
    /// A sender with the right CA and no client certificate at all (refused when loaded,
    /// naming client-cert.pem).
    pub sender_no_cert: PathBuf,
}

impl TlsDirs {
    pub fn new(root: &Path, server_ip: &str) -> TlsDirs {
        let ca = Ca::new(&root.join("ca"), "Ferry test CA");
        let other = Ca::new(&root.join("other-ca"), "Unrelated CA");
        let dirs = TlsDirs {
            receiver: root.join("receiver"),
            sender: root.join("sender"),
            sender_wrong_ca: root.join("sender-wrong-ca"),
            sender_foreign_cert: root.join("sender-foreign-cert"),
            sender_no_cert: root.join("sender-no-cert"),
        };
        ca.trust_in(&dirs.receiver);
        ca.issue(
            &dirs.receiver,
            "server",
            "ferry destination",
            &server_ext(server_ip),
        );
        ca.trust_in(&dirs.sender);
        ca.issue(&dirs.sender, "client", "ferry source", CLIENT_EXT);
        other.trust_in(&dirs.sender_wrong_ca);
        ca.issue(&dirs.sender_wrong_ca, "client", "ferry source", CLIENT_EXT);
        ca.trust_in(&dirs.sender_foreign_cert);
        other.issue(&dirs.sender_foreign_cert, "client", "stranger", CLIENT_EXT);
        ca.trust_in(&dirs.sender_no_cert);
        dirs
    }
}
