//! The wire parser: round trips, and bad bytes that must be refused without panicking.

use super::*;
use proptest::prelude::*;

const MEM: u64 = 64 << 20;
const LIMITS: Limits = Limits {
    mem_size: MEM,
    page_size: PAGE_SIZE,
};
/// The same RAM in 2 MiB pages.
const HUGE: Limits = Limits {
    mem_size: MEM,
    page_size: HUGE_PAGE_SIZE,
};

fn hello(mem_size: u64, vcpus: u32) -> Message {
    hello_in(mem_size, vcpus, PAGE_SIZE)
}

fn hello_in(mem_size: u64, vcpus: u32, page_size: u64) -> Message {
    Message::Hello {
        mem_size,
        vcpus,
        page_size,
        session: 0x5e55_1011,
        channel: CHANNEL_URGENT,
        resume: true,
    }
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    encode(msg, &mut v).expect("encodable");
    v
}

/// A frame built by hand, for messages `encode` refuses to make.
fn raw_frame(ty: u16, payload: &[u8]) -> Vec<u8> {
    raw_frame_of(VERSION, ty, payload)
}

/// A frame of any version, with a correct CRC.
fn raw_frame_of(version: u16, ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    put_u32(&mut f, MAGIC);
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(&ty.to_le_bytes());
    put_u32(&mut f, payload.len() as u32);
    let crc = crc32(&[&f, payload]);
    put_u32(&mut f, crc);
    f.extend_from_slice(payload);
    f
}

#[test]
fn encode_refuses_what_a_peer_would_refuse_and_cuts_long_errors() {
    let mut out = Vec::new();
    for m in [
        hello(MEM, 0),
        Message::VcpuState {
            id: MAX_VCPUS,
            data: vec![],
        },
        Message::Page {
            gpa: 0x1001,
            flags: 0,
            data: vec![0; PAGE_SIZE as usize].into_boxed_slice(),
        },
        Message::Page {
            gpa: 0,
            flags: 0,
            data: vec![0; 10].into_boxed_slice(),
        },
        Message::PageRequest { gpas: vec![] },
        Message::PageRequest {
            gpas: vec![0; MAX_REQUEST + 1],
        },
        Message::DeviceState {
            data: vec![0; MAX_PAYLOAD + 1],
        },
    ] {
        assert!(encode(&m, &mut out).is_err(), "{m:?}");
    }
    assert!(out.is_empty(), "a refused message left bytes behind");
    let long = "é".repeat(MAX_ERROR_TEXT);
    let f = frame(&Message::Error {
        code: ErrorCode::VmEnded,
        text: long,
    });
    let (Message::Error { code, text }, _) = decode(&f, &LIMITS).unwrap() else {
        panic!("not an error message");
    };
    assert_eq!(code, ErrorCode::VmEnded);
    assert!(text.len() <= MAX_ERROR_TEXT && text.chars().all(|c| c == 'é'));
}

fn page(gpa: u64, fill: u8) -> Message {
    Message::Page {
        gpa,
        flags: PAGE_URGENT,
        data: vec![fill; PAGE_SIZE as usize].into_boxed_slice(),
    }
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(&[b"123456789"]), 0xcbf4_3926);
    assert_eq!(crc32(&[b"1234", b"56789"]), 0xcbf4_3926);
}

#[test]
fn every_message_round_trips_through_a_buffer_and_a_reader() {
    let msgs = vec![
        hello(MEM, 2),
        Message::VcpuState {
            id: 1,
            data: vec![1, 2, 3],
        },
        Message::DeviceState { data: vec![] },
        page(0x1000, 0xab),
        Message::PageRequest {
            gpas: vec![0, 0x2000, MEM - PAGE_SIZE],
        },
        Message::PagesDone { pages: 16384 },
        Message::Started,
        Message::Ready,
        Message::Error {
            code: ErrorCode::Other,
            text: "source out of disk".into(),
        },
        Message::Error {
            code: ErrorCode::NeverStarted,
            text: String::new(),
        },
    ];
    let mut stream = Vec::new();
    for m in &msgs {
        let f = frame(m);
        assert_eq!(decode(&f, &LIMITS).unwrap(), (m.clone(), f.len()));
        stream.extend_from_slice(&f);
    }
    let mut r = std::io::Cursor::new(stream);
    for m in &msgs {
        assert_eq!(&read_message(&mut r, &LIMITS).unwrap(), m);
    }
    assert!(matches!(
        read_message(&mut r, &LIMITS),
        Err(WireError::Closed)
    ));
}

