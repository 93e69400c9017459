//! Page frames, the bulk of a migration: built in place on the way out and read
//! straight into the page's own buffer on the way in (one copy each side besides the
//! kernel's).

use std::io::Read;

use super::{
    check_page, crc32, is_page_frame, le_u16, le_u32, le_u64, parse_payload, read_full,
    read_header, read_rest, ty, Header, Limits, Message, WireError, HEADER, MAGIC, PAGE_URGENT,
    PAGE_ZERO, VERSION,
};

/// Appends one `Page` frame for `gpa` to `out`, one page of `page_size` bytes (the
/// session's) written in place by `fill`
/// (so the page is copied once, by `fill`, on its way to the socket); a page of zeros
/// goes as [`PAGE_ZERO`] without its bytes. `flags` may hold [`PAGE_URGENT`]. Returns the
/// frame's bytes and whether it went as zeros; on `fill`'s error nothing is appended.
pub fn append_page<E>(
    out: &mut Vec<u8>,
    gpa: u64,
    flags: u32,
    page_size: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<(usize, bool), E> {
    let start = out.len();
    let data_at = start + HEADER + 12;
    out.resize(data_at + page_size, 0);
    if let Err(e) = fill(&mut out[data_at..]) {
        out.truncate(start);
        return Err(e);
    }
    let zero = out[data_at..]
        .chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0);
    let flags = (flags & PAGE_URGENT) | if zero { PAGE_ZERO } else { 0 };
    if zero {
        out.truncate(data_at);
    }
    let len = (out.len() - start - HEADER) as u32;
    let f = &mut out[start..];
    f[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    f[4..6].copy_from_slice(&VERSION.to_le_bytes());
    f[6..8].copy_from_slice(&ty::PAGE.to_le_bytes());
    f[8..12].copy_from_slice(&len.to_le_bytes());
    f[HEADER..HEADER + 8].copy_from_slice(&gpa.to_le_bytes());
    f[HEADER + 8..HEADER + 12].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32(&[&f[..12], &f[HEADER..]]);
    f[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok((out.len() - start, zero))
}

/// True if `buf` starts with a whole frame (as its header says: not yet checked).
pub fn frame_buffered(buf: &[u8]) -> bool {
    buf.first_chunk::<HEADER>()
        .is_some_and(|h| buf.len() - HEADER >= le_u32(h, 8) as usize)
}

/// The address and flags of the page frame `buf` starts with, if it does and the frame
/// is whole in `buf`; nothing is checked yet ([`read_frame`] checks), so this is a hint.
pub fn peek_page(buf: &[u8]) -> Option<(u64, u32)> {
    let h = buf.first_chunk::<HEADER>()?;
    if !frame_buffered(buf)
        || le_u32(h, 0) != MAGIC
        || le_u16(h, 4) != VERSION
        || le_u16(h, 6) != ty::PAGE
    {
        return None;
    }
    let p = buf.get(HEADER..HEADER + 12)?;
    Some((le_u64(p, 0), le_u32(p, 8)))
}

/// One frame as [`read_frame`] reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A page; its bytes (none with [`PAGE_ZERO`]) were appended to the caller's buffer.
    Page {
        /// RAM offset, checked against the limits.
        gpa: u64,
        /// [`PAGE_URGENT`], [`PAGE_ZERO`], both or none.
        flags: u32,
    },
    /// Any other message.
    Other(Message),
}

/// Reads one whole frame from `r`, as [`super::read_message`] does, but a page's bytes
/// go to the end of `into` (a migration destination gathers pages that follow each
/// other into one buffer, which goes into guest RAM with one copy). On an error `into`
/// is as it was.
pub fn read_frame(
    r: &mut impl Read,
    limits: &Limits,
    into: &mut Vec<u8>,
) -> Result<Frame, WireError> {
    let (h, hdr) = read_header(r, limits)?;
    if is_page_frame(&hdr, limits) {
        return read_page_into(r, &h, &hdr, limits, into);
    }
    match read_rest(r, &h, &hdr, limits)? {
        Message::Page { gpa, flags, data } => {
            into.extend_from_slice(&data);
            Ok(Frame::Page { gpa, flags })
        }
        m => Ok(Frame::Other(m)),
    }
}

/// The payload of a page frame with its bytes (one page of the session's size), read
/// straight into the page's own buffer (the common frame: no copy of the page beyond
/// the read).
pub(super) fn read_page_payload(
    r: &mut impl Read,
    h: &[u8; HEADER],
    hdr: &Header,
    limits: &Limits,
) -> Result<Message, WireError> {
    // Read into the buffer's spare capacity: zeroing a fresh page first (calloc) cost
    // the reader a tenth of its time, for bytes the read overwrites.
    let mut data = Vec::with_capacity(limits.page_size as usize);
    match read_page_into(r, h, hdr, limits, &mut data)? {
        Frame::Page { gpa, flags } => Ok(Message::Page {
            gpa,
            flags,
            data: data.into_boxed_slice(),
        }),
        Frame::Other(m) => Ok(m),
    }
}

/// A page frame's payload, its bytes appended to `into` (taken back on any error).
fn read_page_into(
    r: &mut impl Read,
    h: &[u8; HEADER],
    hdr: &Header,
    limits: &Limits,
    into: &mut Vec<u8>,
) -> Result<Frame, WireError> {
    let start = into.len();
    let result = (|| {
        let mut head = [0u8; 12];
        let got = read_full(r, &mut head)?;
        if got == 12 {
            into.reserve(limits.page_size as usize);
            r.take(limits.page_size)
                .read_to_end(into)
                .map_err(WireError::Io)?;
        }
        let data = &into[start..];
        let got = got + data.len();
        if got < hdr.len {
            return Err(WireError::Truncated {
                have: HEADER + got,
                need: HEADER + hdr.len,
            });
        }
        let crc = crc32(&[&h[..12], &head, data]);
        if crc != hdr.crc {
            return Err(WireError::BadChecksum {
                want: hdr.crc,
                got: crc,
            });
        }
        let flags = le_u32(&head, 8);
        if flags & !PAGE_URGENT != 0 {
            // Unknown flags, or zeros that came with bytes: the general path says which.
            let mut p = head.to_vec();
            p.extend_from_slice(data);
            return Ok(Frame::Other(parse_payload(ty::PAGE, &p, limits)?));
        }
        let gpa = check_page(le_u64(&head, 0), limits)?;
        Ok(Frame::Page { gpa, flags })
    })();
    if !matches!(result, Ok(Frame::Page { .. })) {
        into.truncate(start);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::super::{decode, encode};
    use super::*;
    use crate::abi::PAGE_SIZE;
    use crate::memory::HUGE_PAGE_SIZE;

    const LIMITS: Limits = Limits {
        mem_size: 16 << 20,
        page_size: PAGE_SIZE,
    };

    #[test]
    fn a_page_built_in_place_is_the_frame_encode_makes_and_reads_back() {
        let huge = Limits {
            mem_size: 16 << 20,
            page_size: HUGE_PAGE_SIZE,
        };
        for (fill, flags, limits) in [
            (0xabu8, 0, LIMITS),
            (0, PAGE_URGENT, LIMITS),
            (7, PAGE_URGENT, LIMITS),
            (0x5a, 0, huge),
            (0, 0, huge),
        ] {
            let page = limits.page_size as usize;
            let gpa = 3 * limits.page_size;
            let mut out = vec![1, 2, 3];
            let (n, zero) = append_page(&mut out, gpa, flags, page, |b: &mut [u8]| {
                b.fill(fill);
                Ok::<(), ()>(())
            })
            .unwrap();
            assert_eq!(zero, fill == 0);
            assert_eq!(n, out.len() - 3);
            let m = Message::Page {
                gpa,
                flags: flags | if zero { PAGE_ZERO } else { 0 },
                data: if zero {
                    Box::default()
                } else {
                    vec![fill; page].into_boxed_slice()
                },
            };
            let mut want = Vec::new();
            encode(&m, &mut want).unwrap();
            assert_eq!(&out[3..], &want[..]);
            assert!(frame_buffered(&out[3..]));
            assert!(!frame_buffered(&out[3..out.len() - 1]));
            assert_eq!(decode(&out[3..], &limits).unwrap().0, m);
            let mut r = &out[3..];
            assert_eq!(super::super::read_message(&mut r, &limits).unwrap(), m);
        }
    }

    #[test]
    fn a_failed_fill_appends_nothing_and_a_damaged_page_is_refused() {
        let mut out = vec![9];
        assert!(append_page(&mut out, 0, 0, PAGE_SIZE as usize, |_| Err("no")).is_err());
        assert_eq!(out, [9]);
        let mut f = Vec::new();
        append_page(&mut f, 0x1000, 0, PAGE_SIZE as usize, |b: &mut [u8]| {
            b.fill(5);
            Ok::<(), ()>(())
        })
        .unwrap();
        let last = f.len() - 1;
        f[last] ^= 1;
        let mut r = &f[..];
        assert!(matches!(
            super::super::read_message(&mut r, &LIMITS),
            Err(WireError::BadChecksum { .. })
        ));
        let mut r = &f[..f.len() - 10];
        assert!(matches!(
            super::super::read_message(&mut r, &LIMITS),
            Err(WireError::Truncated { .. })
        ));
    }

    /// A page frame of `fill` at `gpa` (4 KiB session).
    fn frame(gpa: u64, fill: u8) -> Vec<u8> {
        let mut f = Vec::new();
        append_page(&mut f, gpa, 0, PAGE_SIZE as usize, |b: &mut [u8]| {
            b.fill(fill);
            Ok::<(), ()>(())
        })
        .unwrap();
        f
    }

    #[test]
    fn read_frame_appends_page_bytes_and_takes_them_back_on_any_error() {
        // Two pages and a zero page into one buffer: bytes appended in order, none for
        // the zero page; other messages come back whole.
        let mut stream = frame(0x1000, 1);
        stream.extend(frame(0x2000, 2));
        stream.extend(frame(0x3000, 0));
        encode(&Message::Started, &mut stream).unwrap();
        let mut r = &stream[..];
        let mut into = vec![9u8];
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(read_frame(&mut r, &LIMITS, &mut into).unwrap());
        }
        assert_eq!(
            got,
            [
                Frame::Page {
                    gpa: 0x1000,
                    flags: 0
                },
                Frame::Page {
                    gpa: 0x2000,
                    flags: 0
                },
                Frame::Page {
                    gpa: 0x3000,
                    flags: PAGE_ZERO
                },
                Frame::Other(Message::Started),
            ]
        );
        assert_eq!(into.len(), 1 + 2 * PAGE_SIZE as usize);
        assert!(into[1..4097].iter().all(|&b| b == 1) && into[4097..].iter().all(|&b| b == 2));
        // A damaged page, a cut one, a page past RAM: `into` is as it was.
        let mut bad = frame(0x1000, 3);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let cut = frame(0x1000, 3)[..HEADER + 12 + 100].to_vec();
        let past = frame(LIMITS.mem_size, 3);
        for f in [bad, cut, past] {
            let before = into.clone();
            assert!(read_frame(&mut &f[..], &LIMITS, &mut into).is_err());
            assert_eq!(into, before);
        }
    }
}
