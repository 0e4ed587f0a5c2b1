//! A minimal QMP client: one connection per command, since QEMU's monitor
//! socket serves one client at a time and commands are rare (pause, resume,
//! quit).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::VmError;

/// Run `command` and return its `return` value.
pub async fn execute(socket: &Path, command: &str) -> Result<Value, VmError> {
    tokio::time::timeout(Duration::from_secs(10), execute_inner(socket, command))
        .await
        .map_err(|_| VmError::Control {
            command: command.into(),
            detail: "QEMU's monitor did not answer within 10s".into(),
        })?
}

async fn execute_inner(socket: &Path, command: &str) -> Result<Value, VmError> {
    let err = |detail: String| VmError::Control {
        command: command.into(),
        detail,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| err(format!("cannot connect to {}: {e}", socket.display())))?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut next = async || -> Result<Value, VmError> {
        loop {
            let line = lines
                .next_line()
                .await
                .map_err(|e| err(e.to_string()))?
                .ok_or_else(|| err("QEMU closed its monitor".into()))?;
            let value: Value = serde_json::from_str(&line).map_err(|e| err(e.to_string()))?;
            // Events arrive at any time; they are not answers.
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    };
    next().await?; // greeting
    for cmd in ["qmp_capabilities", command] {
        let mut line = json!({ "execute": cmd }).to_string();
        line.push('\n');
        write
            .write_all(line.as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
        let answer = match next().await {
            Ok(answer) => answer,
            // `quit` may close the socket before answering.
            Err(_) if cmd == "quit" => return Ok(Value::Null),
            Err(e) => return Err(e),
        };
        if let Some(error) = answer.get("error") {
            return Err(err(error.to_string()));
        }
        if cmd == command {
            return Ok(answer.get("return").cloned().unwrap_or(Value::Null));
        }
    }
    Ok(Value::Null)
}
