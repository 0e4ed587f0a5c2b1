//! Create a sandbox, run a few commands in it, and delete it.
//!
//! With `cove serve` running on this machine (as root, so the admin key is
//! readable):
//!
//! ```text
//! cargo run -p cove-client --example hello
//! ```
//!
//! `COVE_URL` and `COVE_KEY` point it at another daemon.

use std::time::Duration;

use cove_client::{Client, Error, SandboxSpec};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let client = Client::from_env()?;
    let sandbox = client
        .create(
            SandboxSpec::new()
                .memory(256 << 20)
                .env("GREETING", "hello")
                .timeout(Duration::from_secs(300)),
        )
        .await?;
    println!("created {}", sandbox.id());

    // Capture output; a non-zero exit is a status, not an error.
    let out = sandbox
        .command("sh")
        .args(["-c", "echo $GREETING from $(hostname); exit 3"])
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("exit code {:?}", out.status.code());

    // stdout and stderr interleaved in the order they were written.
    let (status, combined) = sandbox
        .command("sh")
        .args(["-c", "echo to stdout; echo to stderr >&2"])
        .combined_output()
        .await?;
    print!("{}", String::from_utf8_lossy(&combined));
    assert!(status.success());

    // A per-command timeout kills the process tree.
    let out = sandbox
        .command("sleep")
        .arg("60")
        .timeout(Duration::from_millis(500))
        .output()
        .await?;
    println!("timed out: {}", out.status.timed_out());

    sandbox.kill().await?;
    Ok(())
}
