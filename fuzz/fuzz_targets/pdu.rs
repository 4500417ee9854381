//! The bytes a carrier sends, through our framing decoder (`smsgw::smpp::codec::FrameCodec`):
//! it must never panic, never buffer more than one PDU's worth, and every decoded command must
//! encode again. A decoded deliver_sm also goes through the receipt classifier, as in a session.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rusmpp::Pdu;
use smsgw::smpp::codec::{Frame, FrameCodec};
use tokio_util::codec::{Decoder, Encoder};

/// The session's limit (`MAX_PDU_LENGTH` in src/smpp/session.rs).
const MAX_PDU: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(MAX_PDU);
    // Fed in two pieces, as TCP may cut it anywhere.
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut buffer = BytesMut::new();
    for piece in [&data[..cut], &data[cut..]] {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(Frame::Command(command))) => {
                    if let Some(Pdu::DeliverSm(deliver)) = command.pdu() {
                        let _ = smsgw::receipt::classify(deliver);
                    }
                    let mut out = BytesMut::new();
                    let _ = codec.encode(&command, &mut out);
                }
                Ok(Some(Frame::Undecodable { .. })) => {}
                Ok(None) => break,
                // A bad length: the session closes the link here.
                Err(_) => return,
            }
            // The decoder reserves at most one PDU ahead of what arrived.
            assert!(
                buffer.capacity() <= MAX_PDU.max(data.len()) * 2 + 64,
                "buffer grew to {}",
                buffer.capacity()
            );
        }
    }
});
