//! Length-prefixed framing: `u32` little-endian payload length, then a
//! postcard-encoded message. The decoder checks the length before it
//! allocates, and any bytes it cannot parse are an error, never a panic.

use std::marker::PhantomData;

use std::sync::OnceLock;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

use crate::{AgentMessage, HostMessage, Stream};

/// Largest payload accepted in one frame. Output chunks are at most
/// [`crate::MAX_CHUNK`]; the rest is room for stdin and specs.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

const HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("malformed frame: {0} trailing bytes after the message")]
    Trailing(usize),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A `tokio_util` codec that reads `In` and writes `Out`.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_len: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new() -> Self {
        Self::with_max_len(MAX_FRAME_LEN)
    }

    pub fn with_max_len(max_len: usize) -> Self {
        FrameCodec {
            max_len,
            _types: PhantomData,
        }
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new()
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, DecodeError> {
        match next_payload(src, self.max_len)? {
            Some(payload) => decode_payload(&payload).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, DecodeError> {
        let frame = self.decode(src)?;
        at_eof(frame, src)
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = DecodeError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), DecodeError> {
        encode_into(&item, dst, self.max_len)
    }
}

/// At the end of input, bytes left over that make no whole frame are a
/// truncated frame.
fn at_eof<T>(frame: Option<T>, src: &BytesMut) -> Result<Option<T>, DecodeError> {
    match frame {
        Some(frame) => Ok(Some(frame)),
        None if src.is_empty() => Ok(None),
        None => Err(DecodeError::Truncated),
    }
}

/// Take the next whole frame's payload off `src`, checking its length
/// before anything is allocated for it.
fn next_payload(src: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, DecodeError> {
    if src.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    if src.len() < HEADER_LEN + len {
        src.reserve(HEADER_LEN + len - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    Ok(Some(src.split_to(len)))
}

fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes::<T>(payload)?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(value)
}

fn encode_into<T: Serialize>(item: &T, dst: &mut BytesMut, max: usize) -> Result<(), DecodeError> {
    let start = dst.len();
    dst.put_u32_le(0);
    let mut writer = dst.writer();
    postcard::to_io(item, &mut writer)?;
    let dst = writer.into_inner();
    let len = dst.len() - start - HEADER_LEN;
    if len > max {
        dst.truncate(start);
        return Err(DecodeError::TooLarge { len, max });
    }
    dst[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// A message from the agent as the host reads it: an `Output`'s bytes stay
/// where they were read (a slice of the frame, not a copy).
#[derive(Debug, Clone, PartialEq)]
pub enum FromAgent {
    Output {
        pid: u32,
        stream: Stream,
        offset: u64,
        data: Bytes,
    },
    Message(AgentMessage),
}

/// A `tokio_util` codec for the host's side of a connection: reads
/// [`FromAgent`], writes [`HostMessage`]s.
#[derive(Debug, Default)]
pub struct HostCodec;

impl Decoder for HostCodec {
    type Item = FromAgent;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<FromAgent>, DecodeError> {
        match next_payload(src, MAX_FRAME_LEN)? {
            Some(payload) => decode_from_agent(payload.freeze()).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<FromAgent>, DecodeError> {
        let frame = self.decode(src)?;
        at_eof(frame, src)
    }
}

impl Encoder<HostMessage> for HostCodec {
    type Error = DecodeError;

    fn encode(&mut self, item: HostMessage, dst: &mut BytesMut) -> Result<(), DecodeError> {
        encode_into(&item, dst, MAX_FRAME_LEN)
    }
}

/// The first byte of an encoded `AgentMessage::Output`: its variant index.
fn output_tag() -> u8 {
    static TAG: OnceLock<u8> = OnceLock::new();
    *TAG.get_or_init(|| {
        let empty = AgentMessage::Output {
            pid: 0,
            stream: Stream::Stdout,
            offset: 0,
            data: Vec::new(),
        };
        postcard::to_allocvec(&empty).map_or(u8::MAX, |bytes| bytes[0])
    })
}

/// Decode one frame's payload from the agent.
fn decode_from_agent(payload: Bytes) -> Result<FromAgent, DecodeError> {
    /// `AgentMessage::Output`'s fields, its bytes borrowed from the frame.
    #[derive(Deserialize)]
    struct OutputFields<'a> {
        pid: u32,
        stream: Stream,
        offset: u64,
        data: &'a [u8],
    }
    if payload.first() != Some(&output_tag()) {
        return decode_payload(&payload).map(FromAgent::Message);
    }
    let (fields, rest) = postcard::take_from_bytes::<OutputFields<'_>>(&payload[1..])?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    // The bytes are the message's last field, so they end the payload.
    let start = payload.len() - fields.data.len();
    Ok(FromAgent::Output {
        pid: fields.pid,
        stream: fields.stream,
        offset: fields.offset,
        data: payload.slice(start..),
    })
}

/// Append one message to `dst` as a complete frame.
pub fn encode_frame_into<T: Serialize>(item: &T, dst: &mut BytesMut) -> Result<(), DecodeError> {
    encode_into(item, dst, MAX_FRAME_LEN)
}

/// The start of the frame of an [`AgentMessage::Output`] carrying `len`
/// bytes: the frame is these bytes followed by the output itself, so a
/// sender can write output from where it already lies (a vectored write)
/// instead of copying it into an encoded message first.
pub fn output_frame_head(
    pid: u32,
    stream: Stream,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, DecodeError> {
    // The message with no bytes ends in the data's length, a varint 0;
    // postcard writes the real length the same way (as any `u64`).
    let empty = AgentMessage::Output {
        pid,
        stream,
        offset,
        data: Vec::new(),
    };
    let mut head = vec![0u8; HEADER_LEN];
    postcard::to_io(&empty, &mut head)?;
    head.pop();
    postcard::to_io(&(len as u64), &mut head)?;
    let frame_len = head.len() - HEADER_LEN + len;
    if frame_len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge {
            len: frame_len,
            max: MAX_FRAME_LEN,
        });
    }
    head[..HEADER_LEN].copy_from_slice(&(frame_len as u32).to_le_bytes());
    Ok(head)
}

/// Encode one message as a complete frame.
pub fn encode_frame<T: Serialize>(item: &T) -> Result<Vec<u8>, DecodeError> {
    let mut buf = BytesMut::new();
    encode_into(item, &mut buf, MAX_FRAME_LEN)?;
    Ok(buf.to_vec())
}

/// Decode one complete frame from the start of `bytes`, returning the message
/// and the number of bytes it used, or `None` when more bytes are needed.
pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<Option<(T, usize)>, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let Some(payload) = bytes.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    decode_payload(payload).map(|value| Some((value, HEADER_LEN + len)))
}
