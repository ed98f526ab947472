//! A few AML encoders, enough for a DSDT describing the legacy devices and `_S5`.
//! Encodings from the ACPI specification, chapter 20 ("ACPI Machine Language").

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const QWORD_PREFIX: u8 = 0x0e;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';

/// PkgLength for a body of `body` bytes; the encoded value counts its own bytes too.
pub fn pkg_length(body: usize) -> Vec<u8> {
    // One byte holds 6 bits; with 1-3 follow bytes the lead byte keeps 4 bits.
    if body + 1 < 1 << 6 {
        return vec![(body + 1) as u8];
    }
    for follow in 1..=3usize {
        let total = body + 1 + follow;
        if total < 1 << (4 + 8 * follow) {
            let mut v = vec![((follow as u8) << 6) | (total & 0xf) as u8];
            v.extend((0..follow).map(|i| (total >> (4 + 8 * i)) as u8));
            return v;
        }
    }
    panic!("AML package of {body} bytes is beyond the 28-bit PkgLength");
}

/// A NameSeg: four characters, padded with '_'.
fn name_seg(s: &str) -> [u8; 4] {
    assert!(
        !s.is_empty()
            && s.len() <= 4
            && s.bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_'),
        "bad AML name segment {s:?}"
    );
    let mut seg = [b'_'; 4];
    seg[..s.len()].copy_from_slice(s.as_bytes());
    seg
}

/// A NameString of one segment, optionally rooted (`\_SB`).
pub fn name_string(name: &str) -> Vec<u8> {
    match name.strip_prefix('\\') {
        Some(rest) => [&[ROOT_CHAR][..], &name_seg(rest)].concat(),
        None => name_seg(name).to_vec(),
    }
}

/// The shortest integer encoding of `v`.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xff => vec![BYTE_PREFIX, v as u8],
        0x100..=0xffff => [&[WORD_PREFIX][..], &(v as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[DWORD_PREFIX][..], &(v as u32).to_le_bytes()].concat(),
        _ => [&[QWORD_PREFIX][..], &v.to_le_bytes()].concat(),
    }
}

/// `op PkgLength rest...`
fn with_pkg(op: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let mut v = op.to_vec();
    v.extend(pkg_length(body));
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// `Scope (name) { body }`
pub fn scope(name: &str, body: &[u8]) -> Vec<u8> {
    with_pkg(&[SCOPE_OP], &[&name_string(name), body])
}

/// `Device (name) { body }`
pub fn device(name: &str, body: &[u8]) -> Vec<u8> {
    with_pkg(&[EXT_OP_PREFIX, DEVICE_OP], &[&name_string(name), body])
}

/// `Name (name, value)`
pub fn name(name: &str, value: &[u8]) -> Vec<u8> {
    [&[NAME_OP][..], &name_string(name), value].concat()
}

/// `Package () { elements }`
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let count = u8::try_from(elements.len()).expect("AML package of more than 255 elements");
    let body = elements.concat();
    with_pkg(&[PACKAGE_OP], &[&[count], &body])
}

/// `Buffer () { bytes }`
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    with_pkg(&[BUFFER_OP], &[&integer(bytes.len() as u64), bytes])
}

/// `EisaId ("PNP0501")` as the DWord it compiles to: three 5-bit letters then four hex
/// digits, stored big-endian.
pub fn eisa_id(id: &str) -> u32 {
    let b = id.as_bytes();
    assert!(
        b.len() == 7 && b[..3].iter().all(u8::is_ascii_uppercase),
        "bad EISA id {id}"
    );
    let letter = |c: u8| u32::from(c - b'@');
    let hex = u32::from_str_radix(&id[3..], 16).expect("bad EISA id digits");
    let v = (letter(b[0]) << 26) | (letter(b[1]) << 21) | (letter(b[2]) << 16) | hex;
    v.swap_bytes()
}

/// `ResourceTemplate () { descriptors }`: a buffer ending with the End Tag (checksum 0,
/// which means "no checksum").
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = descriptors.concat();
    bytes.extend([0x79, 0x00]);
    buffer(&bytes)
}

/// `IO (Decode16, base, base, 1, len)`: a fixed 16-bit-decoded port range.
pub fn io_port(base: u16, len: u8) -> Vec<u8> {
    let [lo, hi] = base.to_le_bytes();
    vec![0x47, 0x01, lo, hi, lo, hi, 0x01, len]
}

