//! The wire parser: round trips, and bad bytes that must be refused without panicking.

use super::*;
use proptest::prelude::*;

const MEM: u64 = 64 << 20;
const LIMITS: Limits = Limits { mem_size: MEM };

fn hello(mem_size: u64, vcpus: u32) -> Message {
    Message::Hello {
        mem_size,
        vcpus,
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
        raw_frame(ty::DISCARD, &vec![0u8; 8 * (bitmap_words(MEM) + 1)]),
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
    // Only these two say the destination never started the guest.
    let definite: Vec<_> = ErrorCode::ALL
        .into_iter()
        .filter(|c| c.guest_not_started())
        .collect();
    assert_eq!(
        definite,
        [ErrorCode::NeverStarted, ErrorCode::OtherMigration]
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
            data: vec![b; page_bytes(flags)].into_boxed_slice(),
        }),
        proptest::collection::vec(any::<u64>(), bitmap_words(MEM))
            .prop_map(|bits| Message::Discard { bits }),
        proptest::collection::vec(any::<u64>(), bitmap_words(MEM))
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