#[test]
fn bad_frames_are_refused_with_the_right_error() {
    let good = frame(&page(0x3000, 7));
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(
        decode(&magic, &LIMITS),
        Err(WireError::BadMagic(_))
    ));
    // A damaged version byte is damage; an intact frame of another version (whatever
    // its type) is that version, and the error names both.
    let mut version = good.clone();
    version[4] = 9;
    assert!(matches!(
        decode(&version, &LIMITS),
        Err(WireError::BadChecksum { .. })
    ));
    for (v, t) in [(1, ty::HELLO), (9, 99), (u16::MAX, 0)] {
        let other = raw_frame_of(v, t, &[1, 2, 3]);
        let r = decode(&other, &LIMITS);
        assert!(
            matches!(r, Err(WireError::BadVersion { peer }) if peer == v),
            "{r:?}"
        );
        let r = read_message(&mut std::io::Cursor::new(&other), &LIMITS);
        let Err(e @ WireError::BadVersion { .. }) = r else {
            panic!("{r:?}");
        };
        let text = e.to_string();
        assert!(
            text.contains(&format!("version {v},")) && text.contains(&format!("version {VERSION}")),
            "{text}"
        );
        assert_eq!(header_version(&other), Some(v));
    }
    assert_eq!(header_version(&good), Some(VERSION));
    assert_eq!(header_version(&magic), None);
    assert_eq!(header_version(&good[..HEADER - 1]), None);
    let mut long_other = raw_frame_of(1, ty::HELLO, &[]);
    long_other[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&long_other, &LIMITS),
        Err(WireError::TooLong { .. })
    ));
    let mut unknown = good.clone();
    unknown[6] = 99;
    assert!(matches!(
        decode(&unknown, &LIMITS),
        Err(WireError::UnknownType(99))
    ));
    let mut huge = good.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&huge, &LIMITS),
        Err(WireError::TooLong { .. })
    ));
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(matches!(
        decode(&flipped, &LIMITS),
        Err(WireError::BadChecksum { .. })
    ));
    // Addresses outside RAM or not aligned, even with a correct checksum.
    for gpa in [MEM, MEM + PAGE_SIZE, 0x1001, !(PAGE_SIZE - 1)] {
        let mut payload = gpa.to_le_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&[1u8; PAGE_SIZE as usize]);
        assert!(
            matches!(
                decode(&raw_frame(ty::PAGE, &payload), &LIMITS),
                Err(WireError::BadAddress { .. })
            ),
            "{gpa:#x}"
        );
    }
    // Messages encode() refuses to build, made by hand: decode must refuse them too.
    let refused = |f: Vec<u8>, what: &str| {
        let r = decode(&f, &LIMITS);
        assert!(
            matches!(
                r,
                Err(WireError::BadPayload { .. } | WireError::BadAddress { .. })
            ),
            "{what}: {r:?}"
        );
    };
    let mut unaligned = 0x1000u64.to_le_bytes().to_vec();
    unaligned.extend_from_slice(&0x1234u64.to_le_bytes());
    refused(raw_frame(ty::PAGE_REQUEST, &unaligned), "unaligned request");
    refused(
        raw_frame(ty::PAGE_REQUEST, &vec![0u8; 8 * (MAX_REQUEST + 1)]),
        "long request",
    );
    refused(raw_frame(ty::PAGE_REQUEST, &[]), "empty request");
    refused(frame(&hello(MEM * 2, 1)), "other RAM size");
    let mut hello0 = MEM.to_le_bytes().to_vec();
    hello0.extend_from_slice(&0u32.to_le_bytes());
    hello0.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    hello0.extend_from_slice(&[0; 12]);
    refused(raw_frame(ty::HELLO, &hello0), "no vcpus");
    refused(
        raw_frame(ty::VCPU_STATE, &MAX_VCPUS.to_le_bytes()),
        "vcpu id",
    );
    let mut long_text = vec![0u8, 0];
    long_text.extend_from_slice(&[b'x'; MAX_ERROR_TEXT + 1]);
    refused(raw_frame(ty::ERROR, &long_text), "long error text");
    refused(
        raw_frame(ty::ERROR, &[0, 0, 0xff, 0xfe]),
        "error text not UTF-8",
    );
    refused(raw_frame(ty::ERROR, &[]), "error without a code");
    refused(raw_frame(ty::ERROR, &[1]), "error with half a code");
    refused(
        raw_frame(
            ty::DISCARD,
            &vec![0u8; 8 * (bitmap_words(MEM, PAGE_SIZE) + 1)],
        ),
        "bitmap of another RAM size",
    );
    let mut zero_with_data = 0u64.to_le_bytes().to_vec();
    zero_with_data.extend_from_slice(&PAGE_ZERO.to_le_bytes());
    zero_with_data.extend_from_slice(&[0; 16]);
    refused(raw_frame(ty::PAGE, &zero_with_data), "zero page with data");
    let mut chan = MEM.to_le_bytes().to_vec();
    chan.extend_from_slice(&1u32.to_le_bytes());
    chan.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    chan.extend_from_slice(&[0; 8]);
    chan.extend_from_slice(&7u16.to_le_bytes());
    chan.extend_from_slice(&0u16.to_le_bytes());
    refused(raw_frame(ty::HELLO, &chan), "unknown channel");
    // Before a hello, a page or a bitmap has nothing to be checked against.
    let before = Limits::UNKNOWN;
    assert!(decode(&frame(&page(0, 1)), &before).is_err());
    assert!(decode(&frame(&hello(MEM, 1)), &before).is_ok());
    assert!(decode(&frame(&hello(MEM + 4096, 1)), &before).is_err());
}

