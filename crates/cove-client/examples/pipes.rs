//! Spawn a process and talk to it through its pipes: write lines to its
//! stdin, read its stdout as it produces it, then close stdin and wait.
//!
//! ```text
//! cargo run -p cove-client --example pipes
//! ```

use cove_client::{Client, Error, SandboxSpec, Stdio};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let client = Client::from_env()?;
    let sandbox = client.create(SandboxSpec::new()).await?;

    let mut child = sandbox
        .command("sh")
        .args([
            "-c",
            "while read line; do echo \"got: $line\"; done; echo done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .await?;
    println!("pid {} in {}", child.id(), sandbox.id());

    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    for word in ["one", "two", "three"] {
        stdin.write_all(format!("{word}\n").as_bytes()).await?;
        stdin.flush().await?;
        if let Some(line) = lines.next_line().await? {
            println!("{line}");
        }
    }
    // Dropping stdin closes it: the loop ends.
    drop(stdin);
    while let Some(line) = lines.next_line().await? {
        println!("{line}");
    }
    let status = child.wait().await?;
    println!("exited with {status}");

    sandbox.kill().await?;
    Ok(())
}
