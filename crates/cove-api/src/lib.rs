//! The types of cove's HTTP API: what clients send, what the daemon answers,
//! and the error codes, each with an OpenAPI schema. No I/O lives here; the
//! daemon (`cove-server`) and the SDK (`cove-client`) share these types.

pub mod backend;
pub mod error;
pub mod exec;
pub mod files;
pub mod keys;
pub mod network;
pub mod sandbox;
pub mod units;
pub mod values;

pub use backend::{BackendInfo, BackendList};
pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use exec::{
    Encoding, ExecRequest, ExecResult, ExitInfo, ProcessInfo, ProcessList, PtyRequest,
    SignalRequest, Started, StdinWritten, parse_signal,
};
pub use files::{
    FileEntry, FileList, FileType, MkdirRequest, ModeValue, MoveRequest, TarResult, WatchEvent,
};
pub use keys::{CreateKeyRequest, KeyCreated, KeyInfo, KeyList, Scope};
pub use network::{NetworkInfo, NetworkMode, NetworkRequest, PortMapping, PortRequest};
pub use sandbox::{
    CreateSandboxRequest, CreateTemplateRequest, Limits, Sandbox, SandboxList, SandboxState,
    SetTimeoutRequest, SnapshotRequest, TemplateInfo, TemplateList,
};
pub use values::{DurationValue, SizeValue};

/// The default TCP address of `cove serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";

/// Format Unix milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339_millis(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::rfc3339_millis(1_764_108_000_123),
            "2025-11-25T22:00:00.123Z"
        );
        assert_eq!(
            super::rfc3339_millis(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
