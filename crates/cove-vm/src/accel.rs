//! KVM or TCG.
//!
//! `/dev/kvm` existing does not mean it can boot a guest: under nested
//! virtualization it may open fine and then hang or fail on a stock kernel.
//! So the first VM on a host boots the guest image once under KVM with a
//! short deadline (its init reports on the console and powers off at
//! once, having no VM config) and the answer is cached in the image cache.
//! Without KVM, QEMU emulates the CPU (TCG); the guest cannot calibrate its
//! TSC there and hangs unless told the frequency (`tsc_early_khz=`), which
//! is measured on the host.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{GuestImage, VmError, vmm::qemu};

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation: seconds to boot, fine for tests.
    Tcg,
}

/// What a VM asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccelChoice {
    /// KVM when the probe says it boots guests, TCG otherwise.
    /// `COVE_VM_ACCEL=kvm|tcg` overrides it.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

const PROBE_FILE: &str = "accel.json";
const PROBE_DEADLINE: Duration = Duration::from_secs(15);

/// The cached answer of the probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAccel {
    pub kvm_boots_guests: bool,
    /// Why KVM is not used, for the docs and logs.
    pub reason: String,
    /// Host TSC frequency in kHz, for TCG guests.
    pub tsc_khz: u64,
    pub kernel_version: String,
}

/// Decide how to run `image`, probing (once per cache) when needed.
pub fn choose(image: &GuestImage, choice: AccelChoice) -> Result<(Accel, HostAccel), VmError> {
    let choice = match std::env::var("COVE_VM_ACCEL").as_deref() {
        Ok("kvm") => AccelChoice::Kvm,
        Ok("tcg") => AccelChoice::Tcg,
        _ => choice,
    };
    let host = host_accel(image)?;
    let accel = match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto if host.kvm_boots_guests => Accel::Kvm,
        AccelChoice::Auto => Accel::Tcg,
    };
    Ok((accel, host))
}

/// The cached probe result, probing first if there is none for this kernel.
pub fn host_accel(image: &GuestImage) -> Result<HostAccel, VmError> {
    let path = image.cache_dir.join(PROBE_FILE);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(cached) = serde_json::from_str::<HostAccel>(&text)
        && cached.kernel_version == image.kernel_version
    {
        return Ok(cached);
    }
    let (kvm_boots_guests, reason) = probe_kvm(image);
    let answer = HostAccel {
        kvm_boots_guests,
        reason,
        tsc_khz: tsc_khz(),
        kernel_version: image.kernel_version.clone(),
    };
    let tmp = image
        .cache_dir
        .join(format!(".{PROBE_FILE}.{}", std::process::id()));
    if let Ok(json) = serde_json::to_vec_pretty(&answer)
        && std::fs::write(&tmp, json).is_ok()
    {
        let _ = std::fs::rename(&tmp, &path);
    }
    Ok(answer)
}

fn probe_kvm(image: &GuestImage) -> (bool, String) {
    let kvm = Path::new("/dev/kvm");
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        return (false, format!("/dev/kvm cannot be opened: {e}"));
    }
    let Ok(dir) = tempfile_dir(&image.cache_dir) else {
        return (
            false,
            "cannot create a scratch directory for the KVM probe".into(),
        );
    };
    let console = dir.join("console.log");
    let child = Command::new(qemu::binary())
        .args([
            "-M",
            "microvm,isa-serial=on,rtc=on",
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ])
        .args(["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot"])
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-serial", "chardev:con", "-kernel"])
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initramfs)
        .args(["-append", "console=ttyS0 panic=-1 quiet -- --vm-init"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return (false, format!("cannot run QEMU for the KVM probe: {e}"));
        }
    };
    let deadline = Instant::now() + PROBE_DEADLINE;
    let verdict = loop {
        let reached = std::fs::read_to_string(&console)
            .map(|c| c.contains("cove-vm-init:"))
            .unwrap_or(false);
        if reached {
            break (true, "KVM booted the guest kernel to its init".to_string());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            break (
                false,
                format!(
                    "QEMU with KVM exited ({status}) before the guest's init ran: {}",
                    err.trim()
                ),
            );
        }
        if Instant::now() > deadline {
            break (
                false,
                format!(
                    "KVM did not boot the guest kernel to its init within {}s (nested virtualization?)",
                    PROBE_DEADLINE.as_secs()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    verdict
}

fn tempfile_dir(parent: &Path) -> std::io::Result<std::path::PathBuf> {
    let dir = parent.join(format!(".kvm-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The host's TSC frequency in kHz, measured against the monotonic clock.
/// TCG guests read the host's TSC, so this is their frequency too.
pub fn tsc_khz() -> u64 {
    let mut samples: Vec<u64> = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            let c0 = rdtsc();
            std::thread::sleep(Duration::from_millis(20));
            let c1 = rdtsc();
            let nanos = t0.elapsed().as_nanos().max(1) as u64;
            c1.saturating_sub(c0).saturating_mul(1_000_000) / nanos
        })
        .collect();
    samples.sort_unstable();
    samples[1]
}

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn rdtsc() -> u64 {
    0
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn measures_a_plausible_tsc_frequency() {
        let khz = super::tsc_khz();
        // Between 100 MHz and 10 GHz: a real x86 TSC, not noise.
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
