//! What the seed generators share: the output directory from the command line, and
//! writing one seed with its size shown.

use std::path::{Path, PathBuf};

/// The directory given as the only argument (created); `usage` names the generator.
pub fn out_dir(usage: &str) -> PathBuf {
    let dir: PathBuf = std::env::args_os().nth(1).expect(usage).into();
    std::fs::create_dir_all(&dir).expect("seed directory");
    dir
}

pub fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    println!("{:>8} bytes  {}", bytes.len(), path.display());
}
