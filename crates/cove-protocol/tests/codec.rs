//! Property tests for the frame decoder: arbitrary bytes never panic it,
//! oversized lengths are refused before allocation, and every message
//! survives a round trip byte for byte.

#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use cove_protocol::{
    AgentMessage, CommandLine, DecodeError, ExitStatus, FrameCodec, FromAgent, HostCodec,
    HostMessage, MAX_FRAME_LEN, ProcessSpec, PtySize, Stream, decode_frame, encode_frame,
    output_frame_head,
};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn arb_spec() -> impl Strategy<Value = ProcessSpec> {
    (
        prop_oneof![
            prop::collection::vec(".*", 0..4).prop_map(CommandLine::Argv),
            ".*".prop_map(CommandLine::Shell)
        ],
        prop::collection::vec((".*", ".*"), 0..4),
        any::<bool>(),
        prop::option::of(".*"),
        any::<u64>(),
        prop::option::of(any::<u64>()),
        prop::option::of(
            (any::<u16>(), any::<u16>()).prop_map(|(rows, cols)| PtySize { rows, cols }),
        ),
    )
        .prop_map(
            |(command, env, stdin, cwd, timeout_ms, max_output, pty)| ProcessSpec {
                command,
                env,
                clear_env: false,
                cwd,
                user: None,
                stdin,
                timeout_ms,
                max_output,
                pty,
                window: 4096,
                background: false,
                follow: false,
                replay_bytes: 1 << 20,
                tag: None,
            },
        )
}

fn arb_host() -> impl Strategy<Value = HostMessage> {
    prop_oneof![
        (any::<u32>(), arb_spec()).prop_map(|(req, spec)| HostMessage::Spawn { req, spec }),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..2048))
            .prop_map(|(pid, data)| HostMessage::Stdin { pid, data }),
        (any::<u32>(), any::<i32>(), any::<bool>())
            .prop_map(|(pid, signal, group)| HostMessage::Signal { pid, signal, group }),
        (any::<u32>(), any::<u64>()).prop_map(|(pid, bytes)| HostMessage::Credit { pid, bytes }),
    ]
}

