//! File transfer throughput through the daemon's HTTP API, side by side
//! with `cp` of the same bytes in the same run: an upload is compared with
//! `cp` on the sandbox's disk (where the upload writes), a download with
//! `cp` on the host's disk (where the download writes).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cove_client::api::{CreateSandboxRequest, ExecRequest, SizeValue};

use super::daemon::Daemon;
use super::{BenchArgs, Rate};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples
        .get(samples.len() / 2)
        .copied()
        .unwrap_or(Duration::ZERO)
}

fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

fn write_source(path: &Path, mib: u64) -> Result<(), String> {
    let mut file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            // xorshift: incompressible bytes, cheaply.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&block).map_err(|e| e.to_string())?;
    }
    file.sync_all().map_err(|e| e.to_string())
}

/// Upload and download `--file-mib` MiB through the API, and `cp` the same
/// bytes on each side's disk; medians of three runs each.
pub(super) fn cases(args: &BenchArgs, scratch: &Path) -> Vec<Rate> {
    let mib = args.file_mib;
    let bytes = mib << 20;
    let names = [
        (
            "upload through the API",
            "PUT /v1/sandboxes/{id}/files (host file → sandbox)",
        ),
        (
            "cp on the sandbox's disk",
            "cp in the sandbox (its overlay → itself)",
        ),
        (
            "download through the API",
            "GET /v1/sandboxes/{id}/files (sandbox → host file)",
        ),
        (
            "cp on the host's disk",
            "cp on the host (the source file's directory)",
        ),
    ];
    let measured = (|| -> Result<[Duration; 4], String> {
        let src = scratch.join("source.bin");
        write_source(&src, mib)?;
        let daemon = Daemon::start(scratch, "files")?;
        let client = daemon.client();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let sandbox = client
                .create_sandbox(&CreateSandboxRequest {
                    disk: Some(SizeValue(3 * bytes + (256 << 20))),
                    ..CreateSandboxRequest::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let id = sandbox.id;
            let (mut up, mut sandbox_cp, mut down, mut host_cp) = (vec![], vec![], vec![], vec![]);
            let exec = |cmd: &str| ExecRequest {
                cmd: Some(cmd.into()),
                ..ExecRequest::default()
            };
            for _ in 0..3 {
                // Both writers make a new file: the last round's upload is
                // removed first, as `cp`'s copy is (freeing 512 MiB of the
                // old file's pages took ~0.1 s of the timed upload).
                let _ = client.exec(&id, &exec("rm -f /workspace/up.bin")).await;
                let start = Instant::now();
                client
                    .upload_file(&id, &src, "/workspace/up.bin", None)
                    .await
                    .map_err(|e| e.to_string())?;
                up.push(start.elapsed());

                let result = client
                    .exec(&id, &exec("cp /workspace/up.bin /workspace/cp.bin"))
                    .await
                    .map_err(|e| e.to_string())?;
                if result.exit_code != 0 {
                    return Err(format!("cp in the sandbox failed: {}", result.stderr));
                }
                sandbox_cp.push(Duration::from_millis(result.duration_ms));
                let _ = client.exec(&id, &exec("rm -f /workspace/cp.bin")).await;

                let dst = scratch.join("download.bin");
                let start = Instant::now();
                let mut download = client
                    .download(&id, "/workspace/up.bin")
                    .await
                    .map_err(|e| e.to_string())?;
                let mut out = std::fs::File::create(&dst).map_err(|e| e.to_string())?;
                while let Some(chunk) = download.chunk().await.map_err(|e| e.to_string())? {
                    out.write_all(&chunk).map_err(|e| e.to_string())?;
                }
                drop(out);
                down.push(start.elapsed());
                let _ = std::fs::remove_file(&dst);

                let copy = scratch.join("copy.bin");
                let start = Instant::now();
                let status = Command::new("cp")
                    .arg(&src)
                    .arg(&copy)
                    .status()
                    .map_err(|e| format!("cp: {e}"))?;
                host_cp.push(start.elapsed());
                let _ = std::fs::remove_file(&copy);
                if !status.success() {
                    return Err(format!("cp failed: {status}"));
                }
            }
            let _ = client.delete_sandbox(&id).await;
            Ok([
                median(up),
                median(sandbox_cp),
                median(down),
                median(host_cp),
            ])
        })
    })();
    match measured {
        Ok(times) => {
            let rates: Vec<f64> = times.iter().map(|t| rate(bytes, *t)).collect();
            names
                .iter()
                .zip(&rates)
                .enumerate()
                .map(|(i, ((name, command), r))| {
                    let mut result = Rate::new(name, command, *r, "MiB/s");
                    if i % 2 == 0 {
                        result.versus = Some((names[i + 1].0.to_string(), r / rates[i + 1]));
                    }
                    result
                })
                .collect()
        }
        Err(reason) => names
            .iter()
            .map(|(name, command)| Rate::skipped(name, command, reason.clone()))
            .collect(),
    }
}