#[test]
fn a_stream_cut_inside_a_frame_is_truncated_not_closed() {
    let f = frame(&page(0, 1));
    for cut in [1, HEADER - 1, HEADER, HEADER + 100, f.len() - 1] {
        let mut r = std::io::Cursor::new(f[..cut].to_vec());
        assert!(
            matches!(
                read_message(&mut r, &LIMITS),
                Err(WireError::Truncated { .. })
            ),
            "cut at {cut}"
        );
        assert!(matches!(
            decode(&f[..cut], &LIMITS),
            Err(WireError::Incomplete { .. })
        ));
    }
}

#[test]
fn every_error_code_round_trips_and_unknown_codes_read_as_other() {
    for (i, &code) in ErrorCode::ALL.iter().enumerate() {
        assert_eq!(code as u16, i as u16, "codes are numbered in wire order");
        assert_eq!(ErrorCode::from_wire(code as u16), code);
        let m = Message::Error {
            code,
            text: format!("text for {}", code.name()),
        };
        assert_eq!(decode(&frame(&m), &LIMITS).unwrap().0, m);
    }
    let names: std::collections::HashSet<_> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(names.len(), ErrorCode::ALL.len(), "names are distinct");
    // Only these say the destination never started the guest (one that has no room
    // for its RAM built no VM).
    let definite: Vec<_> = ErrorCode::ALL
        .into_iter()
        .filter(|c| c.guest_not_started())
        .collect();
    assert_eq!(
        definite,
        [
            ErrorCode::NeverStarted,
            ErrorCode::OtherMigration,
            ErrorCode::NoMemory
        ]
    );
    let mut unknown = 999u16.to_le_bytes().to_vec();
    unknown.extend_from_slice(b"from a newer peer");
    assert_eq!(
        decode(&raw_frame(ty::ERROR, &unknown), &LIMITS).unwrap().0,
        Message::Error {
            code: ErrorCode::Other,
            text: "from a newer peer".into()
        }
    );
}

