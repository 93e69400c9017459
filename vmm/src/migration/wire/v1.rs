//! Wire version 1, as far as this version still speaks it, so that a destination can
//! tell a version-1 source something it can read. Version 1's header is this version's
//! with version 1 in it, and its CRC covers the same bytes (header bytes 0..12 and the
//! payload); its hello has this version's layout, type and size; its error frame (type
//! 7, as here) carries the text alone, UTF-8, at most [`MAX_ERROR_TEXT`] bytes, and no
//! code: a version-1 source decides on the text.

use super::{crc32, parse_header, parse_payload, put_u32, ty, Limits, Message, HEADER, MAGIC};

/// Version 1's number.
pub const VERSION_1: u16 = 1;

/// The hello of a whole, intact version-1 frame at the start of `frame`; `None` for
/// anything else (another version or type, a bad CRC, a hello that does not check out).
pub fn decode_hello(frame: &[u8]) -> Option<Message> {
    let h = frame.first_chunk::<HEADER>()?;
    let hdr = parse_header(h, &Limits::UNKNOWN).ok()?;
    if hdr.version != VERSION_1 || hdr.ty != ty::HELLO {
        return None;
    }
    let payload = frame.get(HEADER..HEADER + hdr.len)?;
    if crc32(&[&h[..12], payload]) != hdr.crc {
        return None;
    }
    match parse_payload(ty::HELLO, payload, &Limits::UNKNOWN) {
        Ok(m @ Message::Hello { .. }) => Some(m),
        _ => None,
    }
}

/// Appends a version-1 error frame saying `text` (cut to fit at a character boundary).
pub fn encode_error(text: &str, out: &mut Vec<u8>) {
    let p = super::error_text(text);
    let mut h = Vec::with_capacity(HEADER);
    put_u32(&mut h, MAGIC);
    h.extend_from_slice(&VERSION_1.to_le_bytes());
    h.extend_from_slice(&ty::ERROR.to_le_bytes());
    put_u32(&mut h, p.len() as u32);
    let crc = crc32(&[&h, p]);
    put_u32(&mut h, crc);
    out.extend_from_slice(&h);
    out.extend_from_slice(p);
}
