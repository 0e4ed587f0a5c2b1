//! The layer store: every filesystem layer once, named by its digest, and
//! shared by every template (and snapshot) that uses it.
//!
//! ```text
//!  <templates>/layers/
//!    sha256/<hex>/fs/          the layer's files, ready to be an overlay lower directory:
//!                              deletions are 0/0 character devices, opaque directories
//!                              carry trusted.overlay.opaque=y
//!    sha256/<hex>/layer.json   its size and where it came from
//!    .staging-<pid>-<n>/       a layer being written; renamed into place when complete
//! ```
//!
//! A layer directory appears by one `rename` once it is complete and
//! verified, so a crash or an error never leaves half a layer where a
//! template could use it; [`Staging`] removes its directory when dropped
//! without being committed.
//!
//! Image layers are named by their DiffID (the SHA-256 of the uncompressed
//! tar), so the same layer pulled from a registry, read from a `docker
//! save` archive or from an OCI layout is stored once. Layers made from a
//! directory (a plain rootfs, a built template, a snapshot) are named by
//! the SHA-256 of a canonical listing of their tree (see `tree.rs`).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::{TemplateError, io_err, now};

/// A `sha256:<64 hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Parse `sha256:<64 lowercase hex>`; anything else is refused (the
    /// hex becomes a directory name).
    pub fn parse(s: &str) -> Option<Digest> {
        let hex = s.strip_prefix("sha256:")?;
        (hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Digest(s.to_string()))
    }

    pub fn from_sha256(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(bytes)))
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The first 12 hex digits, for people.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Digest, String> {
        Digest::parse(&s).ok_or_else(|| format!("{s:?} is not a sha256 digest"))
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

/// What `layer.json` says about a layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Bytes of file content (hard links counted once).
    pub bytes: u64,
    /// Entries (files, directories, links, whiteouts).
    pub entries: u64,
    /// Where the layer came from.
    pub source: String,
    /// Unix seconds.
    pub created: u64,
}

/// The layers under `<templates>/layers`.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
}