fn any_message() -> impl Strategy<Value = Message> {
    let gpa = (0..MEM / PAGE_SIZE).prop_map(|p| p * PAGE_SIZE);
    prop_oneof![
        (1..=MAX_VCPUS).prop_map(|vcpus| hello(MEM, vcpus)),
        (0..MAX_VCPUS, proptest::collection::vec(any::<u8>(), 0..600))
            .prop_map(|(id, data)| Message::VcpuState { id, data }),
        proptest::collection::vec(any::<u8>(), 0..600)
            .prop_map(|data| Message::DeviceState { data }),
        (gpa.clone(), 0..=3u32, any::<u8>()).prop_map(|(gpa, flags, b)| Message::Page {
            gpa,
            flags,
            data: vec![b; page_bytes(flags, PAGE_SIZE)].into_boxed_slice(),
        }),
        proptest::collection::vec(any::<u64>(), bitmap_words(MEM, PAGE_SIZE))
            .prop_map(|bits| Message::Discard { bits }),
        proptest::collection::vec(any::<u64>(), bitmap_words(MEM, PAGE_SIZE))
            .prop_map(|bits| Message::Missing { bits }),
        proptest::collection::vec(gpa, 1..40).prop_map(|gpas| Message::PageRequest { gpas }),
        any::<u64>().prop_map(|pages| Message::PagesDone { pages }),
        (
            proptest::sample::select(ErrorCode::ALL.to_vec()),
            "[a-z ]{0,80}"
        )
            .prop_map(|(code, text)| Message::Error { code, text }),
        Just(Message::Started),
        Just(Message::Ready),
    ]
}

/// A version-1 source's hello is read (its layout is this version's), and a version-1
/// error frame is what version 1 decodes: its header with version 1 and type 7, the
/// text alone as payload, the CRC over header bytes 0..12 and the payload.
#[test]
fn version_1_hellos_are_read_and_version_1_errors_written() {
    let v2 = frame(&hello(MEM, 2));
    let v1 = raw_frame_of(v1::VERSION_1, ty::HELLO, &v2[HEADER..]);
    assert_eq!(v1::decode_hello(&v1), Some(hello(MEM, 2)));
    assert!(matches!(
        decode(&v1, &Limits::UNKNOWN),
        Err(WireError::BadVersion { peer: 1 })
    ));
    // Not version 1, damaged, cut short, or no hello: nothing.
    assert_eq!(v1::decode_hello(&v2), None);
    let mut damaged = v1.clone();
    damaged[HEADER + 3] ^= 1;
    assert_eq!(v1::decode_hello(&damaged), None);
    assert_eq!(v1::decode_hello(&v1[..v1.len() - 1]), None);
    assert_eq!(
        v1::decode_hello(&raw_frame_of(1, ty::PAGES_DONE, &[0; 8])),
        None
    );
    assert_eq!(
        v1::decode_hello(&raw_frame_of(1, ty::HELLO, &[0; 28])),
        None
    );

    let mut out = Vec::new();
    v1::encode_error("the guest never started here", &mut out);
    assert_eq!(&out[0..4], b"UFMG");
    assert_eq!(u16::from_le_bytes([out[4], out[5]]), 1);
    assert_eq!(u16::from_le_bytes([out[6], out[7]]), 7);
    let len = u32::from_le_bytes([out[8], out[9], out[10], out[11]]) as usize;
    assert_eq!(out.len(), HEADER + len);
    let crc = u32::from_le_bytes([out[12], out[13], out[14], out[15]]);
    assert_eq!(crc32(&[&out[..12], &out[HEADER..]]), crc);
    assert_eq!(&out[HEADER..], b"the guest never started here");
    // This version reads it as a frame of version 1.
    assert!(matches!(
        decode(&out, &LIMITS),
        Err(WireError::BadVersion { peer: 1 })
    ));
    // A long text is cut to fit, at a character boundary.
    let mut out = Vec::new();
    v1::encode_error(&"\u{e9}".repeat(MAX_ERROR_TEXT), &mut out);
    assert_eq!(out.len(), HEADER + MAX_ERROR_TEXT);
    assert!(std::str::from_utf8(&out[HEADER..]).is_ok());
}

