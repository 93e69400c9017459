//! The migration wire format: framed messages between a source and a destination.
//!
//! Every frame is a 16-byte header and a payload, little endian:
//!
//! | offset | size | field                                               |
//! |--------|------|-----------------------------------------------------|
//! | 0      | 4    | magic `UFMG`                                        |
//! | 4      | 2    | version ([`VERSION`])                               |
//! | 6      | 2    | message type ([`Message`])                          |
//! | 8      | 4    | payload length ([`Limits::max_payload`])            |
//! | 12     | 4    | CRC-32 (IEEE) of header bytes 0..12 and the payload |
//!
//! The CRC covers the type and length too, so a corrupted byte anywhere in a frame is
//! caught, and a page is never installed from a frame that fails it: the CRC is each
//! page's checksum. Decoding checks everything a peer could get wrong (magic, version,
//! type, lengths, addresses against guest RAM) and returns a [`WireError`]; it never
//! panics and never allocates more than the payload limit.
//!
//! The header is the same in every version. A frame of another version is refused only
//! once it is whole and its CRC holds ([`WireError::BadVersion`]), so a damaged version
//! byte reads as damage, never as a peer of another version. A peer refuses a first
//! frame of another version and sends nothing but that refusal, in its own version;
//! the one exception is a version-1 hello, answered in version 1 ([`v1`]) so that an
//! older source can read whether its guest started.
//!
//! A stream's page size is the source's RAM page size, said in its hello: 4096, or
//! 2 MiB for a `--hugepages` guest ([`valid_page_size`]). The wire's unit is that page:
//! a page frame carries one whole page (one CRC per page), page addresses are RAM
//! offsets (page index × page size, so multiples of it), and requests and bitmaps
//! count pages of that size. Every frame's payload is at most [`MAX_PAYLOAD`], except a
//! page frame's, which is at most 12 bytes more than the session's page size
//! ([`Limits::page_size`]); a page frame of any other size for the session is refused;
//! and a bitmap's, which is exactly one bit per page of the session's RAM (above 32 GiB
//! in 4 KiB pages, more than [`MAX_PAYLOAD`]).
//!
//! An [`Message::Error`] carries an [`ErrorCode`], which is what the receiver acts on,
//! and a text for people; nothing is decided on the text.
//!
//! A page's address on the wire (`gpa` in [`Message::Page`] and
//! [`Message::PageRequest`]) is its *RAM offset*: its page index × the page size, which
//! is its guest-physical address only below 3 GiB (`memory::layout`). Bitmaps are by
//! page index too. So the wire counts pages linearly, whatever the GPA layout.

use std::io::Read;

use crate::abi::PAGE_SIZE;
use crate::memory::HUGE_PAGE_SIZE;

/// Frame magic: "UFMG".
pub const MAGIC: u32 = u32::from_le_bytes(*b"UFMG");
/// Protocol version (2: error frames carry an [`ErrorCode`]).
pub const VERSION: u16 = 2;
/// Bytes in a frame header.
pub const HEADER: usize = 16;
/// Largest payload accepted (a vCPU's state with XSAVE fits many times over).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Most page addresses in one request.
pub const MAX_REQUEST: usize = 512;
/// Longest error text.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Most vCPUs a stream may describe.
pub const MAX_VCPUS: u32 = crate::abi::MAX_VCPUS as u32;

/// Message type numbers.
mod ty {
    pub const HELLO: u16 = 1;
    pub const VCPU_STATE: u16 = 2;
    pub const DEVICE_STATE: u16 = 3;
    pub const PAGE: u16 = 4;
    pub const PAGE_REQUEST: u16 = 5;
    pub const PAGES_DONE: u16 = 6;
    pub const ERROR: u16 = 7;
    pub const DISCARD: u16 = 8;
    pub const MISSING: u16 = 9;
    pub const STARTED: u16 = 10;
    pub const READY: u16 = 11;
}

/// `Page::flags`: sent because the destination asked for it.
pub const PAGE_URGENT: u32 = 1;
/// `Page::flags`: the page is all zeros and carries no data.
pub const PAGE_ZERO: u32 = 2;

