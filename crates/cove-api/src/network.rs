//! A sandbox's network: what a create request may ask for, and what the
//! sandbox object shows.
//!
//! ```json
//! "network": "none"
//! "network": {"mode": "egress", "allow_out": ["10.0.0.0/8", "pypi.org"], "deny_out": ["10.9.0.0/16"],
//!             "exposed_ports": [8080, {"port": 3000, "host_port": 13000}]}
//! ```

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// How a sandbox reaches other machines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Loopback only: nothing outside the sandbox is reachable.
    #[default]
    None,
    /// A veth into cove's bridge, NAT to the host's networks, filtered by
    /// `allow_out` / `deny_out`. The host itself, other sandboxes and
    /// 169.254.0.0/16 stay unreachable unless `allow_out` names them.
    Egress,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Egress => "egress",
        }
    }
}

/// `network` of a create request: `"none"`, `"egress"`, or an object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct NetworkRequest {
    /// `none` or `egress`. Default: `egress` when `allow_out` or
    /// `deny_out` is given, `none` otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<NetworkMode>,
    /// Where the sandbox may connect: CIDRs (`10.0.0.0/8`), IPv4 addresses,
    /// host names (`pypi.org`) or wildcards (`*.example.com`). Empty: every
    /// public address. Host names are resolved when the sandbox is created
    /// and again whenever the sandbox looks them up through cove's DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// Where the sandbox may not connect, in the same forms; it wins over
    /// `allow_out`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// Ports of the sandbox to publish on the host's loopback: a port
    /// number (the host port is picked by the kernel), or
    /// `{"port": 8080, "host_port": 18080}`. Works in every mode on the
    /// namespace backend; a microVM publishes ports with `egress` only, and
    /// its server must listen on the guest's address, not on localhost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<PortRequest>,
}

/// The object form of [`NetworkRequest`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkObject {
    #[serde(default)]
    mode: Option<NetworkMode>,
    #[serde(default)]
    allow_out: Vec<String>,
    #[serde(default)]
    deny_out: Vec<String>,
    #[serde(default)]
    exposed_ports: Vec<PortRequest>,
}

impl<'de> Deserialize<'de> for NetworkRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::Null => Ok(NetworkRequest::default()),
            serde_json::Value::String(mode) => {
                let mode = match mode.as_str() {
                    "none" => NetworkMode::None,
                    "egress" => NetworkMode::Egress,
                    other => {
                        return Err(D::Error::custom(format!(
                            "network {other:?} must be \"none\", \"egress\" or an object"
                        )));
                    }
                };
                Ok(NetworkRequest {
                    mode: Some(mode),
                    ..NetworkRequest::default()
                })
            }
            value @ serde_json::Value::Object(_) => {
                let object: NetworkObject = serde_json::from_value(value)
                    .map_err(|e| D::Error::custom(format!("network: {e}")))?;
                Ok(NetworkRequest {
                    mode: object.mode,
                    allow_out: object.allow_out,
                    deny_out: object.deny_out,
                    exposed_ports: object.exposed_ports,
                })
            }
            _ => Err(D::Error::custom(
                "network must be \"none\", \"egress\" or an object",
            )),
        }
    }
}

impl NetworkRequest {
    /// The mode this request means, after the defaults.
    pub fn effective_mode(&self) -> NetworkMode {
        self.mode
            .unwrap_or(if self.allow_out.is_empty() && self.deny_out.is_empty() {
                NetworkMode::None
            } else {
                NetworkMode::Egress
            })
    }
}

/// A port to publish: a number, or `{"port", "host_port"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct PortRequest {
    /// The port inside the sandbox.
    pub port: u16,
    /// The port on the host's 127.0.0.1; absent: one the kernel picks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortObject {
    port: u16,
    #[serde(default)]
    host_port: Option<u16>,
}

impl<'de> Deserialize<'de> for PortRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let (port, host_port) = match &value {
            serde_json::Value::Number(n) => (n.as_u64(), None),
            serde_json::Value::Object(_) => {
                let object: PortObject = serde_json::from_value(value.clone()).map_err(|e| {
                    D::Error::custom(format!("exposed port {value}: {e} (ports are 1-65535)"))
                })?;
                (Some(u64::from(object.port)), object.host_port)
            }
            _ => (None, None),
        };
        match port {
            Some(p @ 1..=65535) if host_port != Some(0) => Ok(PortRequest {
                port: p as u16,
                host_port,
            }),
            _ => Err(D::Error::custom(format!(
                "exposed port {value} must be a port number (1-65535) or {{\"port\": N, \"host_port\": M}}"
            ))),
        }
    }
}

/// A published port: `127.0.0.1:host_port` on the host reaches `port` in
/// the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortMapping {
    pub port: u16,
    pub host_port: u16,
    /// The host address the port is published on (`127.0.0.1`).
    pub host_ip: String,
}

/// A sandbox's network as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkInfo {
    pub mode: NetworkMode,
    /// The sandbox's IPv4 address on cove's bridge (`egress` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Its gateway and DNS server: the bridge's address (`egress` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(json: &str) -> Result<NetworkRequest, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn shorthand_and_object_forms() {
        assert_eq!(
            parse("\"none\"").unwrap().effective_mode(),
            NetworkMode::None
        );
        assert_eq!(
            parse("\"egress\"").unwrap().effective_mode(),
            NetworkMode::Egress
        );
        let r = parse(r#"{"allow_out": ["10.0.0.0/8"], "exposed_ports": [80, {"port": 3000, "host_port": 13000}]}"#)
            .unwrap();
        assert_eq!(r.effective_mode(), NetworkMode::Egress);
        assert_eq!(
            r.exposed_ports,
            vec![
                PortRequest {
                    port: 80,
                    host_port: None
                },
                PortRequest {
                    port: 3000,
                    host_port: Some(13000)
                }
            ]
        );
        assert_eq!(
            parse(r#"{"exposed_ports": [8080]}"#)
                .unwrap()
                .effective_mode(),
            NetworkMode::None
        );
    }

    #[test]
    fn bad_values_are_named() {
        assert!(parse("\"bridge\"").unwrap_err().contains("\"bridge\""));
        assert!(parse(r#"{"allow": []}"#).unwrap_err().contains("allow"));
        assert!(
            parse(r#"{"exposed_ports": [70000]}"#)
                .unwrap_err()
                .contains("70000")
        );
        assert!(parse(r#"{"exposed_ports": [0]}"#).is_err());
        assert!(parse(r#"{"exposed_ports": ["80"]}"#).is_err());
        assert!(parse(r#"{"exposed_ports": [{"port": 80, "host_port": 0}]}"#).is_err());
        assert!(parse("7").is_err());
    }
}