proptest! {
    #[test]
    fn round_trip(msg in any_message()) {
        let f = frame(&msg);
        let (back, used) = decode(&f, &LIMITS).unwrap();
        prop_assert_eq!(back, msg);
        prop_assert_eq!(used, f.len());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let _ = decode(&bytes, &LIMITS);
        let _ = read_message(&mut std::io::Cursor::new(bytes), &LIMITS);
    }

    #[test]
    fn any_code_value_decodes_as_itself_or_other(v in any::<u16>(), text in "[a-z]{0,20}") {
        let mut p = v.to_le_bytes().to_vec();
        p.extend_from_slice(text.as_bytes());
        let (m, _) = decode(&raw_frame(ty::ERROR, &p), &LIMITS).unwrap();
        let Message::Error { code, text: back } = m else {
            return Err(TestCaseError::fail("not an error"));
        };
        prop_assert_eq!(back, text);
        prop_assert!(code as u16 == v || (code == ErrorCode::Other && ErrorCode::ALL.iter().all(|&c| c as u16 != v)));
    }

    #[test]
    fn garbage_after_a_valid_header_never_panics(
        version in prop_oneof![Just(VERSION), any::<u16>()],
        ty in 0u16..12, len in 0u32..5000, body in proptest::collection::vec(any::<u8>(), 0..5000)
    ) {
        // A header that passes the magic check (and mostly the version check), then
        // anything.
        let mut f = Vec::new();
        put_u32(&mut f, MAGIC);
        f.extend_from_slice(&version.to_le_bytes());
        f.extend_from_slice(&ty.to_le_bytes());
        put_u32(&mut f, len);
        let crc = crc32(&[&f, &body[..body.len().min(len as usize)]]);
        put_u32(&mut f, crc);
        f.extend_from_slice(&body);
        let _ = decode(&f, &LIMITS);
        let _ = read_message(&mut std::io::Cursor::new(f), &LIMITS);
    }

    #[test]
    fn any_corrupted_byte_is_refused(msg in any_message(), at in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut f = frame(&msg);
        let i = at.index(f.len());
        f[i] ^= x;
        prop_assert!(decode(&f, &LIMITS).is_err(), "accepted a frame with byte {} changed", i);
    }

    #[test]
    fn any_truncation_is_incomplete(msg in any_message(), at in any::<prop::sample::Index>()) {
        let f = frame(&msg);
        let cut = at.index(f.len());
        let incomplete = matches!(decode(&f[..cut], &LIMITS), Err(WireError::Incomplete { .. }));
        prop_assert!(incomplete, "a frame cut at {} was not incomplete", cut);
    }
}

