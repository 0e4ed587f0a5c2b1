//! `cove bench`'s microVM cases: boot to first exec on the microVM backend
//! next to a bare `qemu-system-x86_64 -M microvm` boot of the same kernel
//! and initramfs to its init, in the same run; exec latency over vsock;
//! and where a boot's time goes.
//!
//! Phases come from two clocks. The host times `Vm::boot` (launch, then
//! until the agent's `Hello`). The guest's own clock starts with its
//! kernel; the first exec reads its uptime and the kernel log's timestamps
//! of `Run /init` and the root disk's mount, which places the guest's
//! milestones on the host's timeline (to within one exec round trip).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cove_protocol::client::AgentClient;
use cove_protocol::{CommandLine, ProcessSpec};
use cove_server::backend::microvm::{self as backend, DEFAULT_VM_TEMPLATE};
use cove_template::TemplateStore;
use cove_vm::{GuestImage, Vm, VmConfig};

use crate::bench::{BenchArgs, CaseResult, skipped, summarize};
use crate::paths;

/// Medians of the phases of a cove microVM boot, in ms.
#[derive(Debug, Default, serde::Serialize)]
pub struct Phases {
    /// Host: accel choice, the VM's initramfs, vsock helper, QEMU set up.
    pub host_launch_ms: f64,
    /// QEMU running to the guest kernel's clock starting (firmware-less
    /// PVH entry, early kernel setup), estimated.
    pub vmm_to_kernel_ms: f64,
    /// Guest kernel start to `Run /init`.
    pub kernel_to_init_ms: f64,
    /// `/init` to the root disk mounted: modules, disk probe, EROFS mount.
    pub init_to_root_mounted_ms: f64,
    /// Root mounted to the host seeing the agent's `Hello`: overlay,
    /// /proc /sys /dev, agent start, vsock, host polling.
    pub root_to_hello_ms: f64,
    /// `Hello` to the first exec's exit seen by the host.
    pub first_exec_ms: f64,
}

const NAMES: [&str; 4] = [
    "bare qemu -M microvm: boot to init",
    "microvm: boot to agent Hello",
    "microvm: boot to first exec done",
    "microvm: exec `true` over vsock",
];

/// All microVM cases; each is skipped with the reason when this host
/// cannot run microVMs.
pub fn cases(args: &BenchArgs) -> (Vec<CaseResult>, Option<Phases>) {
    let shown = [
        "qemu-system-x86_64 -M microvm, same kernel + initramfs, no devices; until its init writes to the console",
        "Vm::boot of a busybox microVM: helper, QEMU, kernel, modules, disk, agent over vsock",
        "Vm::boot, then spawn `/bin/true` and wait for its exit",
        "agent protocol over vsock: spawn `true`, wait for its exit (VM already running)",
    ];
    match run_all(args) {
        Ok((samples, phases)) => (
            samples
                .into_iter()
                .enumerate()
                .map(|(i, s)| summarize(NAMES[i], shown[i], s))
                .collect(),
            Some(phases),
        ),
        Err(reason) => (
            (0..4)
                .map(|i| skipped(NAMES[i], shown[i], reason.clone()))
                .collect(),
            None,
        ),
    }
}

type Samples = [Vec<Duration>; 4];

