//! COM1 output, one whole line at a time: every line starts with `guest: ` and ends with
//! `\r\n`, and a spinlock keeps lines from different vCPUs from interleaving.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{inb, outb, rdtsc};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 0x20;
/// Longest line; longer ones are cut and end in `...`.
const LINE_MAX: usize = 240;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Programs COM1 for 115200 8N1, no interrupts, FIFOs on.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // LCR: 8N1
    outb(COM1 + 2, 0x07); // FCR: enable and clear FIFOs
    outb(COM1 + 4, 0x03); // MCR: DTR, RTS
}

fn putc(b: u8) {
    // Wait for the transmit holding register; give up after a while rather than hang
    // forever on a broken UART (a missing one reads 0xff: THRE set).
    for _ in 0..1_000_000 {
        if inb(LSR) & LSR_THRE != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// A line being formatted, on the stack.
struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
    cut: bool,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == LINE_MAX {
                self.cut = true;
                break;
            }
            // Keep one event per line.
            self.buf[self.len] = if b == b'\n' || b == b'\r' { b' ' } else { b };
            self.len += 1;
        }
        Ok(())
    }
}

impl Line {
    fn new(args: fmt::Arguments) -> Line {
        let mut line = Line {
            buf: [0; LINE_MAX],
            len: 0,
            cut: false,
        };
        let _ = line.write_str("guest: ");
        let _ = line.write_fmt(args);
        if line.cut {
            line.buf[LINE_MAX - 3..].copy_from_slice(b"...");
        }
        line
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn send(bytes: &[u8]) {
    for &b in bytes {
        putc(b);
    }
    putc(b'\r');
    putc(b'\n');
}

fn lock() {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

/// Sends one finished line (ring 0; the `PRINT` system call).
pub fn send_line(bytes: &[u8]) {
    lock();
    send(bytes);
    unlock();
}

/// Prints `guest: <args>` as one line, from ring 0 or ring 3.
pub fn print_line(args: fmt::Arguments) {
    let line = Line::new(args);
    if crate::sys::user_mode() {
        let b = line.bytes();
        crate::sys::call(crate::sys::PRINT, b.as_ptr() as u64, b.len() as u64);
    } else {
        send_line(line.bytes());
    }
}

/// Like [`print_line`], for panics and exceptions: in ring 0, if the lock is not free
/// within about a second (say this CPU died while holding it), prints anyway.
pub fn print_line_forced(args: fmt::Arguments) {
    if crate::sys::user_mode() {
        return print_line(args);
    }
    let line = Line::new(args);
    let t0 = rdtsc();
    let mut locked = false;
    for _ in 0..100_000_000u32 {
        if LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            locked = true;
            break;
        }
        if rdtsc().wrapping_sub(t0) > 4_000_000_000 {
            break;
        }
        core::hint::spin_loop();
    }
    send(line.bytes());
    if locked {
        unlock();
    }
}

/// `say!("ready cpus={}", n)` prints the line `guest: ready cpus=2`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::serial::print_line(format_args!($($arg)*)) };
}
