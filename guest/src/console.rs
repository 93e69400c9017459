//! Serial console: one byte per `out` to `PORT_SERIAL`, no `core::fmt`.
//!
//! Lines are written as a list of parts so a whole line is one call; the VMM assembles
//! lines per vCPU, so lines from different vCPUs do not mix.

use crate::abi;
use crate::arch::outb;

/// Writes raw bytes.
pub fn write(s: &[u8]) {
    for &b in s {
        outb(abi::PORT_SERIAL, b);
    }
}

/// Writes the parts, then a newline.
pub fn line(parts: &[&[u8]]) {
    for p in parts {
        write(p);
    }
    write(b"\n");
}

/// Writes `vcpu N: ` and the parts, then a newline.
pub fn vcpu_line(idx: u64, parts: &[&[u8]]) {
    write(b"vcpu ");
    write(Dec::new(idx).as_bytes());
    write(b": ");
    line(parts);
}

/// A number in decimal, formatted on the stack.
pub struct Dec {
    buf: [u8; 20],
    start: usize,
}

impl Dec {
    pub fn new(mut v: u64) -> Self {
        let mut d = Dec { buf: [b'0'; 20], start: 20 };
        loop {
            // u64::MAX has 20 digits, so `start` never goes below 0.
            d.start -= 1;
            if let Some(slot) = d.buf.get_mut(d.start) {
                *slot = b'0' + (v % 10) as u8;
            }
            v /= 10;
            if v == 0 || d.start == 0 {
                break;
            }
        }
        d
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or(b"?")
    }
}

/// A number as `0x` and 16 hex digits.
pub struct Hex {
    buf: [u8; 18],
}

impl Hex {
    pub fn new(v: u64) -> Self {
        let mut h = Hex { buf: [b'0'; 18] };
        h.buf[1] = b'x';
        let mut shift = 60u32;
        for slot in h.buf.iter_mut().skip(2) {
            let nib = ((v >> shift) & 0xf) as u8;
            *slot = if nib < 10 { b'0' + nib } else { b'a' + nib - 10 };
            shift = shift.wrapping_sub(4);
        }
        h
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
}