/// A layer being written. Dropped without [`Staging::commit`], it removes
/// what was written.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    /// Where the layer's files go.
    pub fn fs(&self) -> PathBuf {
        self.dir.join("fs")
    }

    /// A scratch file next to the layer (a downloaded blob), removed with it.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Move the finished layer into place as `digest`. When another import
    /// stored the same layer meanwhile, this copy is dropped: same digest,
    /// same content.
    pub fn commit(
        mut self,
        store: &LayerStore,
        digest: &Digest,
        info: &LayerInfo,
    ) -> Result<(), TemplateError> {
        // Scratch files (downloaded blobs) are not part of the layer.
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry.file_name() != "fs" {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        let meta = self.dir.join("layer.json");
        let json =
            serde_json::to_vec_pretty(info).map_err(|e| TemplateError::Build(e.to_string()))?;
        fs::write(&meta, json).map_err(io_err("write", &meta))?;
        let target = store.dir(digest);
        if target.is_dir() {
            return Ok(()); // Drop removes our copy.
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        match fs::rename(&self.dir, &target) {
            Ok(()) => {
                self.committed = true;
                Ok(())
            }
            // Lost a race with an identical layer: fine.
            Err(_) if target.is_dir() => Ok(()),
            Err(e) => Err(io_err("store the layer in", &target)(e)),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl LayerStore {
    pub fn new(root: impl Into<PathBuf>) -> LayerStore {
        LayerStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of layer `digest` (holding `fs/` and `layer.json`).
    pub fn dir(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// The layer's files: what an overlay stacks.
    pub fn fs(&self, digest: &Digest) -> PathBuf {
        self.dir(digest).join("fs")
    }

    pub fn exists(&self, digest: &Digest) -> bool {
        self.fs(digest).is_dir()
    }

    pub fn info(&self, digest: &Digest) -> Option<LayerInfo> {
        serde_json::from_slice(&fs::read(self.dir(digest).join("layer.json")).ok()?).ok()
    }

    /// A fresh staging directory with an empty `fs/`.
    pub fn stage(&self) -> Result<Staging, TemplateError> {
        static N: AtomicU64 = AtomicU64::new(0);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_err("create", &self.root))?;
        let dir = self.root.join(format!(
            ".staging-{}-{}-{}",
            std::process::id(),
            now(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        let staging = Staging {
            dir,
            committed: false,
        };
        let fs_dir = staging.fs();
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&fs_dir)
            .map_err(io_err("create", &fs_dir))?;
        Ok(staging)
    }

    /// Every stored layer.
    pub fn all(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = fs::read_dir(self.root.join("sha256"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|hex| Digest::parse(&format!("sha256:{hex}")))
            .collect();
        out.sort();
        out
    }

    /// Remove the layers nobody references and no running sandbox holds
    /// (sandboxes hold a shared lock on each of their layers' directories).
    /// Also removes staging directories of processes that are gone.
    /// Returns the removed digests.
    pub fn collect_garbage(&self, referenced: &HashSet<Digest>) -> Vec<Digest> {
        let mut removed = Vec::new();
        for digest in self.all() {
            if referenced.contains(&digest) {
                continue;
            }
            let dir = self.dir(&digest);
            let Ok(handle) = fs::File::open(&dir) else {
                continue;
            };
            if handle.try_lock().is_err() {
                continue; // A sandbox still stands on it.
            }
            let trash = self
                .root
                .join(format!(".trash-{}-{}", digest.hex(), std::process::id()));
            if fs::rename(&dir, &trash).is_ok() {
                let _ = fs::remove_dir_all(&trash);
                removed.push(digest);
            }
        }
        for entry in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(".staging-")
                .or_else(|| {
                    name.strip_prefix(".trash-")
                        .and_then(|r| r.split('-').nth(1))
                })
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid
                && pid != std::process::id() as i32
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked() {
        let hex = "a".repeat(64);
        let d = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(d.hex(), hex);
        assert_eq!(d.short(), "aaaaaaaaaaaa");
        assert!(Digest::parse(&format!("sha512:{hex}")).is_none());
        assert!(Digest::parse("sha256:../../etc").is_none());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_none());
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:x\"").is_err());
    }

    #[test]
    fn staging_is_removed_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::new(dir.path().join("layers"));
        let staging = store.stage().unwrap();
        let path = staging.fs();
        fs::write(path.join("f"), b"x").unwrap();
        drop(staging);
        assert!(!path.exists());

        let staging = store.stage().unwrap();
        fs::write(staging.fs().join("f"), b"x").unwrap();
        fs::write(staging.scratch("blob"), b"compressed").unwrap();
        let digest = Digest::from_sha256(&[7; 32]);
        staging
            .commit(&store, &digest, &LayerInfo::default())
            .unwrap();
        assert!(store.exists(&digest));
        assert_eq!(fs::read(store.fs(&digest).join("f")).unwrap(), b"x");
        assert!(!store.dir(&digest).join("blob").exists());
        // The same layer again is dropped, not an error.
        let again = store.stage().unwrap();
        let again_dir = again.fs();
        again
            .commit(&store, &digest, &LayerInfo::default())
            .unwrap();
        assert!(!again_dir.exists());

        // Garbage collection spares referenced and locked layers.
        let other = Digest::from_sha256(&[8; 32]);
        store
            .stage()
            .unwrap()
            .commit(&store, &other, &LayerInfo::default())
            .unwrap();
        let held = fs::File::open(store.dir(&other)).unwrap();
        held.lock_shared().unwrap();
        let referenced: HashSet<Digest> = [digest.clone()].into();
        assert!(store.collect_garbage(&referenced).is_empty());
        drop(held);
        assert_eq!(store.collect_garbage(&referenced), vec![other.clone()]);
        assert!(store.exists(&digest) && !store.exists(&other));
    }
}
