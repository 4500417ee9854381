//! Framing of SMPP PDUs over a byte stream, tolerant of PDUs we cannot decode.
//!
//! rusmpp's `CommandCodec` ends the stream at the first PDU it cannot decode (a carrier's odd
//! TLV, a non-ASCII byte in a C-string), which would drop the whole bind and every message in
//! its window. This codec first cuts the frame by its `command_length`, then decodes it; a frame
//! that does not decode becomes [`Frame::Undecodable`] with its header, so the session can answer
//! `generic_nack` and carry on (SMPP 3.4 §2.8, CRATES.md pitfall 2).

use bytes::{Buf, BytesMut};
use rusmpp::Command;
use rusmpp::decode::DecodeWithLength;
use rusmpp::tokio_codec::{CommandCodec, EncodeError};
use tokio_util::codec::{Decoder, Encoder};

const HEADER_LENGTH: usize = 16;

/// One frame read from the peer. Not boxed: `Command` is the common case, and each frame is
/// moved once, straight from the decoder to the session.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Frame {
    Command(Command),
    /// A well-framed PDU whose body could not be decoded.
    Undecodable {
        command_id: u32,
        sequence_number: u32,
        error: String,
    },
}

/// A frame whose length makes the rest of the stream unreadable: the link must be closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("command_length {0} is outside the accepted range")]
    BadLength(usize),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
pub struct FrameCodec {
    max_length: usize,
    encoder: CommandCodec,
}

impl FrameCodec {
    /// `max_length` bounds a PDU (header included); larger frames close the link.
    pub fn new(max_length: usize) -> FrameCodec {
        FrameCodec {
            max_length,
            encoder: CommandCodec::new(),
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let length = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if !(HEADER_LENGTH..=self.max_length).contains(&length) {
            return Err(FrameError::BadLength(length));
        }
        if src.len() < length {
            src.reserve(length - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(length);
        frame.advance(4);
        let command_id = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let sequence_number = u32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
        let body_length = length - 4;
        match Command::decode(&mut frame, body_length) {
            Ok((command, _)) => Ok(Some(Frame::Command(command))),
            Err(error) => Ok(Some(Frame::Undecodable {
                command_id,
                sequence_number,
                error: error.to_string(),
            })),
        }
    }
}

impl Encoder<&Command> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, command: &Command, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        self.encoder.encode(command, dst).map_err(|e| match e {
            EncodeError::Io(io) => io,
            other => std::io::Error::other(other.to_string()),
        })
    }
}

impl Encoder<Command> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, command: Command, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        self.encode(&command, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusmpp::{CommandStatus, Pdu};

    fn encoded(command: &Command) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::new(4096).encode(command, &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_bad_pdu_between_good_ones_does_not_end_the_stream() {
        let good = Command::new(CommandStatus::EsmeRok, 1, Pdu::EnquireLink);
        let mut stream = encoded(&good);
        // A submit_sm_resp whose message_id C-string has a non-ASCII byte and no NUL.
        let bad_body = [0xE9u8, 0x41];
        let len = (16 + bad_body.len()) as u32;
        stream.extend_from_slice(&len.to_be_bytes());
        stream.extend_from_slice(&0x8000_0004u32.to_be_bytes());
        stream.extend_from_slice(&0u32.to_be_bytes());
        stream.extend_from_slice(&7u32.to_be_bytes());
        stream.extend_from_slice(&bad_body);
        stream.extend_from_slice(&encoded(&Command::new(
            CommandStatus::EsmeRok,
            2,
            Pdu::EnquireLinkResp,
        )));

        let mut codec = FrameCodec::new(4096);
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(&mut stream).unwrap() {
            frames.push(frame);
        }
        assert_eq!(frames.len(), 3);
        assert!(matches!(&frames[0], Frame::Command(c) if c.sequence_number() == 1));
        assert!(matches!(
            &frames[1],
            Frame::Undecodable {
                command_id: 0x8000_0004,
                sequence_number: 7,
                ..
            }
        ));
        assert!(matches!(&frames[2], Frame::Command(c) if c.sequence_number() == 2));
    }

    #[test]
    fn an_absurd_length_is_an_error_not_an_allocation() {
        let mut stream = BytesMut::from(&[0xFFu8, 0xFF, 0xFF, 0xF0, 0, 0, 0, 0x15][..]);
        let err = FrameCodec::new(4096).decode(&mut stream).unwrap_err();
        assert!(matches!(err, FrameError::BadLength(_)));
        let mut short = BytesMut::from(&[0u8, 0, 0, 8, 0, 0, 0, 0x15][..]);
        assert!(FrameCodec::new(4096).decode(&mut short).is_err());
    }

    #[test]
    fn a_partial_frame_waits_for_more_bytes() {
        let full = encoded(&Command::new(CommandStatus::EsmeRok, 9, Pdu::EnquireLink));
        let mut codec = FrameCodec::new(4096);
        let mut part = BytesMut::from(&full[..10]);
        assert!(codec.decode(&mut part).unwrap().is_none());
        part.extend_from_slice(&full[10..]);
        assert!(matches!(
            codec.decode(&mut part).unwrap(),
            Some(Frame::Command(_))
        ));
    }
}
