//! Property tests of the frame codec: arbitrary bytes never make it panic, valid frames round
//! trip, and lengths over the limit are refused.

use proptest::prelude::*;
use transport::{Frame, FrameError, FrameHeader, HEADER_LEN, MAX_PAYLOAD};

fn valid_frame() -> impl Strategy<Value = Frame> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD),
    )
        .prop_map(|(kind, flags, id, arg, payload)| Frame {
            kind,
            flags,
            id,
            arg,
            payload,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_header_decodes_or_is_refused_for_its_length(bytes in any::<[u8; HEADER_LEN]>()) {
        let announced = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        match Frame::decode_header(&bytes) {
            Ok(header) => {
                prop_assert!(header.payload_len() <= MAX_PAYLOAD);
                prop_assert_eq!(header.encode(), bytes);
            }
            Err(FrameError::PayloadTooLong { len }) => {
                prop_assert!(announced > MAX_PAYLOAD);
                prop_assert_eq!(len, announced as u64);
            }
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_what_decodes_re_encodes_identically(
        bytes in prop::collection::vec(any::<u8>(), 0..6000)
    ) {
        if let Ok((frame, used)) = Frame::decode(&bytes) {
            let mut again = Vec::new();
            frame.encode_into(&mut again);
            prop_assert_eq!(&again[..], &bytes[..used]);
        }
    }

    #[test]
    fn valid_frames_round_trip(frame in valid_frame(), trailing in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = Vec::new();
        frame.encode_into(&mut bytes);
        prop_assert_eq!(bytes.len(), frame.encoded_len());
        bytes.extend_from_slice(&trailing);
        let (decoded, used) = Frame::decode(&bytes).unwrap();
        prop_assert_eq!(used, frame.encoded_len());
        prop_assert_eq!(decoded, frame);
    }

    #[test]
    fn lengths_over_the_limit_are_refused(
        len in (u32::try_from(MAX_PAYLOAD).unwrap() + 1)..=u32::MAX,
        kind in any::<u16>(),
        id in any::<u64>(),
    ) {
        let header = FrameHeader { kind, flags: 0, payload_len: len, id, arg: 0 };
        prop_assert_eq!(
            Frame::decode_header(&header.encode()),
            Err(FrameError::PayloadTooLong { len: u64::from(len) })
        );
        // Even with that many bytes behind it, the whole-frame decoder refuses too.
        let mut bytes = header.encode().to_vec();
        bytes.resize(HEADER_LEN + MAX_PAYLOAD + 1, 0);
        let whole = Frame::decode(&bytes);
        prop_assert!(matches!(whole, Err(FrameError::PayloadTooLong { .. })), "{:?}", whole);
    }
}
