//! What the seed generators share: the output directory from the command line, writing
//! one seed with its size shown, and the migration messages and pages they are made of.

use std::path::{Path, PathBuf};

use vm_migration::protocol::{encode, Message};
use vm_migration::PAGE_SIZE;

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

/// Appends `m`, encoded by the migration crate itself (so checksums are right).
pub fn msg(out: &mut Vec<u8>, m: Message<'_>) {
    encode(&m, out).expect("seed message encodes");
}

/// `n` pages where page `i` is data when `data(i)`, zero otherwise.
pub fn pages(n: usize, data: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut v = vec![0u8; n * PAGE_SIZE];
    for i in 0..n {
        if data(i) {
            let page = &mut v[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            for (j, b) in page.iter_mut().enumerate() {
                *b = (i * 31 + j * 7) as u8 | 1;
            }
        }
    }
    v
}