/// A page frame in 2 MiB pages: one whole page and one CRC, read straight into its
/// buffer like a 4 KiB one; requests and bitmaps count 2 MiB pages.
#[test]
fn a_2_mib_session_carries_whole_2_mib_pages_and_counts_them() {
    let big = vec![0x3cu8; HUGE_PAGE_SIZE as usize].into_boxed_slice();
    let msgs = vec![
        hello_in(MEM, 2, HUGE_PAGE_SIZE),
        Message::Page {
            gpa: 5 * HUGE_PAGE_SIZE,
            flags: PAGE_URGENT,
            data: big.clone(),
        },
        Message::Page {
            gpa: MEM - HUGE_PAGE_SIZE,
            flags: PAGE_ZERO,
            data: Box::default(),
        },
        Message::PageRequest {
            gpas: vec![0, HUGE_PAGE_SIZE, MEM - HUGE_PAGE_SIZE],
        },
        Message::Discard {
            bits: vec![!0; bitmap_words(MEM, HUGE_PAGE_SIZE)],
        },
    ];
    assert_eq!(bitmap_words(MEM, HUGE_PAGE_SIZE), 1, "32 pages: one word");
    let mut stream = Vec::new();
    for m in &msgs {
        let f = frame(m);
        assert_eq!(decode(&f, &HUGE).unwrap(), (m.clone(), f.len()));
        stream.extend_from_slice(&f);
    }
    let f = frame(&msgs[1]);
    assert_eq!(f.len(), HEADER + 12 + HUGE_PAGE_SIZE as usize);
    let mut r = std::io::Cursor::new(stream);
    for m in &msgs {
        assert_eq!(&read_message(&mut r, &HUGE).unwrap(), m);
    }
    // Damage anywhere in the 2 MiB is caught by its one CRC.
    let mut bad = f.clone();
    bad[HEADER + 12 + 1_000_000] ^= 4;
    assert!(matches!(
        read_message(&mut std::io::Cursor::new(&bad), &HUGE),
        Err(WireError::BadChecksum { .. })
    ));
    // A hello of either size is taken before the session is known; the same size
    // after, never the other.
    for page in [PAGE_SIZE, HUGE_PAGE_SIZE] {
        let h = frame(&hello_in(MEM, 1, page));
        assert!(decode(&h, &Limits::UNKNOWN).is_ok(), "{page}");
    }
    assert!(decode(&frame(&hello_in(MEM, 1, HUGE_PAGE_SIZE)), &HUGE).is_ok());
    assert!(matches!(
        decode(&frame(&hello_in(MEM, 1, PAGE_SIZE)), &HUGE),
        Err(WireError::BadPayload { .. })
    ));
    assert!(matches!(
        decode(&frame(&hello_in(MEM, 1, HUGE_PAGE_SIZE)), &LIMITS),
        Err(WireError::BadPayload { .. })
    ));
}

/// A hello claiming any other page size, and page frames or addresses of the wrong
/// size for the session, are refused with a `WireError`, never a panic.
#[test]
fn other_page_sizes_and_pages_of_the_wrong_size_are_refused() {
    let hello_with = |page: u32| {
        let mut p = MEM.to_le_bytes().to_vec();
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&page.to_le_bytes());
        p.extend_from_slice(&[0; 12]);
        raw_frame(ty::HELLO, &p)
    };
    assert!(decode(&hello_with(HUGE_PAGE_SIZE as u32), &Limits::UNKNOWN).is_ok());
    for page in [0u32, 1, 512, 8192, 1 << 20, 4 << 20, 1 << 30, u32::MAX] {
        let f = hello_with(page);
        assert!(
            matches!(
                decode(&f, &Limits::UNKNOWN),
                Err(WireError::BadPayload { .. })
            ),
            "page size {page}"
        );
        assert!(read_message(&mut std::io::Cursor::new(&f), &Limits::UNKNOWN).is_err());
    }
    let mut out = Vec::new();
    assert!(encode(&hello_in(MEM, 1, 8192), &mut out).is_err());
    assert!(out.is_empty());
    let page_frame = |gpa: u64, len: usize| {
        let mut p = gpa.to_le_bytes().to_vec();
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&vec![9u8; len]);
        raw_frame(ty::PAGE, &p)
    };
    let huge = HUGE_PAGE_SIZE as usize;
    // 4 KiB pages in a 2 MiB session; 2 MiB pages in a 4 KiB session (too long for any
    // frame there); a 2 MiB page at an address inside a huge page; one byte short or
    // over.
    for (f, limits, what) in [
        (page_frame(0, 4096), HUGE, "4 KiB page, 2 MiB session"),
        (page_frame(0, huge), LIMITS, "2 MiB page, 4 KiB session"),
        (page_frame(0x1000, huge), HUGE, "unaligned 2 MiB page"),
        (page_frame(0, huge - 1), HUGE, "short 2 MiB page"),
        (page_frame(0, huge + 1), HUGE, "long 2 MiB page"),
        (page_frame(MEM, huge), HUGE, "2 MiB page past RAM"),
    ] {
        let r = decode(&f, &limits);
        assert!(
            matches!(
                r,
                Err(WireError::BadPayload { .. }
                    | WireError::BadAddress { .. }
                    | WireError::TooLong { .. })
            ),
            "{what}: {r:?}"
        );
        let r = read_message(&mut std::io::Cursor::new(&f), &limits);
        assert!(r.is_err(), "{what}: {r:?}");
    }
    // Only page frames may pass the 1 MiB limit, and only by one page.
    let mut long = raw_frame(ty::DEVICE_STATE, &[]);
    long[8..12].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
    assert!(matches!(
        decode(&long, &HUGE),
        Err(WireError::TooLong { .. })
    ));
    // Requests for addresses inside a huge page, and bitmaps counted in 4 KiB pages.
    let mut unaligned = 0u64.to_le_bytes().to_vec();
    unaligned.extend_from_slice(&0x1000u64.to_le_bytes());
    assert!(matches!(
        decode(&raw_frame(ty::PAGE_REQUEST, &unaligned), &HUGE),
        Err(WireError::BadAddress { .. })
    ));
    let small_bits = vec![0u8; 8 * bitmap_words(MEM, PAGE_SIZE)];
    assert!(matches!(
        decode(&raw_frame(ty::MISSING, &small_bits), &HUGE),
        Err(WireError::BadPayload { .. })
    ));
    // encode refuses a page of neither size, and a huge page at an unaligned address.
    for m in [
        Message::Page {
            gpa: 0,
            flags: 0,
            data: vec![0; 8192].into_boxed_slice(),
        },
        Message::Page {
            gpa: 0x1000,
            flags: 0,
            data: vec![1; huge].into_boxed_slice(),
        },
    ] {
        assert!(encode(&m, &mut out).is_err());
    }
    assert!(out.is_empty());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_in_a_2_mib_session(
        bytes in proptest::collection::vec(any::<u8>(), 0..5000),
        len in prop_oneof![Just(12 + HUGE_PAGE_SIZE as u32), any::<u32>()],
    ) {
        let _ = decode(&bytes, &HUGE);
        let _ = read_message(&mut std::io::Cursor::new(&bytes), &HUGE);
        // A page header claiming a whole huge page, then too little of it.
        let mut f = Vec::new();
        put_u32(&mut f, MAGIC);
        f.extend_from_slice(&VERSION.to_le_bytes());
        f.extend_from_slice(&ty::PAGE.to_le_bytes());
        put_u32(&mut f, len);
        put_u32(&mut f, 0);
        f.extend_from_slice(&bytes);
        let _ = decode(&f, &HUGE);
        let r = read_message(&mut std::io::Cursor::new(f), &HUGE);
        prop_assert!(r.is_err());
    }
}

