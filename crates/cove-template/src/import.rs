//! `cove template import NAME SOURCE`: a template from an OCI image layout,
//! a `docker save` archive, or a plain root filesystem (directory or
//! tarball), detected from what SOURCE holds.
//!
//! Each layer is unpacked into a staging directory while its bytes are
//! hashed; only when the digests match what the image promises is it
//! renamed into the layer store. Nothing of a failed import stays behind.

use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::extract::{self, ExtractError};
use crate::image::{self, Files, ImageLayout, SourceKind};
use crate::layers::{Digest, LayerInfo, LayerStore};
use crate::tree::{self, CopyError, CopyRules};
use crate::{
    ImageConfig, Observer, Template, TemplateError, TemplateKind, TemplateStore, io_err, now,
};

/// Hashes and counts what passes through, reporting progress.
pub(crate) struct Metered<'a, R> {
    pub inner: R,
    pub hasher: &'a mut Sha256,
    pub bytes: &'a mut u64,
    pub progress: Option<(&'a dyn Observer, &'a str, u64)>,
    pub reported: u64,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        *self.bytes += n as u64;
        if let Some((observer, label, total)) = self.progress
            && (*self.bytes - self.reported >= 1 << 20 || n == 0)
        {
            self.reported = *self.bytes;
            observer.layer(label, "extract", *self.bytes, total);
        }
        Ok(n)
    }
}

/// Opens a layer's bytes: the reader and its size (0 when unknown).
pub(crate) type Opener<'a> = Box<dyn FnOnce() -> Result<(Box<dyn Read + Send>, u64), String> + 'a>;

/// One layer to unpack.
pub(crate) struct LayerSource<'a> {
    /// What progress bars call it.
    pub label: String,
    /// For error messages: which layer, where.
    pub what: String,
    pub open: Opener<'a>,
    /// The digest of the bytes as stored (compressed or not), if known.
    pub blob: Option<Digest>,
    pub size: Option<u64>,
    /// The digest of the uncompressed tar, if known (images); else computed.
    pub diff_id: Option<Digest>,
    /// Recorded in layer.json.
    pub source: String,
}

pub(crate) fn extract_error(what: &str, err: ExtractError) -> TemplateError {
    match err {
        ExtractError::Write { path, source } => TemplateError::Io {
            action: "write",
            path,
            source,
        },
        other => TemplateError::Image(format!("{what}: {other}")),
    }
}

pub(crate) fn copy_error(err: CopyError) -> TemplateError {
    match err {
        CopyError::Read { path, source } => TemplateError::Io {
            action: "read",
            path,
            source,
        },
        CopyError::Write { path, source } => TemplateError::Io {
            action: "write",
            path,
            source,
        },
        other => TemplateError::Build(other.to_string()),
    }
}

/// Unpack one layer into the store (or find it there). Returns its DiffID.
pub(crate) fn store_layer(
    layers: &LayerStore,
    src: LayerSource<'_>,
    observer: &dyn Observer,
) -> Result<Digest, TemplateError> {
    if let Some(diff_id) = &src.diff_id
        && layers.exists(diff_id)
    {
        observer.layer(&src.label, "exists", 1, 1);
        return Ok(diff_id.clone());
    }
    let staging = layers.stage()?;
    let fs_dir = staging.fs();
    let (reader, total) =
        (src.open)().map_err(|e| TemplateError::Image(format!("{}: {e}", src.what)))?;
    let mut raw_hash = Sha256::new();
    let mut raw_bytes = 0u64;
    let mut tar_hash = Sha256::new();
    let mut tar_bytes = 0u64;
    let stats = {
        let mut raw = Metered {
            inner: reader,
            hasher: &mut raw_hash,
            bytes: &mut raw_bytes,
            progress: Some((observer, &src.label, total)),
            reported: 0,
        };
        let corrupt = |e: io::Error| {
            TemplateError::Image(format!("{}: the stream is corrupt: {e}", src.what))
        };
        let stats = {
            let decompressed = image::decompress(&mut raw)
                .map_err(|e| TemplateError::Image(format!("{}: {e}", src.what)))?;
            let mut tar = Metered {
                inner: decompressed,
                hasher: &mut tar_hash,
                bytes: &mut tar_bytes,
                progress: None,
                reported: 0,
            };
            let stats =
                extract::extract(&mut tar, &fs_dir).map_err(|e| extract_error(&src.what, e))?;
            // The digests cover every byte, padding included.
            image::drain(&mut tar).map_err(corrupt)?;
            stats
        };
        image::drain(&mut raw).map_err(corrupt)?;
        stats
    };
    observer.layer(&src.label, "verify", raw_bytes, total);
    if let Some(size) = src.size
        && size != raw_bytes
    {
        return Err(TemplateError::Image(format!(
            "{} is {raw_bytes} bytes, but the manifest says {size}: the image is corrupt or truncated",
            src.what
        )));
    }
    if let Some(blob) = &src.blob {
        let actual = Digest::from_sha256(&raw_hash.finalize());
        if &actual != blob {
            return Err(TemplateError::Image(format!(
                "{} has digest {actual}, but the image says {blob}: the blob is corrupt or was tampered with",
                src.what
            )));
        }
    }
    let diff_id = Digest::from_sha256(&tar_hash.finalize());
    if let Some(expected) = &src.diff_id
        && &diff_id != expected
    {
        return Err(TemplateError::Image(format!(
            "{} unpacks to a tar with digest {diff_id}, but the image config says {expected}: \
             the layer is corrupt or was tampered with",
            src.what
        )));
    }
    let info = LayerInfo {
        bytes: stats.bytes,
        entries: stats.entries,
        source: src.source,
        created: now(),
    };
    staging.commit(layers, &diff_id, &info)?;
    observer.layer(&src.label, "done", total, total);
    Ok(diff_id)
}

