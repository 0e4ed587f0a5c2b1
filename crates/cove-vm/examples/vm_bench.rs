//! Boot-to-first-exec of a cove microVM next to a bare QEMU microvm boot of
//! the same kernel to its init, in the same run, and exec latency over the
//! vsock transport.
//!
//! ```text
//! cargo run --release -p cove-vm --example vm_bench -- CACHE_DIR STATIC_AGENT TEMPLATE_DIR [RUNS]
//! ```

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cove_protocol::client::AgentClient;
use cove_protocol::{CommandLine, ProcessSpec};
use cove_vm::{Vm, VmConfig};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: vm_bench CACHE_DIR STATIC_AGENT TEMPLATE_DIR [RUNS]");
        std::process::exit(2);
    }
    let cache = PathBuf::from(&args[1]);
    let runs: usize = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(3);
    let image = cove_vm::ensure_guest_image(&cache, args[2].as_ref(), &mut |_, _, _| {})?;
    let rootfs = cove_vm::ensure_rootfs_image(args[3].as_ref(), &mut |_, _, _| {})?;
    let host = cove_vm::accel::host_accel(&image)?;
    println!(
        "kernel {} ; KVM usable: {} ({})",
        image.kernel_version, host.kvm_boots_guests, host.reason
    );

    let mut bare = Vec::new();
    let mut cove = Vec::new();
    let mut first_exec = Vec::new();
    let mut latencies = Vec::new();
    for run in 0..runs {
        // Bare: same kernel, same initramfs, same machine, no devices; the
        // init reports (it has no VM config) and powers off.
        let dir = std::env::temp_dir().join(format!("cove-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let console = dir.join("console.log");
        let tsc = if host.kvm_boots_guests {
            String::new()
        } else {
            format!(" tsc_early_khz={}", host.tsc_khz)
        };
        let accel = if host.kvm_boots_guests {
            ["kvm", "host"]
        } else {
            ["tcg", "max"]
        };
        let start = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on",
            ])
            .args([
                "-accel", accel[0], "-cpu", accel[1], "-m", "256", "-smp", "1",
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-chardev")
            .arg(format!("file,id=c,path={}", console.display()))
            .args(["-serial", "chardev:c", "-kernel"])
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initramfs)
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1{tsc} -- --vm-init"))
            .stdin(Stdio::null())
            .spawn()?;
        loop {
            if std::fs::read_to_string(&console)
                .unwrap_or_default()
                .contains("cove-vm-init:")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        bare.push(ms(start.elapsed()));
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);

        let mut config = VmConfig::new(
            format!("bench{run}"),
            rootfs.clone(),
            std::env::temp_dir().join(format!("cove-bench-vm-{run}")),
        );
        config.memory_mib = 256;
        let start = Instant::now();
        let vm = Vm::boot(&image, config).await?;
        let booted = start.elapsed();
        let client = AgentClient::connect(vm.connect().await?, "bench").await?;
        let out = client
            .output(
                ProcessSpec::new(CommandLine::Argv(vec!["/bin/true".into()])),
                None,
            )
            .await?;
        assert_eq!(out.status.code, Some(0));
        cove.push(ms(booted));
        first_exec.push(ms(start.elapsed()));
        for _ in 0..50 {
            let t = Instant::now();
            client
                .output(
                    ProcessSpec::new(CommandLine::Argv(vec!["/bin/true".into()])),
                    None,
                )
                .await?;
            latencies.push(ms(t.elapsed()));
        }
        vm.destroy().await?;
    }
    for v in [&mut bare, &mut cove, &mut first_exec, &mut latencies] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    println!("runs: {runs}");
    println!(
        "bare qemu microvm boot to init      median {:8.1} ms  (min {:.1})",
        percentile(&bare, 0.5),
        bare[0]
    );
    println!(
        "cove boot to agent Hello             median {:8.1} ms  (min {:.1})",
        percentile(&cove, 0.5),
        cove[0]
    );
    println!(
        "cove boot to first exec done         median {:8.1} ms  (min {:.1})",
        percentile(&first_exec, 0.5),
        first_exec[0]
    );
    println!(
        "exec latency (/bin/true, {} runs)    p50 {:.2} ms  p95 {:.2} ms  max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        percentile(&latencies, 1.0)
    );
    Ok(())
}
