//! The debian template: `debootstrap --variant=minbase` of Debian stable
//! from Debian's archive, plus python3, as one layer.
//!
//! minbase is Debian's essential packages plus apt (about 90 packages);
//! with python3 it is ~260 MB and takes a couple of minutes, about half of
//! a default debootstrap. Downloaded packages are kept in
//! `<templates>/.cache/debootstrap`, so a rebuild does not fetch them
//! again; a built template is reused unless a rebuild is asked for.
//! Progress comes from debootstrap's machine-readable channel (its
//! `--debian-installer` mode writes `P: now end` lines to descriptor 3).

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::layers::LayerInfo;
use crate::{
    ImageConfig, Observer, Template, TemplateError, TemplateKind, TemplateStore,
    create_standard_dirs, io_err, now, tree,
};

/// What to bootstrap.
#[derive(Debug, Clone)]
pub struct DebianOptions {
    pub suite: String,
    pub mirror: String,
    /// Packages on top of minbase.
    pub include: Vec<String>,
    /// Build again even if the template exists.
    pub rebuild: bool,
}

impl Default for DebianOptions {
    fn default() -> DebianOptions {
        DebianOptions {
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            include: vec!["python3".into()],
            rebuild: false,
        }
    }
}

const DEBOOTSTRAP: &str = "/usr/sbin/debootstrap";

/// Turn debootstrap's descriptor-3 protocol into observer calls.
fn follow_progress(channel: impl std::io::Read, observer: &dyn Observer) {
    let (mut now, mut end) = (0u64, 0u64);
    let mut args: Vec<String> = Vec::new();
    for line in BufReader::new(channel).lines() {
        let Ok(line) = line else { break };
        if let Some(rest) = line.strip_prefix("P: ") {
            let mut parts = rest.split_whitespace();
            now = parts.next().and_then(|n| n.parse().ok()).unwrap_or(now);
            end = parts.next().and_then(|n| n.parse().ok()).unwrap_or(end);
        } else if let Some(format) = line.strip_prefix("PF: ") {
            observer.layer("debian", format, now, end);
        } else if let Some(arg) = line.strip_prefix("IA: ") {
            args.push(arg.to_string());
        } else if let Some(format) = line.strip_prefix("IF: ") {
            let mut text = format.to_string();
            for arg in args.drain(..) {
                text = text.replacen("%s", &arg, 1);
            }
            observer.step(&text);
        } else if line.starts_with("I: ") {
            args.clear();
        }
    }
}

/// Make a bootstrapped tree a template root: no host leftovers, cove's
/// standard directories, an unprivileged `user` (uid 1000) as on busybox.
fn tidy(root: &Path) -> Result<(), TemplateError> {
    for dir in ["var/cache/apt/archives", "dev"] {
        let path = root.join(dir);
        for entry in fs::read_dir(&path).into_iter().flatten().flatten() {
            let p = entry.path();
            let is_file = entry.file_type().is_ok_and(|t| !t.is_dir());
            if is_file {
                fs::remove_file(&p).map_err(io_err("remove", &p))?;
            } else if dir == "dev" {
                fs::remove_dir_all(&p).map_err(io_err("remove", &p))?;
            }
        }
    }
    for name in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = fs::remove_file(root.join(name));
    }
    for (name, contents) in [
        ("etc/hostname", "localhost\n"),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        ),
        // The sandbox's network settings are bound over it when it has a network.
        ("etc/resolv.conf", ""),
    ] {
        let path = root.join(name);
        let _ = fs::remove_file(&path);
        fs::write(&path, contents).map_err(io_err("write", &path))?;
    }
    create_standard_dirs(root)?;
    for (file, line) in [
        ("etc/passwd", "user:x:1000:1000:user:/home/user:/bin/bash\n"),
        ("etc/group", "user:x:1000:\n"),
        ("etc/shadow", "user:*:19000:0:99999:7:::\n"),
    ] {
        let path = root.join(file);
        let mut text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        if !text.lines().any(|l| l.starts_with("user:")) {
            if !text.ends_with('\n') && !text.is_empty() {
                text.push('\n');
            }
            text.push_str(line);
            fs::write(&path, text).map_err(io_err("write", &path))?;
        }
    }
    let home = root.join("home/user");
    std::os::unix::fs::chown(&home, Some(1000), Some(1000)).map_err(io_err("chown", &home))?;
    Ok(())
}

/// debootstrap's arguments: minbase plus `include`, packages cached in
/// `cache` (so a rebuild downloads nothing again), progress on fd 3.
fn debootstrap_args(options: &DebianOptions, cache: &Path, target: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--debian-installer".into(),
        "--variant=minbase".into(),
        format!("--cache-dir={}", cache.display()).into(),
    ];
    if !options.include.is_empty() {
        args.push(format!("--include={}", options.include.join(",")).into());
    }
    args.push(options.suite.clone().into());
    args.push(target.into());
    args.push(options.mirror.clone().into());
    args
}

impl TemplateStore {
    /// Where debootstrap keeps downloaded packages between builds.
    pub fn debian_cache(&self) -> std::path::PathBuf {
        self.root().join(".cache/debootstrap")
    }