/// `IRQNoFlags () { irq }`: an edge-triggered, active-high ISA interrupt.
pub fn irq_no_flags(irq: u8) -> Vec<u8> {
    assert!(irq < 16);
    let [lo, hi] = (1u16 << irq).to_le_bytes();
    vec![0x22, lo, hi]
}

/// General flags of an address space descriptor for a bridge's window: producer,
/// positive decode, fixed minimum and maximum.
const WINDOW_FIXED: u8 = 0x0c;

/// `WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, n)`.
pub fn word_bus_number(first: u16, last: u16) -> Vec<u8> {
    word_address(2, 0, first, last)
}

/// `WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0,
/// len)`.
pub fn word_io(min: u16, max: u16) -> Vec<u8> {
    word_address(1, 0x03, min, max)
}

fn word_address(kind: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
    let mut v = vec![0x88, 13, 0, kind, WINDOW_FIXED, type_flags];
    for w in [0, min, max, 0, max - min + 1] {
        v.extend(w.to_le_bytes());
    }
    v
}

/// `DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
/// 0, min, max, 0, len)`.
pub fn dword_memory(min: u32, max: u32) -> Vec<u8> {
    let mut v = vec![0x87, 23, 0, 0, WINDOW_FIXED, 0x01];
    for d in [0, min, max, 0, max - min + 1] {
        v.extend(d.to_le_bytes());
    }
    v
}

/// A `_PRT` entry: slot `slot`'s pin `pin` (0 = INTA) goes to global interrupt `gsi`
/// (no link device).
pub fn prt_entry(slot: u8, pin: u8, gsi: u32) -> Vec<u8> {
    package(&[
        integer((u64::from(slot) << 16) | 0xffff),
        integer(u64::from(pin)),
        integer(0),
        integer(u64::from(gsi)),
    ])
}

/// Test helpers shared with `acpi`'s tests.
#[cfg(test)]
pub(crate) mod tests_support {
    /// Decodes a PkgLength at the start of `b`: (value, bytes used).
    pub fn decode_pkg_length(b: &[u8]) -> (usize, usize) {
        let follow = usize::from(b[0] >> 6);
        if follow == 0 {
            return (usize::from(b[0] & 0x3f), 1);
        }
        let mut v = usize::from(b[0] & 0xf);
        for i in 0..follow {
            v |= usize::from(b[1 + i]) << (4 + 8 * i);
        }
        (v, 1 + follow)
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::decode_pkg_length;
    use super::*;

    #[test]
    fn pkg_length_boundaries_round_trip() {
        for body in [0, 1, 61, 62, 63, 100, 4092, 4093, 4094, 5000, 1 << 20] {
            let enc = pkg_length(body);
            let (v, n) = decode_pkg_length(&enc);
            assert_eq!(n, enc.len(), "body {body}");
            assert_eq!(v, body + n, "body {body}");
        }
        assert_eq!(pkg_length(62), vec![63]);
        assert_eq!(pkg_length(63), vec![0x41, 0x04]); // 65 = 0x41
    }

    #[test]
    fn known_encodings() {
        // Scope (\_SB) {}
        assert_eq!(
            scope("\\_SB", &[]),
            vec![0x10, 0x06, b'\\', b'_', b'S', b'B', b'_']
        );
        assert_eq!(eisa_id("PNP0501"), 0x0105_d041);
        assert_eq!(eisa_id("PNP0303"), 0x0303_d041);
        assert_eq!(integer(0), vec![0]);
        assert_eq!(integer(5), vec![0x0a, 5]);
        assert_eq!(integer(0x3f8), vec![0x0b, 0xf8, 0x03]);
        assert_eq!(integer(0x0105_d041), vec![0x0c, 0x41, 0xd0, 0x05, 0x01]);
        // Name (_S5, Package () { 5, 5, 0, 0 })
        let s5 = name(
            "_S5",
            &package(&[integer(5), integer(5), integer(0), integer(0)]),
        );
        assert_eq!(
            s5,
            vec![0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0]
        );
        // ResourceTemplate () { IO (Decode16, 0x3F8, 0x3F8, 1, 8) IRQNoFlags () {4} }
        let crs = resource_template(&[io_port(0x3f8, 8), irq_no_flags(4)]);
        assert_eq!(
            crs,
            vec![
                0x11, 0x10, 0x0a, 0x0d, 0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08, 0x22, 0x10,
                0x00, 0x79, 0x00
            ]
        );
    }
}