/// Store a directory tree as a layer: copied, then named by its digest.
pub(crate) fn store_tree(
    layers: &LayerStore,
    dir: &Path,
    rules: CopyRules,
    label: &str,
    source: String,
    observer: &dyn Observer,
) -> Result<(Digest, LayerInfo), TemplateError> {
    let staging = layers.stage()?;
    let fs_dir = staging.fs();
    observer.layer(label, "copy", 0, 0);
    let stats = tree::copy_tree(dir, &fs_dir, rules).map_err(copy_error)?;
    observer.layer(label, "digest", stats.bytes, stats.bytes);
    let digest = tree::tree_digest(&fs_dir)
        .map_err(io_err("read", &fs_dir))?
        .digest;
    let info = LayerInfo {
        bytes: stats.bytes,
        entries: stats.entries,
        source,
        created: now(),
    };
    staging.commit(layers, &digest, &info)?;
    observer.layer(label, "done", stats.bytes, stats.bytes);
    Ok((digest, info))
}

/// Options of an import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Replace a template of the same name.
    pub replace: bool,
}

impl TemplateStore {
    /// Import `source` as template `name` (see the module doc). On
    /// failure, layers stored by this import that no template uses are
    /// removed again.
    pub fn import(
        &self,
        name: &str,
        source: &Path,
        options: &ImportOptions,
        observer: &dyn Observer,
    ) -> Result<Template, TemplateError> {
        let result = self.import_inner(name, source, options, observer);
        if result.is_err() {
            self.collect_garbage();
        }
        result
    }

    fn import_inner(
        &self,
        name: &str,
        source: &Path,
        options: &ImportOptions,
        observer: &dyn Observer,
    ) -> Result<Template, TemplateError> {
        self.check_new(name, options.replace)?;
        let shown = source.display().to_string();
        let bad = |e: String| TemplateError::Image(format!("cannot import {shown}: {e}"));
        let kind = image::detect(source).map_err(bad)?;
        observer.step(&format!("{shown} is {}", kind.describe()));
        let _busy = self.importing()?;
        let layers = self.layers();
        match kind {
            SourceKind::RootfsDir => {
                let (digest, _) = store_tree(
                    &layers,
                    source,
                    CopyRules {
                        overlay_upper: false,
                    },
                    "rootfs",
                    format!("rootfs directory {shown}"),
                    observer,
                )?;
                self.install_layers(
                    name,
                    TemplateKind::Rootfs,
                    format!("rootfs directory {shown}"),
                    rootfs_config(),
                    vec![digest],
                    options.replace,
                )
            }
            SourceKind::RootfsTar => {
                let path = source.to_path_buf();
                let digest = store_layer(
                    &layers,
                    LayerSource {
                        label: "rootfs".into(),
                        what: format!("the tarball {shown}"),
                        open: Box::new(move || {
                            let file = std::fs::File::open(&path)
                                .map_err(|e| format!("cannot open it: {e}"))?;
                            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                            Ok((Box::new(file) as Box<dyn Read + Send>, size))
                        }),
                        blob: None,
                        size: None,
                        diff_id: None,
                        source: format!("rootfs tarball {shown}"),
                    },
                    observer,
                )?;
                self.install_layers(
                    name,
                    TemplateKind::Rootfs,
                    format!("rootfs tarball {shown}"),
                    rootfs_config(),
                    vec![digest],
                    options.replace,
                )
            }
            SourceKind::OciLayoutDir
            | SourceKind::DockerArchiveDir
            | SourceKind::OciLayoutTar
            | SourceKind::DockerArchiveTar => {
                let files = match kind {
                    SourceKind::OciLayoutDir | SourceKind::DockerArchiveDir => {
                        Files::Dir(source.to_path_buf())
                    }
                    _ => Files::tar(source).map_err(bad)?,
                };
                let layout = match kind {
                    SourceKind::OciLayoutDir | SourceKind::OciLayoutTar => {
                        image::oci_layout(&files)
                    }
                    _ => image::docker_archive(&files),
                }
                .map_err(bad)?;
                self.import_layout(name, &shown, &files, layout, options, observer)
            }
        }
    }

    fn import_layout(
        &self,
        name: &str,
        shown: &str,
        files: &Files,
        layout: ImageLayout,
        options: &ImportOptions,
        observer: &dyn Observer,
    ) -> Result<Template, TemplateError> {
        let layers = self.layers();
        let count = layout.layers.len();
        let mut digests = Vec::with_capacity(count);
        for (i, layer) in layout.layers.iter().enumerate() {
            let member = layer.member.clone();
            let digest = store_layer(
                &layers,
                LayerSource {
                    label: layer.diff_id.short().to_string(),
                    what: format!("layer {} of {count} ({}) of {shown}", i + 1, layer.member),
                    open: Box::new(move || files.open(&member)),
                    blob: layer.blob.clone(),
                    size: layer.size,
                    diff_id: Some(layer.diff_id.clone()),
                    source: format!("{} {shown}", layout.format),
                },
                observer,
            )?;
            digests.push(digest);
        }
        // Images list their base layer first; overlay stacks topmost first.
        digests.reverse();
        self.install_layers(
            name,
            TemplateKind::Image,
            format!("{} {shown} ({})", layout.format, layout.id),
            layout.config.image_config(),
            digests,
            options.replace,
        )
    }
}

/// What a plain root filesystem runs with: nothing is known about it.
fn rootfs_config() -> ImageConfig {
    ImageConfig {
        env: vec![(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        )],
        working_dir: Some("/".into()),
        user: None,
        entrypoint: Vec::new(),
        cmd: vec!["/bin/sh".into()],
    }
}