/// `Hello::channel`: the main stream (states, background pages, control).
pub const CHANNEL_MAIN: u16 = 0;
/// `Hello::channel`: the urgent stream (page requests and their answers), which
/// overtakes the background stream as QEMU's postcopy-preempt channel does.
pub const CHANNEL_URGENT: u16 = 1;

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First message of a stream: what is being migrated.
    Hello {
        /// Bytes of guest RAM.
        mem_size: u64,
        /// Number of vCPUs.
        vcpus: u32,
        /// Bytes in one page of guest RAM, the wire's page unit ([`valid_page_size`]).
        page_size: u64,
        /// Identifies one migration across reconnections.
        session: u64,
        /// [`CHANNEL_MAIN`] or [`CHANNEL_URGENT`].
        channel: u16,
        /// A reconnection of a migration in postcopy (recovery).
        resume: bool,
    },
    /// One vCPU's saved state (format owned by the vCPU code).
    VcpuState {
        /// vCPU index.
        id: u32,
        /// The state.
        data: Vec<u8>,
    },
    /// Device state (format owned by the devices).
    DeviceState {
        /// The state.
        data: Vec<u8>,
    },
    /// One guest page.
    Page {
        /// RAM offset (page index × the page size, see the module docs).
        gpa: u64,
        /// [`PAGE_URGENT`], [`PAGE_ZERO`], both or none.
        flags: u32,
        /// The page (the session's page size in bytes; empty with [`PAGE_ZERO`]).
        data: Box<[u8]>,
    },
    /// The destination asks for these pages, urgently.
    PageRequest {
        /// RAM offsets of the pages (page index × the page size).
        gpas: Vec<u64>,
    },
    /// The source has sent every page.
    PagesDone {
        /// Pages sent in all.
        pages: u64,
    },
    /// The peer gives up (or refuses a connection), and says why.
    Error {
        /// What it means, to act on.
        code: ErrorCode,
        /// What went wrong, for people.
        text: String,
    },
    /// Source to destination at switch-over: pages sent in precopy and written since;
    /// the destination drops its copies and treats them as missing.
    Discard {
        /// One bit per page of guest RAM.
        bits: Vec<u64>,
    },
    /// Destination to source on recovery: the pages it still lacks.
    Missing {
        /// One bit per page of guest RAM.
        bits: Vec<u64>,
    },
    /// Destination to source: the guest runs here now (the source must never run it
    /// again). Until this arrives the source may not know whether it does.
    Started,
    /// Destination to source, once on the first main connection: its VM is built and
    /// takes vCPU states now. A switch-over sent before it would wait in the socket
    /// while the destination builds its VM, and that wait would be downtime.
    Ready,
}

impl Message {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::VcpuState { .. } => "vcpu state",
            Message::DeviceState { .. } => "device state",
            Message::Page { .. } => "page",
            Message::PageRequest { .. } => "page request",
            Message::PagesDone { .. } => "pages done",
            Message::Error { .. } => "error",
            Message::Discard { .. } => "discard",
            Message::Missing { .. } => "missing",
            Message::Started => "started",
            Message::Ready => "ready",
        }
    }
}

/// Words in a bitmap of the pages of `mem_size` bytes of RAM in pages of `page_size`.
pub fn bitmap_words(mem_size: u64, page_size: u64) -> usize {
    mem_size
        .checked_div(page_size)
        .map_or(0, |n| n.div_ceil(64) as usize)
}

/// True if `page_size` is a RAM page size the wire carries: 4096, or 2 MiB.
pub fn valid_page_size(page_size: u64) -> bool {
    page_size == PAGE_SIZE || page_size == HUGE_PAGE_SIZE
}

/// Errors decoding frames. Every one ends the connection; none installs anything.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading the connection failed.
    #[error("migration connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection between frames.
    #[error("migration connection closed")]
    Closed,
    /// The connection ended inside a frame.
    #[error("truncated frame: connection ended after {have} of {need} bytes")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
    /// The buffer holds only part of a frame (buffer decoding only).
    #[error("incomplete frame: {need} bytes needed")]
    Incomplete {
        /// Bytes the frame needs in all.
        need: usize,
    },
    /// Not a ufvmm migration stream.
    #[error("bad magic {0:#010x}: not a ufvmm migration stream")]
    BadMagic(u32),
    /// An intact frame of another protocol version.
    #[error("the peer speaks migration wire version {peer}, this ufvmm speaks version {VERSION}")]
    BadVersion {
        /// The peer's version.
        peer: u16,
    },
    /// A message type this version does not know.
    #[error("unknown message type {0}")]
    UnknownType(u16),
    /// A length beyond what is accepted.
    #[error("payload of {len} bytes is longer than the {max} accepted")]
    TooLong {
        /// Length claimed.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The frame was damaged on the way.
    #[error("checksum mismatch: frame says {want:#010x}, bytes give {got:#010x}")]
    BadChecksum {
        /// CRC in the header.
        want: u32,
        /// CRC computed.
        got: u32,
    },
    /// A payload that does not fit its type.
    #[error("bad {what} message: {why}")]
    BadPayload {
        /// Message type name.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A page address outside guest RAM or not page aligned.
    #[error("page address {gpa:#x} is not a page of guest RAM ({mem_size:#x} bytes)")]
    BadAddress {
        /// The address.
        gpa: u64,
        /// RAM size.
        mem_size: u64,
    },
}

/// What the decoder checks addresses and counts against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of guest RAM; 0 before a `Hello` said (then any valid size is accepted in
    /// a `Hello`, and no page).
    pub mem_size: u64,
    /// Bytes in one page of the session ([`valid_page_size`]); 0 before a `Hello` said
    /// (then either size is accepted in a `Hello`, and no page).
    pub page_size: u64,
}

