//! Reading container images from files: an OCI image layout (a directory,
//! or a tar of one) and a `docker save` archive (a tar, or a directory it
//! was unpacked into). Only what cove needs is parsed: the manifest's
//! layers, the config's DiffIDs and its Env, WorkingDir, User, Entrypoint
//! and Cmd.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::ImageConfig;
use crate::extract::clean_path;
use crate::layers::Digest;

/// An OCI content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

/// An image index (`index.json`, a manifest list).
#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config file cove reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// One entry of a `docker save` manifest.json.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

impl ConfigFile {
    /// The run settings as a template keeps them.
    pub fn image_config(&self) -> ImageConfig {
        let run = self.config.clone().unwrap_or_default();
        ImageConfig {
            env: run
                .env
                .unwrap_or_default()
                .into_iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv, String::new()),
                })
                .collect(),
            // Docker's default: the root directory.
            working_dir: Some(
                run.working_dir
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| "/".into()),
            ),
            user: run.user.filter(|u| !u.is_empty()),
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
        }
    }

    pub fn diff_ids(&self) -> Result<Vec<Digest>, String> {
        if !self.architecture.is_empty() && self.architecture != host_arch() {
            return Err(format!(
                "the image is built for {}, but this host runs {}",
                self.architecture,
                host_arch()
            ));
        }
        self.rootfs
            .diff_ids
            .iter()
            .map(|d| {
                Digest::parse(d).ok_or_else(|| format!("the image config has a bad DiffID {d:?}"))
            })
            .collect()
    }
}

/// The files of an image, in a directory or inside a tar archive.
#[derive(Debug)]
pub enum Files {
    Dir(PathBuf),
    /// An uncompressed tar: where each member's data is.
    Tar {
        path: PathBuf,
        members: HashMap<PathBuf, (u64, u64)>,
    },
}

impl Files {
    /// Index the members of an uncompressed tar archive (headers only).
    pub fn tar(path: &Path) -> Result<Files, String> {
        let file = fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut members = HashMap::new();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| format!("not a tar archive: {e}"))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("the archive is corrupt: {e}"))?;
            if entry.header().entry_type().is_file()
                && let Ok(Some(name)) = clean_path(&entry.path_bytes())
            {
                members.insert(name, (entry.raw_file_position(), entry.size()));
            }
        }
        Ok(Files::Tar {
            path: path.to_path_buf(),
            members,
        })
    }

    /// Open a member; its size too.
    pub fn open(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64), String> {
        let rel = match clean_path(name.as_bytes()) {
            Ok(Some(rel)) => rel,
            _ => return Err(format!("{name:?} is not a relative path inside the image")),
        };
        match self {
            Files::Dir(dir) => {
                let path = dir.join(&rel);
                let file = fs::File::open(&path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                Ok((Box::new(file), size))
            }
            Files::Tar { path, members } => {
                let (offset, size) = *members
                    .get(&rel)
                    .ok_or_else(|| format!("the archive has no {name}"))?;
                let mut file = fs::File::open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Ok((Box::new(file.take(size)), size))
            }
        }
    }

    /// Read a small member whole (at most 16 MiB).
    pub fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        let (reader, size) = self.open(name)?;
        if size > 16 << 20 {
            return Err(format!("{name} is {size} bytes; that is not a manifest"));
        }
        let mut data = Vec::with_capacity(size as usize);
        reader
            .take(16 << 20)
            .read_to_end(&mut data)
            .map_err(|e| format!("cannot read {name}: {e}"))?;
        Ok(data)
    }
}

