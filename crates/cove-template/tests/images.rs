#![allow(clippy::unwrap_used)]
//! Importing and pulling real images: OCI layouts and `docker save`
//! archives built here from busybox, plain root filesystems, a local
//! registry (Debian's docker-registry on 127.0.0.1), and the bad inputs
//! each must refuse without leaving anything behind.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Entry, Registry, listing, sha256};
use cove_template::{
    ImportOptions, PullOptions, Quiet, TemplateError, TemplateKind, TemplateStore,
};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Layers need root: files owned by other users, overlay xattrs.
macro_rules! need_root {
    () => {
        if !is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            eprintln!("skipping: needs root (to own files as the image says)");
            return;
        }
    };
}

/// A file capability, as `setcap cap_net_bind_service+ep` writes it
/// (`vfs_cap_data` revision 2, effective, bit 10 permitted).
const CAP_NET_BIND: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// Records every progress report of an import or pull.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(String, String, u64, u64)>>);

impl cove_template::Observer for Recorder {
    fn layer(&self, layer: &str, phase: &str, done: u64, total: u64) {
        self.0
            .lock()
            .unwrap()
            .push((layer.into(), phase.into(), done, total));
    }
}

impl Recorder {
    /// The layers reported, in order of first report.
    fn layers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (layer, ..) in self.0.lock().unwrap().iter() {
            if !out.contains(layer) {
                out.push(layer.clone());
            }
        }
        out
    }

    /// The phases reported for `layer`, in order, repeats folded.
    fn phases(&self, layer: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (l, phase, ..) in self.0.lock().unwrap().iter() {
            if l == layer && out.last() != Some(phase) {
                out.push(phase.clone());
            }
        }
        out
    }
}

/// The base layer: busybox, plus a hard link, an xattr, and files the
/// top layer deletes or hides.
fn base_layer() -> Vec<u8> {
    common::busybox_layer(&[
        Entry::Dir("data/"),
        Entry::FileX("data/tagged", b"tagged", &[("user.cove.test", b"kept")]),
        Entry::FileX(
            "data/capable",
            b"cap",
            &[("security.capability", CAP_NET_BIND)],
        ),
        Entry::File("data/original", b"linked twice", 0o644),
        Entry::HardLink("data/link", "data/original"),
        Entry::File("etc/motd", b"deleted above", 0o644),
        Entry::Dir("var/"),
        Entry::Dir("var/cache/"),
        Entry::File("var/cache/old", b"hidden above", 0o644),
    ])
}

/// The top layer: deletes etc/motd, makes var/cache opaque, adds a file.
fn top_layer() -> Vec<u8> {
    common::layer(&[
        Entry::Dir("etc/"),
        Entry::File("etc/.wh.motd", b"", 0o644),
        Entry::Dir("var/"),
        Entry::Dir("var/cache/"),
        Entry::File("var/cache/.wh..wh..opq", b"", 0o644),
        Entry::File("var/cache/new", b"from the top layer", 0o644),
    ])
}

fn store() -> (tempfile::TempDir, TemplateStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = TemplateStore::new(dir.path().join("templates"));
    (dir, store)
}

