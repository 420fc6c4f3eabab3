//! Arbitrary bytes through the framing and every frame parser (spec sections 3 and 4).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tally::proto::frame::{EnrollInit, ErrorFrame, FrameType, Hello, TagOnly, ValueAndTag};
use tally::proto::{decode_frame, LEN_PREFIX};

fuzz_target!(|data: &[u8]| {
    for limit in [tally::proto::HANDSHAKE_MAX_FRAME_LEN, 4096] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(frame)) = decode_frame(&mut buf, limit) {
            assert!(frame.len() <= LEN_PREFIX + limit as usize);
            let _ = FrameType::of(&frame);
            let _ = EnrollInit::decode(&frame);
            let _ = Hello::decode(&frame);
            let _ = ErrorFrame::decode(&frame);
            let _ = ErrorFrame::code_if_error(&frame);
            for ty in [FrameType::EnrollReply, FrameType::ServerAuth] {
                let _ = ValueAndTag::decode(&frame, ty, "x");
            }
            for ty in [FrameType::EnrollConfirm, FrameType::EnrollDone, FrameType::ClientFinish] {
                let _ = TagOnly::decode(&frame, ty, "x");
            }
        }
        assert!(buf.capacity() <= 2 * (LEN_PREFIX + limit as usize) + data.len());
    }
});