    /// Build (or find) the debian template.
    pub fn build_debian(
        &self,
        options: &DebianOptions,
        observer: &dyn Observer,
    ) -> Result<Template, TemplateError> {
        if !options.rebuild
            && let Ok(existing) = self.get("debian")
        {
            observer.step("the debian template is already built (rebuild it with --rebuild)");
            return Ok(existing);
        }
        if !Path::new(DEBOOTSTRAP).is_file() {
            return Err(TemplateError::Build(
                "debootstrap is not installed; install it with `apt-get install debootstrap`"
                    .into(),
            ));
        }
        let cache = self.debian_cache();
        fs::create_dir_all(&cache).map_err(io_err("create", &cache))?;
        let _busy = self.importing()?;
        let layers = self.layers();
        let staging = layers.stage()?;
        let target = staging.fs();
        let log_path = staging.scratch("debootstrap.log");
        let log = fs::File::create(&log_path).map_err(io_err("create", &log_path))?;
        let log_err = log.try_clone().map_err(io_err("open", &log_path))?;
        let (progress_read, progress_write) =
            std::io::pipe().map_err(|e| TemplateError::Build(format!("pipe: {e}")))?;
        let fd = progress_write.as_raw_fd();
        let mut command = Command::new(DEBOOTSTRAP);
        command
            .args(debootstrap_args(options, &cache, &target))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (dup2, fcntl) on descriptors this process owns.
        unsafe {
            command.pre_exec(move || {
                if fd == 3 {
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        observer.step(&format!(
            "debootstrap {} from {} (minbase + {})",
            options.suite,
            options.mirror,
            options.include.join(", ")
        ));
        let mut child = command
            .spawn()
            .map_err(|e| TemplateError::Build(format!("cannot run {DEBOOTSTRAP}: {e}")))?;
        drop(command);
        drop(progress_write);
        follow_progress(progress_read, observer);
        let status = child
            .wait()
            .map_err(|e| TemplateError::Build(format!("waiting for debootstrap: {e}")))?;
        if !status.success() {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(TemplateError::Build(format!(
                "debootstrap failed ({status}); its last lines:\n{}",
                tail.join("\n")
            )));
        }
        observer.step("tidying the root filesystem");
        tidy(&target)?;
        observer.step("computing the layer's digest");
        let summary = tree::tree_digest(&target).map_err(io_err("read", &target))?;
        let digest = summary.digest;
        let source = format!(
            "debootstrap --variant=minbase --include={} {} {}",
            options.include.join(","),
            options.suite,
            options.mirror
        );
        let info = LayerInfo {
            bytes: summary.bytes,
            entries: summary.entries,
            source: source.clone(),
            created: now(),
        };
        staging.commit(&layers, &digest, &info)?;
        self.install_layers(
            "debian",
            TemplateKind::Rootfs,
            source,
            ImageConfig {
                env: vec![
                    (
                        "PATH".into(),
                        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                    ),
                    ("LANG".into(), "C.UTF-8".into()),
                ],
                working_dir: Some("/workspace".into()),
                user: None,
                entrypoint: Vec::new(),
                cmd: vec!["/bin/bash".into()],
            },
            vec![digest],
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);
    impl Observer for Record {
        fn layer(&self, layer: &str, phase: &str, done: u64, total: u64) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{layer} {phase} {done}/{total}"));
        }
        fn step(&self, message: &str) {
            self.0.lock().unwrap().push(message.to_string());
        }
    }

    #[test]
    fn arguments_cache_and_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path().join("templates"));
        let cache = store.debian_cache();
        assert!(cache.starts_with(store.root()));
        let args = debootstrap_args(&DebianOptions::default(), &cache, Path::new("/t/fs"));
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            vec![
                "--debian-installer".to_string(),
                "--variant=minbase".into(),
                format!("--cache-dir={}", cache.display()),
                "--include=python3".into(),
                "bookworm".into(),
                "/t/fs".into(),
                "http://deb.debian.org/debian".into(),
            ]
        );
        let bare = DebianOptions {
            include: Vec::new(),
            suite: "trixie".into(),
            ..DebianOptions::default()
        };
        let args = debootstrap_args(&bare, &cache, Path::new("/t"));
        assert!(
            !args
                .iter()
                .any(|a| a.to_string_lossy().starts_with("--include"))
        );
        assert_eq!(args[3], OsString::from("trixie"));

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            eprintln!("skipping the rest: importing a rootfs needs root");
            return;
        }
        // A built template is reused without running debootstrap (this
        // store has none; a rootfs named debian stands in for one).
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/os-release"), "ID=debian\n").unwrap();
        store
            .import(
                "debian",
                &rootfs,
                &crate::ImportOptions::default(),
                &crate::Quiet,
            )
            .unwrap();
        let record = Record::default();
        let found = store
            .build_debian(
                &DebianOptions {
                    mirror: "http://127.0.0.1:9/unreachable".into(),
                    ..DebianOptions::default()
                },
                &record,
            )
            .unwrap();
        assert_eq!(
            found.meta.source,
            format!("rootfs directory {}", rootfs.display())
        );
        assert!(record.0.lock().unwrap()[0].contains("already built"));
    }

    #[test]
    fn progress_protocol_is_followed() {
        let channel = "P: 3 88 DOWNDEBS\nPF: Downloading packages\nI: RETRIEVING\nIA: libc6\nIF: Retrieving %s\n";
        let record = Record::default();
        follow_progress(channel.as_bytes(), &record);
        assert_eq!(
            *record.0.lock().unwrap(),
            vec!["debian Downloading packages 3/88", "Retrieving libc6"]
        );
    }
}
