//! Snapshots: a sandbox's filesystem as a new template.
//!
//! A sandbox's root is its template's layers under one writable overlay
//! upper directory. A snapshot copies that upper directory — whiteouts
//! and opaque markers included, so deletions stay deleted — into a new
//! layer, and makes a template of it stacked on the source's layers,
//! which are shared, not copied. Creating a sandbox from the snapshot is
//! then as fast as from any template: one more lower directory.
//!
//! A microVM's upper directory lives in guest memory: its agent sends it
//! as an image layer (`.wh.` markers for whiteouts and opaque
//! directories), which [`TemplateStore::stage_snapshot_layer`] unpacks
//! into the same staging layer, overlayfs' markers restored.
//!
//! The copy is split in two so the caller can freeze the sandbox for the
//! copy only: [`TemplateStore::stage_snapshot`] copies (nothing else),
//! [`TemplateStore::finish_snapshot`] digests, stores and names it while
//! the sandbox runs again.

use std::fs;
use std::path::Path;

use crate::extract;
use crate::import::{copy_error, extract_error};
use crate::layers::{Digest, LayerInfo, Staging};
use crate::tree::{self, CopyRules, CopyStats};
use crate::{ImageConfig, Template, TemplateError, TemplateKind, TemplateStore, io_err, now};

/// A copied writable layer, not yet a template.
#[derive(Debug)]
pub struct StagedSnapshot {
    staging: Staging,
    pub stats: CopyStats,
    _busy: fs::File,
}

/// Where a snapshot's template comes from.
#[derive(Debug, Clone)]
pub struct SnapshotSource {
    /// The sandbox's template: its kind, layers (topmost first) and config.
    pub kind: TemplateKind,
    pub layers: Vec<Digest>,
    pub config: ImageConfig,
    /// For the template's `source` field, e.g. "snapshot of sbx-… (busybox)".
    pub description: String,
}

impl TemplateStore {
    /// Copy an overlay upper directory into a staging layer.
    pub fn stage_snapshot(&self, upper: &Path) -> Result<StagedSnapshot, TemplateError> {
        let busy = self.importing()?;
        let staging = self.layers().stage()?;
        let stats = tree::copy_tree(
            upper,
            &staging.fs(),
            CopyRules {
                overlay_upper: true,
            },
        )
        .map_err(copy_error)?;
        Ok(StagedSnapshot {
            staging,
            stats,
            _busy: busy,
        })
    }

    /// Unpack a writable layer sent as an image layer (an uncompressed
    /// tar stream) into a staging layer.
    pub fn stage_snapshot_layer(
        &self,
        layer: impl std::io::Read,
        what: &str,
    ) -> Result<StagedSnapshot, TemplateError> {
        let busy = self.importing()?;
        let staging = self.layers().stage()?;
        let stats = extract::extract(layer, &staging.fs()).map_err(|e| extract_error(what, e))?;
        Ok(StagedSnapshot {
            staging,
            stats: CopyStats {
                bytes: stats.bytes,
                entries: stats.entries,
                skipped: stats.skipped_devices,
            },
            _busy: busy,
        })
    }

    /// Store a staged snapshot and make template `name` of it.
    pub fn finish_snapshot(
        &self,
        staged: StagedSnapshot,
        name: &str,
        source: SnapshotSource,
    ) -> Result<Template, TemplateError> {
        self.check_new(name, false)?;
        if source.kind != TemplateKind::Host && source.layers.is_empty() {
            return Err(TemplateError::Outdated(format!(
                "the sandbox's template was built before cove stored templates as layers; \
                 rebuild it (cove template build …) to snapshot its sandboxes ({})",
                source.description
            )));
        }
        let fs_dir = staged.staging.fs();
        let empty = fs::read_dir(&fs_dir)
            .map_err(io_err("read", &fs_dir))?
            .next()
            .is_none();
        let mut layers = source.layers;
        if !empty {
            let digest = tree::tree_digest(&fs_dir)
                .map_err(io_err("read", &fs_dir))?
                .digest;
            let info = LayerInfo {
                bytes: staged.stats.bytes,
                entries: staged.stats.entries,
                source: source.description.clone(),
                created: now(),
            };
            staged.staging.commit(&self.layers(), &digest, &info)?;
            layers.insert(0, digest);
        }
        self.install_layers(
            name,
            source.kind,
            source.description,
            source.config,
            layers,
            false,
        )
    }
}
