//! The `ferry` command line's option values (`--cpus`, `--memory`, `--serial`, `--disk`,
//! `--rng`, `--user-device`, `--device`, `--dirty-ring`): each parser refuses what it
//! cannot take with an error that names it, and never panics. The input's first byte
//! picks the parser, the rest is the value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let refused = match which % 9 {
        0 => config::parse_cpus(s).err().map(|e| e.to_string()),
        1 => config::parse_memory(s).err().map(|e| e.to_string()),
        2 => config::parse_serial(s).err().map(|e| e.to_string()),
        3 => config::parse_disk(s).err().map(|e| e.to_string()),
        4 => config::parse_rng(s).err().map(|e| e.to_string()),
        5 => config::parse_user_device(s).err().map(|e| e.to_string()),
        6 => config::parse_device(s).err().map(|e| e.to_string()),
        7 => config::parse_dirty_ring(s).err().map(|e| e.to_string()),
        _ => config::parse_size(s).err(),
    };
    if let Some(msg) = refused {
        assert!(!msg.is_empty());
    }
});
