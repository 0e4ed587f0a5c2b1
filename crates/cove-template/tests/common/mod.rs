//! Building real images for the tests: layer tars, OCI layouts, `docker
//! save` archives, and a local registry (Debian's `docker-registry`).
#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One tar entry of a test layer.
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    /// A file with extended attributes.
    FileX(&'a str, &'a [u8], &'a [(&'a str, &'a [u8])]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    /// A raw header name (the tar builder refuses `..` and absolute paths).
    Raw(&'a str, tar::EntryType, &'a [u8], Option<&'a str>),
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn set_raw_name(h: &mut tar::Header, name: &str, link: Option<&str>) {
    let raw = &mut h.as_old_mut().name;
    raw.fill(0);
    raw[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        let l = &mut h.as_old_mut().linkname;
        l.fill(0);
        l[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_cksum();
}

/// An uncompressed layer tar.
pub fn layer(entries: &[Entry<'_>]) -> Vec<u8> {
    layer_refs(&entries.iter().collect::<Vec<_>>())
}

fn layer_refs(entries: &[&Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::Dir(name) => {
                let mut h = header(tar::EntryType::Directory, 0, 0o755);
                b.append_data(&mut h, name, &[][..]).unwrap();
            }
            Entry::File(name, data, mode) => {
                let mut h = header(tar::EntryType::Regular, data.len() as u64, *mode);
                b.append_data(&mut h, name, *data).unwrap();
            }
            Entry::FileX(name, data, xattrs) => {
                let pax: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                    .collect();
                b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
                    .unwrap();
                let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
                b.append_data(&mut h, name, *data).unwrap();
            }
            Entry::Symlink(name, target) => {
                let mut h = header(tar::EntryType::Symlink, 0, 0o777);
                b.append_link(&mut h, name, target).unwrap();
            }
            Entry::HardLink(name, target) => {
                let mut h = header(tar::EntryType::Link, 0, 0o644);
                b.append_link(&mut h, name, target).unwrap();
            }
            Entry::Raw(name, kind, data, link) => {
                let mut h = header(*kind, data.len() as u64, 0o644);
                set_raw_name(&mut h, name, *link);
                b.append(&h, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A layer of a busybox root: /bin/busybox and applet links, /etc/passwd,
/// followed by `extra`.
pub fn busybox_layer(extra: &[Entry<'_>]) -> Vec<u8> {
    let busybox = fs::read(cove_template::BUSYBOX_PATH).expect("busybox-static is installed");
    let applets: Vec<String> = [
        "sh", "echo", "cat", "ls", "id", "pwd", "env", "stat", "sleep", "true", "touch", "rm",
        "mkdir",
    ]
    .iter()
    .map(|a| format!("bin/{a}"))
    .collect();
    let mut entries = vec![
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Dir("etc/"),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/home/app:/bin/sh\n",
            0o644,
        ),
        Entry::File("etc/group", b"root:x:0:\napp:x:1234:\n", 0o644),
        Entry::Dir("home/"),
        Entry::Dir("home/app/"),
    ];
    for applet in &applets {
        entries.push(Entry::Symlink(applet, "busybox"));
    }
    let mut out = Vec::new();
    for e in entries {
        out.push(e);
    }
    let mut all: Vec<&Entry<'_>> = out.iter().collect();
    all.extend(extra.iter());
    layer_refs(&all)
}

/// An image config with these diff IDs and run settings.
pub fn config(diff_ids: &[String], run: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// The run settings the test images carry.
pub fn run_settings() -> serde_json::Value {
    json!({
        "Env": ["PATH=/bin", "GREETING=hello from the image"],
        "WorkingDir": "/home/app",
        "User": "1234",
        "Entrypoint": ["/bin/echo", "entry:"],
        "Cmd": ["default", "args"],
    })
}

/// Write an OCI image layout with `layers` (uncompressed tars, base first),
/// each stored gzip-compressed. Returns the manifest digest.
pub fn oci_layout(dir: &Path, layers: &[Vec<u8>], run: serde_json::Value) -> String {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> String {
        let d = sha256(data);
        fs::write(blobs.join(&d[7..]), data).unwrap();
        d
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        diff_ids.push(sha256(l));
        let gz = gzip(l);
        let d = put(&gz);
        descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": gz.len(),
        }));
    }
    let cfg = config(&diff_ids, run);
    let cfg_digest = put(&cfg);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg.len()},
        "layers": descs,
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }],
        }))
        .unwrap(),
    )
    .unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest_digest
}

/// Write a `docker save` archive (layers uncompressed, as docker does).
pub fn docker_archive(path: &Path, layers: &[Vec<u8>], run: serde_json::Value) {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let cfg = config(&diff_ids, run);
    let cfg_name = format!("{}.json", &sha256(&cfg)[7..]);
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        add(&name, l);
        names.push(name);
    }
    add(&cfg_name, &cfg);
    let manifest = serde_json::to_vec(&json!([{
        "Config": cfg_name, "RepoTags": ["test/busybox:latest"], "Layers": names,
    }]))
    .unwrap();
    add("manifest.json", &manifest);
    b.finish().unwrap();
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's docker-registry, on loopback, storing in a temporary directory.
pub struct Registry {
    pub addr: String,
    pub storage: PathBuf,
    /// The one user the registry accepts (htpasswd), if it requires one.
    pub credentials: Option<(String, String)>,
    child: Child,
    _dir: tempfile::TempDir,
}

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

impl Registry {
    /// Start one, or `None` (with a note) when the binary is missing.
    pub fn start() -> Option<Registry> {
        Registry::start_with(None)
    }

    /// Start one that requires basic authentication as `user`/`password`.
    pub fn start_with_auth(user: &str, password: &str) -> Option<Registry> {
        Registry::start_with(Some((user.to_string(), password.to_string())))
    }

    fn start_with(credentials: Option<(String, String)>) -> Option<Registry> {
        if !Path::new(REGISTRY_BIN).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "docker-registry must be installed in CI (scripts/test.sh)"
            );
            eprintln!(
                "skipping: {REGISTRY_BIN} is not installed (apt-get install docker-registry)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((user, password)) = &credentials {
            let htpasswd = dir.path().join("htpasswd");
            let hash = bcrypt::hash(password, 4).unwrap();
            fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: cove-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        fs::write(&config, yaml).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let registry = Registry {
            addr,
            storage,
            credentials,
            child,
            _dir: dir,
        };
        // Wait until it answers the API's version check.
        for _ in 0..200 {
            if let Ok(mut s) = std::net::TcpStream::connect(&registry.addr) {
                use std::io::Read;
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return Some(registry);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not start on {}", registry.addr);
    }

    /// Push an image (layers are uncompressed tars, base first; pushed
    /// gzip-compressed) with oci-client. Returns the reference.
    pub async fn push(&self, repo: &str, layers: &[Vec<u8>], run: serde_json::Value) -> String {
        use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
        use oci_client::secrets::RegistryAuth;
        let reference = format!("{}/{repo}", self.addr);
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        });
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let image_layers: Vec<ImageLayer> = layers
            .iter()
            .map(|l| ImageLayer::oci_v1_gzip(gzip(l), None))
            .collect();
        let cfg = Config::oci_v1(config(&diff_ids, run), None);
        client
            .push(
                &reference.parse().unwrap(),
                &image_layers,
                cfg,
                &match &self.credentials {
                    Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
                    None => RegistryAuth::Anonymous,
                },
                None,
            )
            .await
            .unwrap();
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything under `dir`, relative, sorted (for "nothing left behind").
pub fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(base).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}