#[test]
fn a_bitmap_of_more_than_32_gib_in_4_kib_pages_goes_in_one_frame() {
    // 64 GiB of 4 KiB pages: a 2 MiB bitmap, twice MAX_PAYLOAD.
    let big = Limits {
        mem_size: 64 << 30,
        page_size: PAGE_SIZE,
    };
    let words = big.bitmap_words();
    assert_eq!(words * 8, 2 << 20);
    let mut bits = vec![0u64; words];
    bits[words - 1] = 1 << 63;
    for m in [
        Message::Discard { bits: bits.clone() },
        Message::Missing { bits: bits.clone() },
    ] {
        let mut f = Vec::new();
        encode(&m, &mut f).unwrap();
        assert_eq!(decode(&f, &big).unwrap().0, m);
        assert_eq!(read_message(&mut &f[..], &big).unwrap(), m);
        // The same frame in a smaller session is refused by its header alone.
        assert!(matches!(
            decode(&f[..HEADER], &LIMITS),
            Err(WireError::TooLong { .. })
        ));
    }
    // A word more or less than the session's RAM has is refused from its header alone
    // (before a buffer of that size is allocated).
    for (words, long) in [(words + 1, true), (words - 1, false)] {
        let mut f = Vec::new();
        let bits = vec![0u64; words];
        encode(&Message::Discard { bits }, &mut f).unwrap();
        let e = decode(&f[..HEADER], &big);
        if long {
            assert!(matches!(e, Err(WireError::TooLong { .. })), "{e:?}");
        } else {
            assert!(matches!(e, Err(WireError::BadPayload { .. })), "{e:?}");
        }
    }
}