impl Limits {
    /// Limits before the first `Hello`.
    pub const UNKNOWN: Limits = Limits {
        mem_size: 0,
        page_size: 0,
    };

    /// Words in a bitmap of the session's pages.
    pub fn bitmap_words(&self) -> usize {
        bitmap_words(self.mem_size, self.page_size)
    }

    /// Most payload bytes a frame of type `ty` may have: a page frame carries one page
    /// of the session and a bitmap one bit per page of it (above 32 GiB of 4 KiB pages
    /// that is more than [`MAX_PAYLOAD`]: 32 MiB at 1 TiB, an 8th of the page-state
    /// map each side holds anyway), everything else at most [`MAX_PAYLOAD`].
    pub fn max_payload(&self, ty: u16) -> usize {
        match ty {
            ty::PAGE => MAX_PAYLOAD.max(12 + self.page_size as usize),
            ty::DISCARD | ty::MISSING => MAX_PAYLOAD.max(self.bitmap_words() * 8),
            _ => MAX_PAYLOAD,
        }
    }
}

/// CRC-32 (IEEE 802.3) over several slices, with the CPU's carry-less multiply where
/// there is one (a byte-at-a-time table managed 370 MB/s here, which cost a 256 MiB
/// migration about 0.7 s of CPU on each side).
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn put_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// Appends `msg` as one frame to `out`. Refuses what a peer would refuse (over-long
/// payloads, odd pages, empty or long requests, bad vCPU counts); an over-long error
/// text is cut to fit instead, at a character boundary.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let bad = |what: &'static str, why: String| Err(WireError::BadPayload { what, why });
    match msg {
        Message::Hello {
            vcpus, page_size, ..
        } if *vcpus == 0 || *vcpus > MAX_VCPUS || !valid_page_size(*page_size) => {
            return bad(
                "hello",
                format!("{vcpus} vcpus, pages of {page_size} bytes"),
            );
        }
        Message::VcpuState { id, .. } if *id >= MAX_VCPUS => {
            return bad("vcpu state", format!("vcpu {id}"));
        }
        Message::Page { gpa, flags, data }
            if (flags & PAGE_ZERO != 0 && !data.is_empty())
                || (flags & PAGE_ZERO == 0 && !valid_page_size(data.len() as u64))
                || !gpa.is_multiple_of((data.len() as u64).max(PAGE_SIZE))
                || flags & !(PAGE_URGENT | PAGE_ZERO) != 0 =>
        {
            return bad(
                "page",
                format!("{} bytes at {gpa:#x}, flags {flags:#x}", data.len()),
            );
        }
        Message::PageRequest { gpas } if gpas.is_empty() || gpas.len() > MAX_REQUEST => {
            return bad("page request", format!("{} addresses", gpas.len()));
        }
        _ => {}
    }
    let mut p = Vec::new();
    let t = match msg {
        Message::Hello {
            mem_size,
            vcpus,
            page_size,
            session,
            channel,
            resume,
        } => {
            put_u64(&mut p, *mem_size);
            put_u32(&mut p, *vcpus);
            put_u32(&mut p, *page_size as u32);
            put_u64(&mut p, *session);
            p.extend_from_slice(&channel.to_le_bytes());
            p.extend_from_slice(&u16::from(*resume).to_le_bytes());
            ty::HELLO
        }
        Message::VcpuState { id, data } => {
            put_u32(&mut p, *id);
            p.extend_from_slice(data);
            ty::VCPU_STATE
        }
        Message::DeviceState { data } => {
            p.extend_from_slice(data);
            ty::DEVICE_STATE
        }
        Message::Page { gpa, flags, data } => {
            put_u64(&mut p, *gpa);
            put_u32(&mut p, *flags);
            p.extend_from_slice(data);
            ty::PAGE
        }
        Message::PageRequest { gpas } => {
            for g in gpas {
                put_u64(&mut p, *g);
            }
            ty::PAGE_REQUEST
        }
        Message::PagesDone { pages } => {
            put_u64(&mut p, *pages);
            ty::PAGES_DONE
        }
        Message::Error { code, text } => {
            p.extend_from_slice(&(*code as u16).to_le_bytes());
            p.extend_from_slice(error_text(text));
            ty::ERROR
        }
        Message::Discard { bits } | Message::Missing { bits } => {
            for w in bits {
                put_u64(&mut p, *w);
            }
            if matches!(msg, Message::Discard { .. }) {
                ty::DISCARD
            } else {
                ty::MISSING
            }
        }
        Message::Started => ty::STARTED,
        Message::Ready => ty::READY,
    };
    // A page frame's size was checked above (a page of either size); a bitmap may be
    // as long as the largest RAM's (the decoder checks it against the session's).
    let max = match t {
        ty::PAGE => MAX_PAYLOAD.max(12 + HUGE_PAGE_SIZE as usize),
        ty::DISCARD | ty::MISSING => {
            MAX_PAYLOAD.max(bitmap_words(crate::config::MAX_MEM, PAGE_SIZE) * 8)
        }
        _ => MAX_PAYLOAD,
    };
    if p.len() > max {
        return Err(WireError::TooLong { len: p.len(), max });
    }
    let mut h = Vec::with_capacity(HEADER);
    put_u32(&mut h, MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&t.to_le_bytes());
    put_u32(&mut h, p.len() as u32);
    let crc = crc32(&[&h, &p]);
    put_u32(&mut h, crc);
    out.extend_from_slice(&h);
    out.extend_from_slice(&p);
    Ok(())
}