/// Check a template imported from base_layer + top_layer.
fn check_image(store: &TemplateStore, name: &str, base: &[u8], top: &[u8]) {
    let t = store.get(name).unwrap();
    assert_eq!(t.meta.kind, TemplateKind::Image);
    // Topmost first, named by DiffID.
    let ids: Vec<String> = t.meta.layers.iter().map(|d| d.to_string()).collect();
    assert_eq!(ids, vec![sha256(top), sha256(base)]);
    let c = &t.meta.config;
    assert!(
        c.env
            .contains(&("GREETING".into(), "hello from the image".into()))
    );
    assert_eq!(c.working_dir.as_deref(), Some("/home/app"));
    assert_eq!(c.user.as_deref(), Some("1234"));
    assert_eq!(c.entrypoint, vec!["/bin/echo", "entry:"]);
    assert_eq!(c.cmd, vec!["default", "args"]);

    let (top_fs, base_fs) = (&t.layers[0], &t.layers[1]);
    // Whiteout: a 0/0 character device; opaque: the overlay xattr.
    let motd = fs::symlink_metadata(top_fs.join("etc/motd")).unwrap();
    assert!(motd.file_type().is_char_device() && motd.rdev() == 0);
    assert_eq!(
        xattr::get(top_fs.join("var/cache"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        fs::read(top_fs.join("var/cache/new")).unwrap(),
        b"from the top layer"
    );
    // Hard links stay one inode; xattrs survive.
    let a = fs::metadata(base_fs.join("data/original")).unwrap();
    let b = fs::metadata(base_fs.join("data/link")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(
        xattr::get(base_fs.join("data/tagged"), "user.cove.test").unwrap(),
        Some(b"kept".to_vec())
    );
    assert_eq!(
        xattr::get(base_fs.join("data/capable"), "security.capability").unwrap(),
        Some(CAP_NET_BIND.to_vec()),
        "a file capability survives"
    );
    assert_eq!(
        fs::read_link(base_fs.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::metadata(base_fs.join("bin/busybox")).unwrap().mode() & 0o777,
        0o755
    );
}

#[test]
fn oci_layout_and_docker_archive_share_their_layers() {
    need_root!();
    let (dir, store) = store();
    let (base, top) = (base_layer(), top_layer());
    let layout = dir.path().join("layout");
    common::oci_layout(
        &layout,
        &[base.clone(), top.clone()],
        common::run_settings(),
    );
    let progress = Recorder::default();
    store
        .import("app", &layout, &ImportOptions::default(), &progress)
        .unwrap();
    check_image(&store, "app", &base, &top);
    assert_eq!(store.layers().all().len(), 2);
    // Progress per layer: each extracted, verified and done, its byte
    // count never going back, and done at its total.
    let layers = progress.layers();
    assert_eq!(layers.len(), 2, "{layers:?}");
    for layer in &layers {
        let phases = progress.phases(layer);
        assert!(
            phases.contains(&"extract".to_string()),
            "{layer}: {phases:?}"
        );
        assert_eq!(
            phases.last().map(String::as_str),
            Some("done"),
            "{layer}: {phases:?}"
        );
        let events = progress.0.lock().unwrap();
        let extract: Vec<u64> = events
            .iter()
            .filter(|(l, p, ..)| l == layer && p == "extract")
            .map(|e| e.2)
            .collect();
        assert!(extract.windows(2).all(|w| w[0] <= w[1]), "{extract:?}");
        let done = events.iter().rfind(|(l, ..)| l == layer).unwrap();
        assert!(done.2 > 0 && done.2 == done.3, "{done:?}");
    }

    // The same image as a docker archive: a second template, no new layer.
    let archive = dir.path().join("app.tar");
    common::docker_archive(
        &archive,
        &[base.clone(), top.clone()],
        common::run_settings(),
    );
    let progress = Recorder::default();
    store
        .import("app-docker", &archive, &ImportOptions::default(), &progress)
        .unwrap();
    check_image(&store, "app-docker", &base, &top);
    assert_eq!(store.layers().all().len(), 2);
    let layers = progress.layers();
    assert_eq!(layers.len(), 2, "{layers:?}");
    for layer in &layers {
        assert_eq!(
            progress.phases(layer),
            ["exists"],
            "{layer}: already stored"
        );
    }

    // An OCI layout packed in a tar works too.
    let packed = dir.path().join("layout.tar");
    let mut b = tar::Builder::new(fs::File::create(&packed).unwrap());
    b.append_dir_all(".", &layout).unwrap();
    b.finish().unwrap();
    drop(b);
    store
        .import("app-packed", &packed, &ImportOptions::default(), &Quiet)
        .unwrap();
    check_image(&store, "app-packed", &base, &top);

    // A name is not taken twice unless asked.
    let err = store
        .import("app", &layout, &ImportOptions::default(), &Quiet)
        .unwrap_err();
    assert!(matches!(err, TemplateError::Exists(_)), "{err}");
    store
        .import("app", &layout, &ImportOptions { replace: true }, &Quiet)
        .unwrap();

    // Removing one template keeps the layers the others use; removing
    // the last removes them.
    store.remove("app").unwrap();
    store.remove("app-docker").unwrap();
    assert_eq!(store.layers().all().len(), 2);
    store.remove("app-packed").unwrap();
    assert!(store.layers().all().is_empty());
}

#[test]
fn plain_root_filesystems_from_a_directory_and_a_tarball() {
    need_root!();
    let (dir, store) = store();
    let rootfs = dir.path().join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::copy(cove_template::BUSYBOX_PATH, rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    fs::write(rootfs.join("marker"), b"from a directory").unwrap();
    fs::hard_link(rootfs.join("marker"), rootfs.join("marker2")).unwrap();
    xattr::set(rootfs.join("marker"), "user.cove", b"x").unwrap();
    let t = store
        .import("dir", &rootfs, &ImportOptions::default(), &Quiet)
        .unwrap();
    assert_eq!(t.meta.kind, TemplateKind::Rootfs);
    assert_eq!(t.layers.len(), 1);
    let fs_dir = &t.layers[0];
    assert_eq!(
        fs::read(fs_dir.join("marker")).unwrap(),
        b"from a directory"
    );
    let (a, b) = (
        fs::metadata(fs_dir.join("marker")).unwrap(),
        fs::metadata(fs_dir.join("marker2")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(
        xattr::get(fs_dir.join("marker"), "user.cove").unwrap(),
        Some(b"x".to_vec())
    );
    // The microVM backend reads rootfs/ of single-layer templates.
    assert!(t.dir.join("rootfs/marker").is_file());

    // The same tree as a gzip tarball.
    let tarball = dir.path().join("rootfs.tar.gz");
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &rootfs).unwrap();
    fs::write(&tarball, common::gzip(&b.into_inner().unwrap())).unwrap();
    let t = store
        .import("tarball", &tarball, &ImportOptions::default(), &Quiet)
        .unwrap();
    assert_eq!(
        fs::read(t.layers[0].join("marker")).unwrap(),
        b"from a directory"
    );
    assert_eq!(t.meta.config.cmd, vec!["/bin/sh"]);
}

/// An import that must fail: the error names `culprit`, and the store
/// holds no template, layer or staging directory afterwards.
fn refused(store: &TemplateStore, source: &Path, culprit: &str) -> String {
    let before = listing(store.root());
    let err = store
        .import("bad", source, &ImportOptions::default(), &Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(culprit),
        "error {err:?} does not name {culprit:?}"
    );
    assert!(store.get("bad").is_err());
    let after: Vec<String> = listing(store.root())
        .into_iter()
        .filter(|p| !p.ends_with(".lock") && p != "layers" && p != "layers/sha256")
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|p| !p.ends_with(".lock") && p != "layers" && p != "layers/sha256")
        .collect();
    assert_eq!(after, before, "the failed import left files behind ({err})");
    err
}

#[test]
fn corrupt_truncated_and_mismatched_images_are_refused() {
    need_root!();
    let (dir, store) = store();
    let (base, top) = (base_layer(), top_layer());

    // A layer blob whose bytes do not match its digest.
    let layout = dir.path().join("corrupt");
    common::oci_layout(
        &layout,
        &[base.clone(), top.clone()],
        common::run_settings(),
    );
    let blobs = layout.join("blobs/sha256");
    let top_blob = common::gzip(&top);
    let top_path = blobs.join(&sha256(&top_blob)[7..]);
    let mut bytes = fs::read(&top_path).unwrap();
    let n = bytes.len();
    bytes[n - 9] ^= 0xff; // the gzip trailer: a CRC error or a digest mismatch
    fs::write(&top_path, &bytes).unwrap();
    let err = refused(&store, &layout, "layer 2 of 2");
    assert!(err.contains("corrupt") || err.contains("digest"), "{err}");

    // A config whose DiffID does not match the layer.
    let layout = dir.path().join("diffid");
    common::oci_layout(&layout, std::slice::from_ref(&top), common::run_settings());
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(layout.join("blobs/sha256").join(&manifest_digest[7..])).unwrap(),
    )
    .unwrap();
    let cfg_digest = manifest["config"]["digest"].as_str().unwrap();
    // Rewrite the config with a wrong DiffID, then the manifest and index.
    let wrong = common::config(&[sha256(b"not the layer")], common::run_settings());
    let blobs = layout.join("blobs/sha256");
    fs::remove_file(blobs.join(&cfg_digest[7..])).unwrap();
    fs::write(blobs.join(&sha256(&wrong)[7..]), &wrong).unwrap();
    let mut manifest = manifest.clone();
    manifest["config"]["digest"] = sha256(&wrong).into();
    manifest["config"]["size"] = wrong.len().into();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    fs::write(blobs.join(&sha256(&manifest_bytes)[7..]), &manifest_bytes).unwrap();
    let mut index = index.clone();
    index["manifests"][0]["digest"] = sha256(&manifest_bytes).into();
    index["manifests"][0]["size"] = manifest_bytes.len().into();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let err = refused(&store, &layout, &sha256(b"not the layer"));
    assert!(err.contains("layer 1 of 1"), "{err}");

    // A docker archive cut in half.
    let archive = dir.path().join("whole.tar");
    common::docker_archive(
        &archive,
        &[base.clone(), top.clone()],
        common::run_settings(),
    );
    let whole = fs::read(&archive).unwrap();
    let cut = dir.path().join("truncated.tar");
    fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    refused(&store, &cut, "truncated.tar");

    // A rootfs tarball that stops in the middle of a file.
    let tarball = dir.path().join("short.tar");
    fs::write(&tarball, &base[..base.len() / 3]).unwrap();
    let err = refused(&store, &tarball, "short.tar");
    assert!(err.contains("truncated"), "{err}");

    // Garbage.
    let junk = dir.path().join("junk.bin");
    fs::write(&junk, vec![0x5a; 4096]).unwrap();
    refused(&store, &junk, "junk.bin");
    refused(&store, &dir.path().join("missing"), "missing");
}

#[test]
fn tar_entries_that_escape_are_refused() {
    need_root!();
    let (dir, store) = store();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            common::layer(&[Entry::Raw(
                "../../evil",
                tar::EntryType::Regular,
                b"x",
                None,
            )]),
            "../../evil",
        ),
        (
            "absolute",
            common::layer(&[Entry::Raw("/etc/evil", tar::EntryType::Regular, b"x", None)]),
            "/etc/evil",
        ),
        (
            "through-symlink",
            common::layer(&[
                Entry::Symlink("link", outside.to_str().unwrap()),
                Entry::Raw("link/evil", tar::EntryType::Regular, b"x", None),
            ]),
            "link/evil",
        ),
        (
            "hardlink-out",
            common::layer(&[Entry::Raw(
                "hard",
                tar::EntryType::Link,
                b"",
                Some("../../../etc/passwd"),
            )]),
            "hard",
        ),
    ];
    for (name, tar, culprit) in cases {
        // As a rootfs tarball…
        let tarball = dir.path().join(format!("{name}.tar"));
        fs::write(&tarball, &tar).unwrap();
        refused(&store, &tarball, culprit);
        // …and as a layer of an image.
        let layout = dir.path().join(format!("{name}-layout"));
        common::oci_layout(&layout, &[tar], common::run_settings());
        refused(&store, &layout, culprit);
    }
    assert!(
        listing(&outside).is_empty(),
        "something was written outside"
    );
    assert!(!dir.path().join("evil").exists());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn local(name: &str) -> PullOptions {
    PullOptions {
        name: Some(name.into()),
        plain_http: true,
        timeout: Duration::from_secs(20),
        ..PullOptions::default()
    }
}

#[test]
fn pull_from_a_local_registry() {
    need_root!();
    let Some(registry) = Registry::start() else {
        return;
    };
    let rt = runtime();
    let (base, top) = (base_layer(), top_layer());
    let reference = rt.block_on(registry.push(
        "test/app:v1",
        &[base.clone(), top.clone()],
        common::run_settings(),
    ));
    let (dir, store) = store();

    // TLS is on unless turned off: a plain-HTTP registry refuses a TLS client.
    let err = rt
        .block_on(store.pull(
            &reference,
            &PullOptions {
                plain_http: false,
                ..local("tls")
            },
            Arc::new(Quiet),
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&registry.addr), "{err}");
    assert!(store.get("tls").is_err());

    let t = rt
        .block_on(store.pull(&reference, &local("app"), Arc::new(Quiet)))
        .unwrap();
    assert!(t.meta.source.contains(&reference), "{}", t.meta.source);
    check_image(&store, "app", &base, &top);

    // The same layers from a file: stored once.
    let layout = dir.path().join("layout");
    common::oci_layout(
        &layout,
        &[base.clone(), top.clone()],
        common::run_settings(),
    );
    store
        .import("from-file", &layout, &ImportOptions::default(), &Quiet)
        .unwrap();
    assert_eq!(store.layers().all().len(), 2);

    // The default name comes from the reference.
    let t = rt
        .block_on(store.pull(
            &reference,
            &PullOptions {
                name: None,
                ..local("")
            },
            Arc::new(Quiet),
        ))
        .unwrap();
    assert_eq!(t.name(), "app-v1");

    // An unknown tag names the reference.
    let err = rt
        .block_on(store.pull(
            &format!("{}/test/app:nope", registry.addr),
            &local("nope"),
            Arc::new(Quiet),
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn pull_from_a_registry_that_requires_a_login() {
    need_root!();
    let Some(registry) = Registry::start_with_auth("cove", "s3cret pass") else {
        return;
    };
    let rt = runtime();
    let (base, top) = (base_layer(), top_layer());
    let reference = rt.block_on(registry.push(
        "private/app:v1",
        &[base.clone(), top.clone()],
        common::run_settings(),
    ));
    let (dir, store) = store();
    let as_user = |name: &str, user: Option<&str>, password: Option<&str>| PullOptions {
        username: user.map(String::from),
        password: password.map(String::from),
        ..local(name)
    };

    // Anonymous: refused, with a hint about credentials.
    let err = rt
        .block_on(store.pull(&reference, &as_user("anon", None, None), Arc::new(Quiet)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--username"), "{err}");
    // A wrong password: refused too.
    let err = rt
        .block_on(store.pull(
            &reference,
            &as_user("wrong", Some("cove"), Some("nope")),
            Arc::new(Quiet),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("401")
            || err.to_lowercase().contains("unauthorized")
            || err.contains("--username"),
        "{err}"
    );
    // Nothing half-imported from the refusals.
    assert!(store.get("anon").is_err() && store.get("wrong").is_err());
    assert!(store.layers().all().is_empty());

    // The right credentials.
    rt.block_on(store.pull(
        &reference,
        &as_user("app", Some("cove"), Some("s3cret pass")),
        Arc::new(Quiet),
    ))
    .unwrap();
    check_image(&store, "app", &base, &top);
    drop(dir);
}

#[test]
fn a_registry_blob_that_does_not_match_its_digest_is_refused() {
    need_root!();
    let Some(registry) = Registry::start() else {
        return;
    };
    let rt = runtime();
    let top = top_layer();
    let reference = rt.block_on(registry.push(
        "test/bad:v1",
        std::slice::from_ref(&top),
        common::run_settings(),
    ));
    // Corrupt the stored blob behind the registry's back.
    let blob = common::gzip(&top);
    let digest = sha256(&blob);
    let hex = &digest[7..];
    let data = registry
        .storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = fs::read(&data).unwrap();
    bytes[20] ^= 0xff;
    fs::write(&data, &bytes).unwrap();

    let (_dir, store) = store();
    let before = listing(store.root());
    let err = rt
        .block_on(store.pull(&reference, &local("bad"), Arc::new(Quiet)))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TemplateError::Image(_)), "{text}");
    assert!(
        text.contains(&digest) && text.contains("layer 1 of 1"),
        "{text}"
    );
    assert!(store.get("bad").is_err());
    let after: Vec<String> = listing(store.root())
        .into_iter()
        .filter(|p| !p.ends_with(".lock") && p != "layers" && p != "layers/sha256")
        .collect();
    let before: Vec<String> = before
        .into_iter()
        .filter(|p| !p.ends_with(".lock") && p != "layers" && p != "layers/sha256")
        .collect();
    assert_eq!(after, before);
}

#[test]
fn a_registry_that_hangs_is_a_timeout() {
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in listener.incoming().take(8) {
            conns.push(c);
        }
    });
    let (_dir, store) = store();
    let err = runtime()
        .block_on(store.pull(
            &format!("{addr}/test/app:v1"),
            &PullOptions {
                timeout: Duration::from_secs(1),
                ..local("hang")
            },
            Arc::new(Quiet),
        ))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TemplateError::RegistryTimeout(_)), "{text}");
    assert!(text.contains(&addr), "{text}");
    assert!(store.get("hang").is_err());
    drop(held);
}
