//! The sandbox's seccomp filter: what Docker's default profile refuses to a
//! container without CAP_SYS_ADMIN, refused here with EPERM.
//!
//! Docker's profile is an allow list; this is the equivalent deny list, so
//! new harmless syscalls keep working. Three filters are stacked (the kernel
//! applies the strictest answer):
//!
//! 1. EPERM for the denied syscalls, for `clone` with any namespace flag,
//!    and for `personality` outside the values Docker allows;
//! 2. ENOSYS for `clone3`, whose flags live in memory a filter cannot read,
//!    so libc falls back to `clone`, which filter 1 can check;
//! 3. EPERM for x32 syscall numbers, which would otherwise bypass 1.
//!
//! Anything but the native x86-64/aarch64 ABI is killed by seccompiler's
//! architecture check.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

use crate::SetupError;

/// Syscalls refused outright.
const DENIED: &[i64] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_bpf,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_delete_module,
    libc::SYS_finit_module,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fsopen,
    libc::SYS_fspick,
    libc::SYS_get_mempolicy,
    libc::SYS_init_module,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_kcmp,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_lookup_dcookie,
    libc::SYS_mbind,
    libc::SYS_migrate_pages,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_move_mount,
    libc::SYS_move_pages,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_open_tree,
    libc::SYS_perf_event_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_pivot_root,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_reboot,
    libc::SYS_request_key,
    libc::SYS_set_mempolicy,
    libc::SYS_setns,
    libc::SYS_settimeofday,
    libc::SYS_swapoff,
    libc::SYS_swapon,
    libc::SYS_syslog,
    libc::SYS_umount2,
    libc::SYS_unshare,
    libc::SYS_uselib,
    libc::SYS_userfaultfd,
    libc::SYS_vhangup,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_modify_ldt,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_nfsservctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS__sysctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_sysfs,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ustat,
];

/// Namespace flags `clone` may not carry.
const CLONE_NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    0x80, // CLONE_NEWTIME
];

/// `personality` values Docker allows: Linux, UNAME26, PER_LINUX32 and
/// its UNAME26 variant, and the query value.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

fn arch() -> Result<TargetArch, SetupError> {
    std::env::consts::ARCH.try_into().map_err(|_| {
        SetupError::Seccomp(format!(
            "unsupported architecture {}",
            std::env::consts::ARCH
        ))
    })
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SetupError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| SetupError::Seccomp(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SetupError> {
    SeccompRule::new(conditions).map_err(|e| SetupError::Seccomp(e.to_string()))
}

/// The compiled filters, in the order they are installed.
pub fn programs() -> Result<Vec<BpfProgram>, SetupError> {
    let arch = arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|nr| (*nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_clone,
        CLONE_NS_FLAGS
            .iter()
            .map(|flag| rule(vec![cond(0, SeccompCmpOp::MaskedEq(*flag), *flag)?]))
            .collect::<Result<_, _>>()?,
    );
    rules.insert(
        libc::SYS_personality,
        vec![rule(
            PERSONALITIES
                .iter()
                .map(|p| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *p))
                .collect::<Result<_, _>>()
                .map_err(|e| SetupError::Seccomp(e.to_string()))?,
        )?],
    );
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| SetupError::Seccomp(e.to_string()))?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| SetupError::Seccomp(e.to_string()))?;
    let mut programs: Vec<BpfProgram> = vec![
        deny.try_into()
            .map_err(|e: seccompiler::BackendError| SetupError::Seccomp(e.to_string()))?,
        clone3
            .try_into()
            .map_err(|e: seccompiler::BackendError| SetupError::Seccomp(e.to_string()))?,
    ];
    if cfg!(target_arch = "x86_64") {
        programs.push(x32_filter());
    }
    Ok(programs)
}

/// `nr >= __X32_SYSCALL_BIT` → EPERM.
fn x32_filter() -> BpfProgram {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JGE_K: u16 = 0x35;
    const BPF_RET_K: u16 = 0x06;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    vec![
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        }, // seccomp_data.nr
        sock_filter {
            code: BPF_JGE_K,
            jt: 0,
            jf: 1,
            k: 0x4000_0000,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: RET_ERRNO | libc::EPERM as u32,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        },
    ]
}

/// Set `no_new_privs` and install the filters on the calling thread; every
/// process the agent starts inherits them.
pub fn apply(programs: &[BpfProgram]) -> Result<(), SetupError> {
    for program in programs {
        seccompiler::apply_filter(program).map_err(|e| SetupError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let programs = programs().expect("filters compile");
        assert!(programs.len() >= 2);
        assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }
}
