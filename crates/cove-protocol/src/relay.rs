//! The port relay of a microVM: how the host reaches a TCP port inside the
//! guest (a published port) without a network path to it.
//!
//! Besides its protocol port, the agent in a microVM listens on a second
//! vsock port (`VmInitConfig::relay_port`). Each connection there asks for
//! one TCP port: the host writes the port as two big-endian bytes, the
//! agent connects to it inside the guest (127.0.0.1, then ::1, then the
//! guest's own address) and writes one status byte. After [`CONNECTED`]
//! the vsock connection carries the TCP stream's bytes both ways until
//! either side closes; after any other status the agent closes.
//!
//! ```text
//!  host                                  agent (in the guest)
//!   │ port: u16 (big-endian)  ─────────▶  │ connect 127.0.0.1:port, ::1, eth0
//!   │                         ◀─────────  │ status: u8
//!   │ bytes                   ◀────────▶  │ bytes          (status CONNECTED)
//! ```

/// The agent is connected to the port; the stream follows.
pub const CONNECTED: u8 = 0;
/// Nothing in the guest listens on the port.
pub const REFUSED: u8 = 1;
/// The connection failed for another reason (timed out, no route).
pub const FAILED: u8 = 2;

/// The request for `port`.
pub fn request(port: u16) -> [u8; 2] {
    port.to_be_bytes()
}

/// The port a request asks for.
pub fn requested_port(request: [u8; 2]) -> u16 {
    u16::from_be_bytes(request)
}