fn run_all(args: &BenchArgs) -> Result<(Samples, Phases), String> {
    if args.vm_runs == 0 {
        return Err("--vm-runs 0".into());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let agent = backend::probe_host(&me)?;
    let store = TemplateStore::new(paths::default_data_dir().join("templates"));
    let template = match store.get(DEFAULT_VM_TEMPLATE) {
        Ok(t) => t,
        Err(_) => store
            .build_busybox(&mut |_, _, _| {})
            .map_err(|e| e.to_string())?,
    };
    let image = cove_vm::ensure_guest_image(&crate::run_vm::cache_dir(), &agent, &mut |_, _, _| {})
        .map_err(|e| e.to_string())?;
    let disk =
        cove_vm::ensure_rootfs_image_of(&template.dir, template.root_layers(), &mut |_, _, _| {})
            .map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(measure(args, &image, &disk))
}

async fn measure(
    args: &BenchArgs,
    image: &GuestImage,
    disk: &Path,
) -> Result<(Samples, Phases), String> {
    let host = cove_vm::accel::host_accel(image).map_err(|e| e.to_string())?;
    let scratch = paths::default_runtime_dir().join("bench-vm");
    let mut samples: Samples = Default::default();
    let mut phases: [Vec<f64>; 6] = Default::default();
    // One unmeasured round first: page cache, the KVM probe.
    for run in 0..args.vm_runs + 1 {
        let measured = run > 0;
        let bare = bare_boot(image, &host, &scratch.join("bare"))?;

        let config = VmConfig::new(
            format!("bench{run}"),
            disk.to_path_buf(),
            scratch.join(format!("vm{run}")),
        );
        let start = Instant::now();
        let vm = Vm::boot(image, config).await.map_err(|e| e.to_string())?;
        let hello = start.elapsed();
        let timings = vm.boot_timings();
        let result = async {
            let client =
                AgentClient::connect(vm.connect().await.map_err(|e| e.to_string())?, "bench")
                    .await
                    .map_err(|e| e.to_string())?;
            let first = ProcessSpec::new(CommandLine::Argv(vec!["/bin/true".into()]));
            client
                .output(first, None)
                .await
                .map_err(|e| e.to_string())?;
            let first_exec = start.elapsed();
            let probe = ProcessSpec::new(CommandLine::Shell(
                "cat /proc/uptime; cut -d' ' -f22 /proc/1/stat; dmesg".into(),
            ));
            let out = client
                .output(probe, None)
                .await
                .map_err(|e| e.to_string())?;
            let probed = start.elapsed();
            let mut latencies = Vec::new();
            for i in 0..args.warmup + args.iterations {
                let spec = ProcessSpec::new(CommandLine::Argv(vec!["true".into()]));
                let t = Instant::now();
                let out = client.output(spec, None).await.map_err(|e| e.to_string())?;
                if out.status.code != Some(0) {
                    return Err(format!("true exited with {:?}", out.status));
                }
                if i >= args.warmup {
                    latencies.push(t.elapsed());
                }
            }
            Ok((out.stdout, first_exec, probed, latencies))
        }
        .await;
        let _ = vm.destroy().await;
        let (guest, first_exec, probed, latencies) = result?;
        if !measured {
            continue;
        }
        samples[0].push(bare);
        samples[1].push(hello);
        samples[2].push(first_exec);
        samples[3].extend(latencies);
        if let (Some(timings), Some(g)) = (timings, GuestClock::parse(&guest)) {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            // Host time at which the guest's clock read zero.
            let kernel_start = ms(probed) - g.uptime_ms;
            let launch = ms(timings.launch);
            phases[0].push(launch);
            phases[1].push((kernel_start - launch).max(0.0));
            phases[2].push(g.run_init_ms);
            phases[3].push(g.root_mounted_ms - g.run_init_ms);
            phases[4].push(ms(hello) - kernel_start - g.root_mounted_ms);
            phases[5].push(ms(first_exec) - ms(hello));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let [a, b, c, d, e, f] = &mut phases;
    Ok((
        samples,
        Phases {
            host_launch_ms: median(a),
            vmm_to_kernel_ms: median(b),
            kernel_to_init_ms: median(c),
            init_to_root_mounted_ms: median(d),
            root_to_hello_ms: median(e),
            first_exec_ms: median(f),
        },
    ))
}

/// The guest's milestones on its own clock.
struct GuestClock {
    uptime_ms: f64,
    run_init_ms: f64,
    root_mounted_ms: f64,
}

impl GuestClock {
    /// From `cat /proc/uptime; cut -d' ' -f22 /proc/1/stat; dmesg`.
    fn parse(output: &[u8]) -> Option<GuestClock> {
        let text = String::from_utf8_lossy(output);
        let mut lines = text.lines();
        let uptime: f64 = lines.next()?.split_whitespace().next()?.parse().ok()?;
        let _init_ticks = lines.next()?;
        let stamp = |needle: &str| -> Option<f64> {
            text.lines().find(|l| l.contains(needle)).and_then(|l| {
                let inner = l.trim_start().strip_prefix('[')?.split(']').next()?;
                inner.trim().parse::<f64>().ok()
            })
        };
        Some(GuestClock {
            uptime_ms: uptime * 1000.0,
            run_init_ms: stamp("Run /init")? * 1000.0,
            root_mounted_ms: stamp("(device vda): mounted")? * 1000.0,
        })
    }
}

/// A bare QEMU microvm boot of the same kernel and initramfs, until the
/// guest's init runs (it has no VM config, says so on the console, and
/// powers off).
fn bare_boot(
    image: &GuestImage,
    host: &cove_vm::accel::HostAccel,
    dir: &Path,
) -> Result<Duration, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let console = dir.join("console.log");
    let _ = std::fs::remove_file(&console);
    let (accel, cpu, tsc) = if host.kvm_boots_guests {
        ("kvm", "host", String::new())
    } else {
        ("tcg", "max", format!(" tsc_early_khz={}", host.tsc_khz))
    };
    let start = Instant::now();
    let mut child = Command::new(cove_vm::vmm::qemu::binary())
        .args([
            "-M",
            "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on",
        ])
        .args(["-accel", accel, "-cpu", cpu, "-m", "256", "-smp", "1"])
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
        .arg(format!(
            "console=ttyS0 quiet panic=-1 nowatchdog{tsc} -- --vm-init"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run QEMU: {e}"))?;
    let deadline = start + Duration::from_secs(120);
    let result = loop {
        if std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("cove-vm-init:")
        {
            break Ok(start.elapsed());
        }
        if Instant::now() > deadline {
            break Err("the bare guest did not reach its init within 120s".into());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("the bare QEMU exited early ({status})"));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
    result
}

/// The microVM boot next to the bare one, and its phases.
pub fn print_phases(results: &[CaseResult], phases: &Phases) {
    let p50 = |name: &str| {
        results
            .iter()
            .find(|r| r.name == name && r.skipped.is_none())
            .map(|r| r.p50_ms)
    };
    if let (Some(bare), Some(first)) = (p50(NAMES[0]), p50(NAMES[2])) {
        println!(
            "\nmicroVM boot to first exec vs bare QEMU boot to init (p50): {first:.0} ms vs {bare:.0} ms, +{:.0}%",
            (first / bare - 1.0) * 100.0
        );
    }
    println!("\n| microVM boot phase (median) | ms |\n|---|---:|");
    for (name, ms) in [
        (
            "host: accel choice, VM initramfs, vsock helper, QEMU set up",
            phases.host_launch_ms,
        ),
        (
            "QEMU running to the guest kernel's clock (estimate)",
            phases.vmm_to_kernel_ms,
        ),
        ("guest kernel to `Run /init`", phases.kernel_to_init_ms),
        (
            "/init to root disk mounted (modules, disk probe, EROFS)",
            phases.init_to_root_mounted_ms,
        ),
        (
            "root mounted to the agent's Hello on the host",
            phases.root_to_hello_ms,
        ),
        ("Hello to the first exec's exit", phases.first_exec_ms),
    ] {
        println!("| {name} | {ms:.0} |");
    }
}