/// An error text's bytes, cut to [`MAX_ERROR_TEXT`] at a character boundary.
fn error_text(text: &str) -> &[u8] {
    let mut end = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

/// Bytes of a whole `Hello` frame: a first frame of any other size is refused as soon
/// as its header is in.
pub const HELLO_FRAME: usize = HEADER + 28;

/// Payload bytes of a page with these flags in a session of `page_size` pages.
fn page_bytes(flags: u32, page_size: u64) -> usize {
    if flags & PAGE_ZERO != 0 {
        0
    } else {
        page_size as usize
    }
}

/// True if `mem_size` is a RAM size a VM may have (see `config::parse_mem`).
fn valid_mem_size(mem_size: u64) -> bool {
    (crate::config::MIN_MEM..=crate::config::MAX_MEM).contains(&mem_size)
        && mem_size.is_multiple_of(crate::config::MEM_ALIGN)
}

/// A checked header: version, type and payload length.
struct Header {
    version: u16,
    ty: u16,
    len: usize,
    crc: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Checks the fixed fields of a 16-byte header (the payload's length against `limits`).
fn parse_header(h: &[u8; HEADER], limits: &Limits) -> Result<Header, WireError> {
    let magic = le_u32(h, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    // Another version is refused after the CRC (see `checked`); its types are its own.
    let version = le_u16(h, 4);
    let ty = le_u16(h, 6);
    if version == VERSION && !(ty::HELLO..=ty::READY).contains(&ty) {
        return Err(WireError::UnknownType(ty));
    }
    let len = le_u32(h, 8) as usize;
    // Only this version's page frames may be longer: another version's types are its own.
    let max = if version == VERSION {
        limits.max_payload(ty)
    } else {
        MAX_PAYLOAD
    };
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    // A bitmap longer than the usual limit must be exactly the session's, before its
    // buffer is allocated.
    if version == VERSION
        && matches!(ty, ty::DISCARD | ty::MISSING)
        && len > MAX_PAYLOAD
        && len != limits.bitmap_words() * 8
    {
        return Err(WireError::BadPayload {
            what: "bitmap",
            why: format!("{len} bytes, expected {}", limits.bitmap_words() * 8),
        });
    }
    Ok(Header {
        version,
        ty,
        len,
        crc: le_u32(h, 12),
    })
}

fn check_page(gpa: u64, limits: &Limits) -> Result<u64, WireError> {
    if limits.page_size == 0 || !gpa.is_multiple_of(limits.page_size) || gpa >= limits.mem_size {
        return Err(WireError::BadAddress {
            gpa,
            mem_size: limits.mem_size,
        });
    }
    Ok(gpa)
}

/// Turns a checksummed payload into a message.
fn parse_payload(ty: u16, p: &[u8], limits: &Limits) -> Result<Message, WireError> {
    let bad = |what: &'static str, why: String| WireError::BadPayload { what, why };
    let exact = |what: &'static str, want: usize| {
        if p.len() == want {
            Ok(())
        } else {
            Err(bad(what, format!("{} bytes, expected {want}", p.len())))
        }
    };
    match ty {
        ty::HELLO => {
            exact("hello", 28)?;
            let (mem_size, vcpus, page) = (le_u64(p, 0), le_u32(p, 8), le_u32(p, 12));
            let (session, channel, resume) = (le_u64(p, 16), le_u16(p, 24), le_u16(p, 26));
            let page = u64::from(page);
            if !valid_page_size(page) {
                return Err(bad(
                    "hello",
                    format!("page size {page}, expected {PAGE_SIZE} or {HUGE_PAGE_SIZE}"),
                ));
            }
            if limits.page_size != 0 && page != limits.page_size {
                return Err(bad(
                    "hello",
                    format!("pages of {page} bytes there, {} here", limits.page_size),
                ));
            }
            if vcpus == 0 || vcpus > MAX_VCPUS {
                return Err(bad("hello", format!("{vcpus} vcpus")));
            }
            if !valid_mem_size(mem_size)
                || !mem_size.is_multiple_of(page)
                || (limits.mem_size != 0 && mem_size != limits.mem_size)
            {
                return Err(bad(
                    "hello",
                    format!(
                        "guest RAM is {mem_size} bytes there, {} here",
                        limits.mem_size
                    ),
                ));
            }
            if channel > CHANNEL_URGENT || resume > 1 {
                return Err(bad(
                    "hello",
                    format!("channel {channel}, resume flag {resume}"),
                ));
            }
            Ok(Message::Hello {
                mem_size,
                vcpus,
                page_size: page,
                session,
                channel,
                resume: resume == 1,
            })
        }
        ty::VCPU_STATE => {
            if p.len() < 4 {
                return Err(bad("vcpu state", "shorter than its header".into()));
            }
            let id = le_u32(p, 0);
            if id >= MAX_VCPUS {
                return Err(bad("vcpu state", format!("vcpu {id}")));
            }
            Ok(Message::VcpuState {
                id,
                data: p[4..].to_vec(),
            })
        }
        ty::DEVICE_STATE => Ok(Message::DeviceState { data: p.to_vec() }),
        ty::PAGE => {
            if p.len() < 12 {
                return Err(bad("page", format!("{} bytes", p.len())));
            }
            let flags = le_u32(p, 8);
            if flags & !(PAGE_URGENT | PAGE_ZERO) != 0 {
                return Err(bad("page", format!("unknown flags {flags:#x}")));
            }
            if limits.page_size == 0 {
                return Err(bad("page", "before hello".into()));
            }
            exact("page", 12 + page_bytes(flags, limits.page_size))?;
            let gpa = check_page(le_u64(p, 0), limits)?;
            Ok(Message::Page {
                gpa,
                flags,
                data: p[12..].to_vec().into_boxed_slice(),
            })
        }
        ty::PAGE_REQUEST => {
            if p.is_empty() || !p.len().is_multiple_of(8) || p.len() / 8 > MAX_REQUEST {
                return Err(bad(
                    "page request",
                    format!("{} bytes: expected 1..={MAX_REQUEST} addresses", p.len()),
                ));
            }
            let gpas = p
                .chunks_exact(8)
                .map(|c| check_page(le_u64(c, 0), limits))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Message::PageRequest { gpas })
        }
        ty::PAGES_DONE => {
            exact("pages done", 8)?;
            Ok(Message::PagesDone {
                pages: le_u64(p, 0),
            })
        }
        ty::STARTED => {
            exact("started", 0)?;
            Ok(Message::Started)
        }
        ty::READY => {
            exact("ready", 0)?;
            Ok(Message::Ready)
        }
        ty::DISCARD | ty::MISSING => {
            let what = if ty == ty::DISCARD {
                "discard"
            } else {
                "missing"
            };
            if limits.mem_size == 0 {
                return Err(bad(what, "before hello".into()));
            }
            exact(what, limits.bitmap_words() * 8)?;
            let bits = p.chunks_exact(8).map(|c| le_u64(c, 0)).collect();
            Ok(if ty == ty::DISCARD {
                Message::Discard { bits }
            } else {
                Message::Missing { bits }
            })
        }
        _ => {
            let Some((code, text)) = p.split_first_chunk::<2>() else {
                return Err(bad("error", format!("{} bytes, no code", p.len())));
            };
            if text.len() > MAX_ERROR_TEXT {
                return Err(bad("error", format!("{} bytes of text", text.len())));
            }
            let text = std::str::from_utf8(text)
                .map_err(|_| bad("error", "text is not UTF-8".into()))?
                .to_string();
            Ok(Message::Error {
                code: ErrorCode::from_wire(u16::from_le_bytes(*code)),
                text,
            })
        }
    }
}

/// Decodes the frame at the start of `buf`: the message and the bytes it took.
/// `Incomplete` if `buf` holds only part of it (read more and call again).
pub fn decode(buf: &[u8], limits: &Limits) -> Result<(Message, usize), WireError> {
    let Some(h) = buf.first_chunk::<HEADER>() else {
        return Err(WireError::Incomplete { need: HEADER });
    };
    let hdr = parse_header(h, limits)?;
    let end = HEADER + hdr.len;
    let Some(payload) = buf.get(HEADER..end) else {
        return Err(WireError::Incomplete { need: end });
    };
    Ok((checked(h, &hdr, payload, limits)?, end))
}

/// A whole frame: its CRC, then its version, then its payload.
fn checked(
    h: &[u8; HEADER],
    hdr: &Header,
    payload: &[u8],
    limits: &Limits,
) -> Result<Message, WireError> {
    let got = crc32(&[&h[..12], payload]);
    if got != hdr.crc {
        return Err(WireError::BadChecksum { want: hdr.crc, got });
    }
    if hdr.version != VERSION {
        return Err(WireError::BadVersion { peer: hdr.version });
    }
    parse_payload(hdr.ty, payload, limits)
}

/// The version a header with the ufvmm magic claims, not yet checked against its CRC
/// (to say which version a first frame too long to read whole says it is).
pub fn header_version(h: &[u8]) -> Option<u16> {
    let h = h.first_chunk::<HEADER>()?;
    (le_u32(h, 0) == MAGIC).then(|| le_u16(h, 4))
}

/// Reads one whole frame from `r`. A clean end of stream before a frame is `Closed`; an
/// end inside one is `Truncated`.
pub fn read_message(r: &mut impl Read, limits: &Limits) -> Result<Message, WireError> {
    let (h, hdr) = read_header(r, limits)?;
    if is_page_frame(&hdr, limits) {
        return read_page_payload(r, &h, &hdr, limits);
    }
    read_rest(r, &h, &hdr, limits)
}

/// True if `hdr` is this version's page frame with a whole page of the session's size.
fn is_page_frame(hdr: &Header, limits: &Limits) -> bool {
    hdr.version == VERSION
        && hdr.ty == ty::PAGE
        && limits.page_size != 0
        && hdr.len == 12 + limits.page_size as usize
}

/// Reads and checks a frame's header.
fn read_header(r: &mut impl Read, limits: &Limits) -> Result<([u8; HEADER], Header), WireError> {
    let mut h = [0u8; HEADER];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Err(WireError::Closed);
    }
    if got < HEADER {
        return Err(WireError::Truncated {
            have: got,
            need: HEADER,
        });
    }
    let hdr = parse_header(&h, limits)?;
    Ok((h, hdr))
}

/// Reads the payload of the frame whose header is `h` and decodes it.
fn read_rest(
    r: &mut impl Read,
    h: &[u8; HEADER],
    hdr: &Header,
    limits: &Limits,
) -> Result<Message, WireError> {
    let mut payload = vec![0u8; hdr.len];
    let got = read_full(r, &mut payload)?;
    if got < hdr.len {
        return Err(WireError::Truncated {
            have: HEADER + got,
            need: HEADER + hdr.len,
        });
    }
    checked(h, hdr, &payload, limits)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, WireError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(n)
}

mod code;
pub mod page;
pub mod v1;

pub use code::ErrorCode;

use page::read_page_payload;
pub use page::{append_page, frame_buffered, peek_page, read_frame, Frame};

#[cfg(test)]
mod tests;
