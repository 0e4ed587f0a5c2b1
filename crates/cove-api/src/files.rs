//! Files in sandboxes: entries, listings, requests of the `/files` and
//! `/fs` endpoints, and watch events.

use serde::de::{Error as _, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// What kind of entry a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// One file, directory or other entry in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileEntry {
    /// Absolute path in the sandbox, as asked (not canonicalized).
    pub path: String,
    /// The last component of the path.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileType,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits as a number (e.g. 420 for 0644), including setuid,
    /// setgid and sticky.
    pub mode: u32,
    /// `ls -l` style, e.g. `-rw-r--r--`.
    pub permissions: String,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, RFC 3339 with milliseconds.
    pub mtime: String,
    /// Where a symlink points (not shown for /proc's magic links).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// `GET /v1/sandboxes/{id}/fs/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    pub entries: Vec<FileEntry>,
    /// Whether `limit` cut the listing short.
    pub truncated: bool,
}

/// A permission mode given as an octal string: `"0755"`, `"644"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeValue(pub u32);

impl ModeValue {
    pub fn parse(text: &str) -> Result<ModeValue, String> {
        let digits = text.trim();
        let digits = digits.strip_prefix("0o").unwrap_or(digits);
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if !digits.is_empty() && mode <= 0o7777 => Ok(ModeValue(mode)),
            _ => Err(format!(
                "{text:?} is not a permission mode: give octal digits such as \"0755\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for ModeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ModeVisitor;
        impl Visitor<'_> for ModeVisitor {
            type Value = ModeValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an octal mode string such as \"0755\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ModeValue, E> {
                ModeValue::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ModeValue, E> {
                Err(E::custom(format!(
                    "give the mode as an octal string (\"0{v}\" for 0{v}?), not the number {v}"
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ModeValue, E> {
                Err(E::custom(format!("{v} is not a mode")))
            }
        }
        d.deserialize_any(ModeVisitor)
            .map_err(|e| D::Error::custom(e.to_string()))
    }
}

impl Serialize for ModeValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl PartialSchema for ModeValue {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        String::schema()
    }
}

impl ToSchema for ModeValue {
    fn name() -> std::borrow::Cow<'static, str> {
        "Mode".into()
    }
}

/// `POST /v1/sandboxes/{id}/fs/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    pub path: String,
    /// Create missing parents too, and accept an existing directory.
    #[serde(default)]
    pub parents: bool,
    /// Octal permission mode (default `"0755"`).
    #[serde(default)]
    pub mode: Option<ModeValue>,
}

/// `POST /v1/sandboxes/{id}/fs/move`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub from: String,
    /// The new path (a rename: moving into a directory needs the full name).
    pub to: String,
    /// Replace an existing `to` (a file, or an empty directory when `from`
    /// is a directory).
    #[serde(default)]
    pub overwrite: bool,
}

/// What a tar upload extracted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TarResult {
    /// Archive entries read.
    pub entries: u64,
    /// File bytes written.
    pub bytes: u64,
}

/// Raw bytes: the body of a file or archive transfer (for the OpenAPI
/// document; handlers stream bodies, never hold them).
#[derive(Debug, Clone, Copy)]
pub struct RawBytes;

impl PartialSchema for RawBytes {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl ToSchema for RawBytes {
    fn name() -> std::borrow::Cow<'static, str> {
        "RawBytes".into()
    }
}

/// A path in a query string.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Path in the sandbox; relative paths start at the sandbox's working directory.
    #[param(required = true)]
    pub path: Option<String>,
}

/// `GET …/fs/stat`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatQuery {
    /// Path in the sandbox.
    #[param(required = true)]
    pub path: Option<String>,
    /// Follow a final symlink (default false: describe the link itself).
    pub follow: Option<bool>,
}

/// `GET …/fs/list`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Directory in the sandbox.
    #[param(required = true)]
    pub path: Option<String>,
    /// Levels to descend: 1 (default) lists the directory's own entries.
    pub depth: Option<u32>,
    /// Most entries returned (default 10000, at most 100000).
    pub limit: Option<u32>,
}

/// `PUT …/files`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Destination file; missing parent directories are created.
    #[param(required = true)]
    pub path: Option<String>,
    /// Octal mode, e.g. `0755` (default: the replaced file's, else `0644`).
    #[param(value_type = Option<String>)]
    pub mode: Option<ModeValue>,
}

/// `DELETE …/fs`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Path in the sandbox.
    #[param(required = true)]
    pub path: Option<String>,
    /// Remove a directory and everything in it.
    pub recursive: Option<bool>,
}

/// `GET …/fs/watch`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// A directory (or a file) in the sandbox.
    #[param(required = true)]
    pub path: Option<String>,
    /// Watch subdirectories too (new ones included).
    pub recursive: Option<bool>,
}

/// A change under a watched path: the `data` of one server-sent event,
/// whose `event` field is the same as `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WatchEvent {
    /// `create`, `modify`, `delete`, `move` or `overflow` (events were lost
    /// because the client read too slowly).
    #[serde(rename = "type")]
    pub kind: String,
    /// The entry (create, modify, delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A move's old path (absent when it came from outside the watched tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// A move's new path (absent when it left the watched tree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Whether the entry is a directory.
    #[serde(default)]
    pub dir: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_strings() {
        let m: ModeValue = serde_json::from_str("\"0755\"").unwrap();
        assert_eq!(m.0, 0o755);
        let m: ModeValue = serde_json::from_str("\"644\"").unwrap();
        assert_eq!(m.0, 0o644);
        assert!(serde_json::from_str::<ModeValue>("755").is_err());
        assert!(serde_json::from_str::<ModeValue>("\"9\"").is_err());
        assert!(serde_json::from_str::<ModeValue>("\"17777\"").is_err());
        assert!(serde_json::from_str::<ModeValue>("\"\"").is_err());
        assert_eq!(
            serde_json::to_string(&ModeValue(0o640)).unwrap(),
            "\"0640\""
        );
    }
}