/// How the layers of one image are laid out in its files.
#[derive(Debug)]
pub struct ImageLayout {
    /// "oci-layout" or "docker-archive".
    pub format: &'static str,
    pub config: ConfigFile,
    /// Each layer: the member holding it, and the blob digest when the
    /// format names one (OCI); DiffIDs come from the config.
    pub layers: Vec<LayerRef>,
    /// The manifest digest or image ID, for people.
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct LayerRef {
    pub member: String,
    pub blob: Option<Digest>,
    pub size: Option<u64>,
    pub diff_id: Digest,
}

fn blob_path(digest: &str) -> Result<(Digest, String), String> {
    let d = Digest::parse(digest)
        .ok_or_else(|| format!("descriptor digest {digest:?} is not a sha256 digest"))?;
    let path = format!("blobs/sha256/{}", d.hex());
    Ok((d, path))
}

fn verified(files: &Files, desc: &Descriptor, what: &str) -> Result<Vec<u8>, String> {
    let (digest, path) = blob_path(&desc.digest)?;
    let data = files.read(&path)?;
    let actual = Digest::from_sha256(&Sha256::digest(&data));
    if actual != digest {
        return Err(format!(
            "the {what} {path} has digest {actual}, not {digest}: the image is corrupt"
        ));
    }
    Ok(data)
}

/// The host's architecture in OCI's words.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn choose_manifest(files: &Files, index: &Index, depth: u32) -> Result<Manifest, String> {
    if depth > 4 {
        return Err("image indexes nest too deeply".into());
    }
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| {
            d.platform.as_ref().is_none_or(|p| {
                (p.os.is_empty() || p.os == "linux")
                    && (p.architecture.is_empty() || p.architecture == host_arch())
            })
        })
        .collect();
    let Some(chosen) = candidates.first() else {
        return Err(format!(
            "the image has no manifest for linux/{}",
            host_arch()
        ));
    };
    if candidates.len() > 1 && index.manifests.iter().all(|d| d.platform.is_none()) {
        let names: Vec<String> = candidates
            .iter()
            .map(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .cloned()
                    .unwrap_or_else(|| d.digest.clone())
            })
            .collect();
        return Err(format!(
            "the layout holds {} images ({}); cove imports a layout with one",
            names.len(),
            names.join(", ")
        ));
    }
    let data = verified(files, chosen, "manifest")?;
    if chosen.media_type.contains("index") || chosen.media_type.contains("manifest.list") {
        let nested: Index =
            serde_json::from_slice(&data).map_err(|e| format!("bad image index: {e}"))?;
        return choose_manifest(files, &nested, depth + 1);
    }
    serde_json::from_slice(&data).map_err(|e| format!("bad image manifest {}: {e}", chosen.digest))
}

/// Read an OCI image layout.
pub fn oci_layout(files: &Files) -> Result<ImageLayout, String> {
    let index: Index = serde_json::from_slice(&files.read("index.json")?)
        .map_err(|e| format!("bad index.json: {e}"))?;
    let manifest = choose_manifest(files, &index, 0)?;
    let config: ConfigFile = serde_json::from_slice(&verified(files, &manifest.config, "config")?)
        .map_err(|e| format!("bad image config: {e}"))?;
    let diff_ids = config.diff_ids()?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(format!(
            "the manifest lists {} layers but the config {} DiffIDs",
            manifest.layers.len(),
            diff_ids.len()
        ));
    }
    let layers = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(desc, diff_id)| {
            let (blob, member) = blob_path(&desc.digest)?;
            Ok(LayerRef {
                member,
                blob: Some(blob),
                size: Some(desc.size),
                diff_id,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(ImageLayout {
        format: "oci-layout",
        config,
        layers,
        id: manifest.config.digest.clone(),
    })
}

/// Read a `docker save` archive.
pub fn docker_archive(files: &Files) -> Result<ImageLayout, String> {
    let entries: Vec<DockerEntry> = serde_json::from_slice(&files.read("manifest.json")?)
        .map_err(|e| format!("bad manifest.json: {e}"))?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => return Err("manifest.json lists no image".into()),
        many => {
            let tags: Vec<String> = many
                .iter()
                .map(|e| {
                    e.repo_tags
                        .as_ref()
                        .and_then(|t| t.first().cloned())
                        .unwrap_or_else(|| e.config.clone())
                })
                .collect();
            return Err(format!(
                "the archive holds {} images ({}); save one image per archive",
                many.len(),
                tags.join(", ")
            ));
        }
    };
    let data = files.read(&entry.config)?;
    let config: ConfigFile =
        serde_json::from_slice(&data).map_err(|e| format!("bad image config: {e}"))?;
    let diff_ids = config.diff_ids()?;
    if diff_ids.len() != entry.layers.len() {
        return Err(format!(
            "manifest.json lists {} layers but the config {} DiffIDs",
            entry.layers.len(),
            diff_ids.len()
        ));
    }
    // Newer Docker versions store blobs by digest; older ones as <id>/layer.tar.
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(member, diff_id)| LayerRef {
            blob: member
                .strip_prefix("blobs/sha256/")
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}"))),
            member: member.clone(),
            size: None,
            diff_id,
        })
        .collect();
    Ok(ImageLayout {
        format: "docker-archive",
        id: Digest::from_sha256(&Sha256::digest(&data)).to_string(),
        config,
        layers,
    })
}

