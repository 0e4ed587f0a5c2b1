//! Capabilities: the sandbox keeps a container-like set and nothing else.
//!
//! The set is Docker's default without `CAP_MKNOD` (there is no device
//! cgroup to stop a new block device node from reaching the host's disks)
//! and without `CAP_NET_RAW` (raw sockets are a common spoofing tool and
//! ping works through ICMP datagram sockets).

use caps::{CapSet, Capability, CapsHashSet};

use crate::SetupError;

/// What a sandbox's root keeps.
pub const KEPT: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// Drop every capability not in [`KEPT`] from all sets, the bounding set
/// included, so no exec can regain it.
pub fn restrict() -> Result<(), SetupError> {
    let keep: CapsHashSet = KEPT.iter().copied().collect();
    let fail = |e: caps::errors::CapsError| SetupError::Capabilities(e.to_string());
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(fail)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(fail)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(fail)?;
    caps::set(None, CapSet::Effective, &keep).map_err(fail)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(fail)?;
    Ok(())
}
