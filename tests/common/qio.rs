//! Builders for `qemu-io -c` command strings.
//!
//! Tests spell their writes as `write(pattern, offset, len)` rather than as
//! format strings, so the offsets read as numbers and a typo cannot turn
//! into a different qemu-io command. Offsets and lengths are bytes and may
//! be unaligned (qemu-io does read-modify-write as needed).

/// `write -P PATTERN OFF LEN`: fill with one byte value.
pub fn write(pattern: u8, off: u64, len: u64) -> String {
    format!("write -P {pattern} {off} {len}")
}

/// `write -z OFF LEN`: zero write (a zero cluster/subcluster in qcow2 v3,
/// keeping any host allocation).
pub fn zero(off: u64, len: u64) -> String {
    format!("write -z {off} {len}")
}

/// `write -z -u OFF LEN`: zero write that may unmap (drop allocation).
pub fn zero_unmap(off: u64, len: u64) -> String {
    format!("write -z -u {off} {len}")
}

/// `write -c -P PATTERN OFF LEN`: compressed write; OFF and LEN must be
/// cluster-aligned.
pub fn write_compressed(pattern: u8, off: u64, len: u64) -> String {
    format!("write -c -P {pattern} {off} {len}")
}

/// `discard OFF LEN`: unaligned head and tail are ignored by qemu.
pub fn discard(off: u64, len: u64) -> String {
    format!("discard {off} {len}")
}