/// What a path holds, judged by its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    OciLayoutDir,
    DockerArchiveDir,
    RootfsDir,
    /// An uncompressed tar of an OCI layout.
    OciLayoutTar,
    DockerArchiveTar,
    /// A tar (possibly compressed) of a root filesystem.
    RootfsTar,
}

impl SourceKind {
    pub fn describe(self) -> &'static str {
        match self {
            SourceKind::OciLayoutDir => "an OCI image layout",
            SourceKind::DockerArchiveDir => "an unpacked docker save archive",
            SourceKind::RootfsDir => "a root filesystem directory",
            SourceKind::OciLayoutTar => "an OCI image layout archive",
            SourceKind::DockerArchiveTar => "a docker save archive",
            SourceKind::RootfsTar => "a root filesystem tarball",
        }
    }
}

/// Compression of a stream, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn sniff(head: &[u8]) -> Result<Compression, String> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Compression::Zstd)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Err("it is xz-compressed, which cove does not read; decompress it first (xz -d)".into())
    } else if head.starts_with(b"BZh") {
        Err(
            "it is bzip2-compressed, which cove does not read; decompress it first (bunzip2)"
                .into(),
        )
    } else {
        Ok(Compression::None)
    }
}

/// A reader that undoes the compression it finds.
pub fn decompress<'a>(input: impl Read + Send + 'a) -> Result<Box<dyn Read + Send + 'a>, String> {
    let mut buffered = BufReader::with_capacity(256 << 10, input);
    let head = buffered
        .fill_buf()
        .map_err(|e| format!("cannot read it: {e}"))?
        .to_vec();
    Ok(match sniff(&head)? {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(buffered)
                .map_err(|e| format!("bad zstd stream: {e}"))?,
        ),
    })
}

/// Decide what `path` is.
pub fn detect(path: &Path) -> Result<SourceKind, String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    if meta.is_dir() {
        return Ok(
            if path.join("oci-layout").is_file() && path.join("index.json").is_file() {
                SourceKind::OciLayoutDir
            } else if path.join("manifest.json").is_file() {
                SourceKind::DockerArchiveDir
            } else {
                SourceKind::RootfsDir
            },
        );
    }
    if !meta.is_file() {
        return Err("it is neither a directory nor a file".into());
    }
    let mut head = [0u8; 8];
    let n = fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if sniff(&head[..n])? != Compression::None {
        return Ok(SourceKind::RootfsTar);
    }
    // An uncompressed tar: the top-level names tell an image from a rootfs.
    let file = fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let (mut oci, mut docker) = (false, false);
    for entry in archive
        .entries_with_seek()
        .map_err(|e| format!("it is not a tar archive: {e}"))?
    {
        let entry = entry.map_err(|e| format!("it is not a readable tar archive: {e}"))?;
        match clean_path(&entry.path_bytes()) {
            Ok(Some(p)) if p == Path::new("oci-layout") => oci = true,
            Ok(Some(p)) if p == Path::new("manifest.json") => docker = true,
            _ => {}
        }
    }
    Ok(if docker {
        SourceKind::DockerArchiveTar
    } else if oci {
        SourceKind::OciLayoutTar
    } else {
        SourceKind::RootfsTar
    })
}

/// Read until the end, for digests that must cover every byte.
pub fn drain(mut reader: impl Read) -> io::Result<u64> {
    io::copy(&mut reader, &mut io::sink())
}
