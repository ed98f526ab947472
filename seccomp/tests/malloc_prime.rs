//! A filtered thread may free memory: glibc's one-time read of
//! `/proc/sys/vm/overcommit_memory` (the first time a thread's heap shrinks) happens in
//! `init`, before any filter; failing that, the filter refuses the open rather than end
//! the process. Each case runs in a child process of this test binary, since filters and
//! glibc's answer are per process.

use std::process::Command;

use ferry_seccomp::{SeccompMode, ThreadKind};

const CHILD: &str = "FERRY_MALLOC_PRIME_CHILD";
const TEST: &str = "a_filtered_thread_may_shrink_its_heap";

/// The child: filters on, then a migration connection's thread grows its heap by 8 MiB
/// and frees it, as one did when its buffers went at the end of a pass.
fn child() {
    ferry_seccomp::init(SeccompMode::Enforce).expect("seccomp init");
    let t = ferry_seccomp::spawn(ThreadKind::MigrationReceiver, "shrinker".into(), || {
        let pieces: Vec<Vec<u8>> = (0..128)
            .map(|_| std::hint::black_box(Vec::with_capacity(64 << 10)))
            .collect();
        drop(std::hint::black_box(pieces));
    })
    .expect("spawn");
    t.join().expect("join");
    println!("child: the filtered thread freed its heap");
    std::process::exit(0);
}

fn run_child(skip_prime: bool) -> (Option<i32>, String) {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1");
    if skip_prime {
        cmd.env("FERRY_TEST_NO_MALLOC_PRIME", "1");
    }
    let out = cmd.output().expect("running the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn a_filtered_thread_may_shrink_its_heap() {
    if std::env::var_os(CHILD).is_some() {
        child();
    }
    // Primed: glibc read the file before any filter, the thread's free opens nothing.
    let (code, text) = run_child(false);
    assert_eq!(
        code,
        Some(0),
        "with malloc primed the child should run through:\n{text}"
    );
    assert!(
        text.contains("child: the filtered thread freed its heap") && !text.contains("openat"),
        "{text}"
    );

    // Not primed: the same free makes glibc open the file from the filtered thread. That
    // used to end the process; the handler now refuses the open (EACCES, which glibc
    // takes as "do not shrink") and says so.
    let (code, text) = run_child(true);
    assert_eq!(
        code,
        Some(0),
        "without priming the refused open should still let the child run through:\n{text}"
    );
    assert!(
        text.contains("'shrinker' (migration-receiver filter) made system call openat")
            && text.contains("refused with EACCES")
            && text.contains("child: the filtered thread freed its heap"),
        "the handler should name the thread and the refused openat:\n{text}"
    );
}