fn arb_agent() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        (
            any::<u32>(),
            any::<bool>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..4096)
        )
            .prop_map(|(pid, err, offset, data)| AgentMessage::Output {
                pid,
                stream: if err { Stream::Stderr } else { Stream::Stdout },
                offset,
                data
            }),
        (any::<u32>(), prop::option::of(any::<i32>()), any::<bool>()).prop_map(
            |(pid, code, timed_out)| AgentMessage::Exited {
                pid,
                status: ExitStatus {
                    code,
                    timed_out,
                    ..ExitStatus::default()
                }
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut codec = FrameCodec::<HostMessage, AgentMessage>::new();
        let mut buf = BytesMut::from(&bytes[..]);
        // Keep decoding until it needs more input or reports an error.
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
        let _ = decode_frame::<AgentMessage>(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_valid_header_with_garbage(
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let mut codec = FrameCodec::<HostMessage, AgentMessage>::new();
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = codec.decode(&mut buf);
        let mut codec = FrameCodec::<AgentMessage, HostMessage>::new();
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = codec.decode(&mut buf);
    }

    #[test]
    fn host_messages_round_trip(msg in arb_host()) {
        let frame = encode_frame(&msg).unwrap();
        let (back, used) = decode_frame::<HostMessage>(&frame).unwrap().unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn agent_messages_round_trip_through_codec_split_anywhere(msg in arb_agent(), split in any::<prop::sample::Index>()) {
        let mut codec = FrameCodec::<AgentMessage, AgentMessage>::new();
        let mut encoded = BytesMut::new();
        codec.encode(msg.clone(), &mut encoded).unwrap();
        let cut = split.index(encoded.len());
        let mut buf = BytesMut::from(&encoded[..cut]);
        let first = codec.decode(&mut buf).unwrap();
        if cut < encoded.len() {
            prop_assert!(first.is_none());
            buf.extend_from_slice(&encoded[cut..]);
            prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(msg));
        } else {
            prop_assert_eq!(first, Some(msg));
        }
    }
}

proptest! {
    #[test]
    fn the_host_reads_every_agent_message_split_anywhere(msg in arb_agent(), split in any::<prop::sample::Index>()) {
        let frame = encode_frame(&msg).unwrap();
        let cut = split.index(frame.len());
        let mut codec = HostCodec;
        let mut buf = BytesMut::from(&frame[..cut]);
        let mut got = codec.decode(&mut buf).unwrap();
        if cut < frame.len() {
            prop_assert!(got.is_none());
            buf.extend_from_slice(&frame[cut..]);
            got = codec.decode(&mut buf).unwrap();
        }
        let want = match msg {
            AgentMessage::Output { pid, stream, offset, data } => FromAgent::Output {
                pid,
                stream,
                offset,
                data: data.into(),
            },
            other => FromAgent::Message(other),
        };
        prop_assert_eq!(got, Some(want));
        prop_assert!(buf.is_empty());
    }
}

#[test]
fn the_host_keeps_output_where_it_was_read() {
    let message = AgentMessage::Output {
        pid: 3,
        stream: Stream::Stdout,
        offset: 0,
        data: vec![5; 100_000],
    };
    let mut buf = BytesMut::from(&encode_frame(&message).unwrap()[..]);
    let read = buf.as_ptr_range();
    let Some(FromAgent::Output { data, .. }) = HostCodec.decode(&mut buf).unwrap() else {
        panic!("not output");
    };
    assert_eq!(data.len(), 100_000);
    assert!(read.contains(&data.as_ptr()), "the bytes were copied");
}

proptest! {
    // Fewer cases: some carry a megabyte.
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn an_output_head_and_its_bytes_are_the_encoded_message(
        pid in any::<u32>(),
        stderr in any::<bool>(),
        offset in any::<u64>(),
        len in prop_oneof![0usize..300, 16_000usize..17_000, Just(1 << 20)],
    ) {
        let stream = if stderr { Stream::Stderr } else { Stream::Stdout };
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut frame = output_frame_head(pid, stream, offset, len).unwrap();
        frame.extend_from_slice(&data);
        let message = AgentMessage::Output { pid, stream, offset, data };
        prop_assert_eq!(&frame, &encode_frame(&message).unwrap());
    }
}

#[test]
fn an_output_head_refuses_a_frame_over_the_limit() {
    let err = output_frame_head(1, Stream::Stdout, 0, MAX_FRAME_LEN).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
}

#[test]
fn oversized_length_is_refused_without_allocating() {
    let mut codec = FrameCodec::<HostMessage, AgentMessage>::new();
    let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
    match codec.decode(&mut buf) {
        Err(DecodeError::TooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as usize);
            assert_eq!(max, MAX_FRAME_LEN);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        buf.capacity() < 1024,
        "decoder must not reserve for a refused frame"
    );
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut frame = encode_frame(&HostMessage::Ping { nonce: 7 }).unwrap();
    frame.push(0);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(
        decode_frame::<HostMessage>(&frame),
        Err(DecodeError::Trailing(1))
    ));
}

#[test]
fn truncated_frame_at_eof_is_an_error() {
    let frame = encode_frame(&HostMessage::Ping { nonce: 7 }).unwrap();
    let mut codec = FrameCodec::<HostMessage, AgentMessage>::new();
    let mut buf = BytesMut::from(&frame[..frame.len() - 1]);
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(DecodeError::Truncated)
    ));
}

#[test]
fn binary_stdio_is_carried_intact() {
    let data: Vec<u8> = (0..=255u8).chain([0, 0, 0xff, 0xfe]).collect();
    let msg = AgentMessage::Output {
        pid: 1,
        stream: Stream::Stdout,
        offset: 0,
        data: data.clone(),
    };
    let frame = encode_frame(&msg).unwrap();
    let (back, _) = decode_frame::<AgentMessage>(&frame).unwrap().unwrap();
    assert_eq!(back, msg);
}

#[test]
fn shell_command_runs_through_sh_c() {
    assert_eq!(
        CommandLine::Shell("echo $HOME".into()).to_argv(),
        vec!["/bin/sh".to_string(), "-c".into(), "echo $HOME".into()]
    );
}
