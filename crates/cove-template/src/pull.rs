//! `cove template pull REF`: a template from an OCI registry.
//!
//! The manifest (for this host's platform) and config come first; then
//! each layer that is not already stored is downloaded to a staging file
//! while its digest is computed, checked against the manifest, and only
//! then unpacked (see `import.rs`), three layers at a time. HTTPS and the
//! registry's token authentication are on unless turned off by option.
//! Every request has a connect and a read timeout, so a registry that
//! accepts a connection and never answers is an error, not a hang.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::image::ConfigFile;
use crate::import::{LayerSource, store_layer};
use crate::layers::Digest;
use crate::{Observer, Template, TemplateError, TemplateKind, TemplateStore, valid_name};

/// Options of a pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The template's name; by default derived from the reference.
    pub name: Option<String>,
    /// Talk HTTP instead of HTTPS (a local registry).
    pub plain_http: bool,
    /// Accept any TLS certificate and host name.
    pub insecure: bool,
    /// Basic credentials; anonymous (with the registry's token flow) otherwise.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Connect and read timeout of each request.
    pub timeout: Duration,
    /// Replace a template of the same name.
    pub replace: bool,
}

impl Default for PullOptions {
    fn default() -> PullOptions {
        PullOptions {
            name: None,
            plain_http: false,
            insecure: false,
            username: None,
            password: None,
            timeout: Duration::from_secs(30),
            replace: false,
        }
    }
}

/// Layers downloaded at the same time.
const PARALLEL: usize = 3;

/// The template name a reference gets by default: the last part of its
/// repository, with the tag appended unless it is `latest`
/// (`registry:5000/team/python:3.12` → `python-3.12`).
pub fn default_name_for(reference: &str) -> Result<String, TemplateError> {
    let parsed: Reference = reference.parse().map_err(|e| {
        TemplateError::Image(format!("{reference:?} is not an image reference: {e}"))
    })?;
    let base = parsed
        .repository()
        .rsplit('/')
        .next()
        .unwrap_or("image")
        .to_string();
    let mut name = match parsed.tag() {
        Some(tag) if tag != "latest" => format!("{base}-{tag}"),
        _ => base,
    };
    name = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(64);
    if valid_name(&name) {
        Ok(name)
    } else {
        Err(TemplateError::BadName(name))
    }
}

fn timeout_error(registry: &str, timeout: Duration, what: &str) -> TemplateError {
    TemplateError::RegistryTimeout(format!(
        "registry {registry} did not answer within {}s while {what}; \
         check that it is up, or give it longer (--timeout)",
        timeout.as_secs_f64()
    ))
}

/// A registry error as a sentence that names the registry and the way out.
fn registry_error(
    registry: &str,
    timeout: Duration,
    what: &str,
    err: OciDistributionError,
) -> TemplateError {
    if let OciDistributionError::RequestError(e) = &err {
        if e.is_timeout() {
            return timeout_error(registry, timeout, what);
        }
        let mut chain = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        let hint =
            if chain.contains("certificate") || chain.contains("TLS") || chain.contains("tls") {
                " (a registry without valid TLS needs --insecure, one without TLS --plain-http)"
            } else if chain.contains("http") || chain.contains("HTTP") {
                " (if the registry speaks plain HTTP, pass --plain-http)"
            } else {
                ""
            };
        return TemplateError::Registry(format!(
            "registry {registry}: {what} failed: {chain}{hint}"
        ));
    }
    let detail = match &err {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            format!("{err} (give credentials with --username and --password-stdin)")
        }
        OciDistributionError::ImageManifestNotFoundError(_) => {
            format!("{err} (check the repository and tag)")
        }
        _ => err.to_string(),
    };
    TemplateError::Registry(format!("registry {registry}: {what} failed: {detail}"))
}

impl TemplateStore {
    /// Pull `reference` from its registry as a template. On failure,
    /// layers stored by this pull that no template uses are removed again.
    pub async fn pull(
        &self,
        reference: &str,
        options: &PullOptions,
        observer: Arc<dyn Observer>,
    ) -> Result<Template, TemplateError> {
        let result = self.pull_inner(reference, options, observer).await;
        if result.is_err() {
            let store = self.clone();
            let _ = tokio::task::spawn_blocking(move || store.collect_garbage()).await;
        }
        result
    }

    async fn pull_inner(
        &self,
        reference: &str,
        options: &PullOptions,
        observer: Arc<dyn Observer>,
    ) -> Result<Template, TemplateError> {
        let parsed: Reference = reference.parse().map_err(|e| {
            TemplateError::Image(format!("{reference:?} is not an image reference: {e}"))
        })?;
        let name = match &options.name {
            Some(n) => n.clone(),
            None => default_name_for(reference)?,
        };
        self.check_new(&name, options.replace)?;
        let registry = parsed.resolve_registry().to_string();
        let client = Client::new(ClientConfig {
            protocol: if options.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: options.insecure,
            connect_timeout: Some(options.timeout),
            read_timeout: Some(options.timeout),
            ..ClientConfig::default()
        });
        let auth = match (&options.username, &options.password) {
            (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            (Some(u), None) => RegistryAuth::Basic(u.clone(), String::new()),
            _ => RegistryAuth::Anonymous,
        };

        observer.step(&format!("fetching the manifest of {parsed}"));
        let what = format!("fetching the manifest of {parsed}");
        // The read timeout covers each read; this covers a registry that
        // trickles bytes forever.
        let (manifest, manifest_digest, config_json) = tokio::time::timeout(
            options.timeout * 4,
            client.pull_manifest_and_config(&parsed, &auth),
        )
        .await
        .map_err(|_| timeout_error(&registry, options.timeout * 4, &what))?
        .map_err(|e| registry_error(&registry, options.timeout, &what, e))?;
        let config: ConfigFile = serde_json::from_str(&config_json).map_err(|e| {
            TemplateError::Image(format!("the image config of {parsed} is not valid: {e}"))
        })?;
        let diff_ids = config
            .diff_ids()
            .map_err(|e| TemplateError::Image(format!("{parsed}: {e}")))?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(TemplateError::Image(format!(
                "{parsed}: the manifest lists {} layers but the config {} DiffIDs",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }

        let _busy = self.importing()?;
        let count = manifest.layers.len();
        let shown = parsed.to_string();
        let jobs = manifest
            .layers
            .iter()
            .cloned()
            .zip(diff_ids)
            .enumerate()
            .map(|(i, (desc, diff_id))| {
                let what = format!("layer {} of {count} ({}) of {shown}", i + 1, desc.digest);
                self.pull_layer(
                    &client,
                    &parsed,
                    desc,
                    diff_id,
                    what,
                    &registry,
                    options.timeout,
                    observer.clone(),
                )
            });
        let mut digests: Vec<Digest> = futures::stream::iter(jobs)
            .buffered(PARALLEL)
            .try_collect()
            .await?;
        digests.reverse();
        self.install_layers(
            &name,
            TemplateKind::Image,
            format!("registry {shown}@{manifest_digest}"),
            config.image_config(),
            digests,
            options.replace,
        )
    }

    #[allow(clippy::too_many_arguments)]
    async fn pull_layer(
        &self,
        client: &Client,
        reference: &Reference,
        desc: OciDescriptor,
        diff_id: Digest,
        what: String,
        registry: &str,
        timeout: Duration,
        observer: Arc<dyn Observer>,
    ) -> Result<Digest, TemplateError> {
        let layers = self.layers();
        let label = diff_id.short().to_string();
        if layers.exists(&diff_id) {
            observer.layer(&label, "exists", 1, 1);
            return Ok(diff_id);
        }
        let blob = Digest::parse(&desc.digest).ok_or_else(|| {
            TemplateError::Image(format!("{what}: {:?} is not a sha256 digest", desc.digest))
        })?;
        let total = u64::try_from(desc.size).unwrap_or(0);
        let download = layers.stage()?;
        let path = download.scratch("blob");
        let mut stream = client
            .pull_blob_stream(reference, &desc)
            .await
            .map_err(|e| registry_error(registry, timeout, &format!("downloading {what}"), e))?;
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| TemplateError::Io {
                action: "create",
                path: path.clone(),
                source: e,
            })?;
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        let mut reported = 0u64;
        observer.layer(&label, "download", 0, total);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                let text = e.to_string();
                if text.contains("timed out") {
                    timeout_error(registry, timeout, &format!("downloading {what}"))
                } else if text.to_ascii_lowercase().contains("digest") {
                    // oci-client checks the digest as the bytes arrive.
                    TemplateError::Image(format!(
                        "{what}: registry {registry} sent a blob that does not match \
                         its digest ({text}): the blob is corrupt or was tampered with"
                    ))
                } else {
                    TemplateError::Registry(format!(
                        "registry {registry}: downloading {what} failed: {e}"
                    ))
                }
            })?;
            hasher.update(&chunk);
            done += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| TemplateError::Io {
                    action: "write",
                    path: path.clone(),
                    source: e,
                })?;
            if done - reported >= 1 << 20 {
                reported = done;
                observer.layer(&label, "download", done, total);
            }
        }
        file.flush().await.map_err(|e| TemplateError::Io {
            action: "write",
            path: path.clone(),
            source: e,
        })?;
        drop(file);
        let actual = Digest::from_sha256(&hasher.finalize());
        if actual != blob || (total > 0 && done != total) {
            return Err(TemplateError::Image(format!(
                "{what}: the registry sent {done} bytes with digest {actual}, \
                 not the {total} bytes with digest {blob} the manifest names"
            )));
        }
        let store = self.clone();
        let blob_path = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            store_layer(
                &store.layers(),
                LayerSource {
                    label,
                    what,
                    open: Box::new(move || {
                        let file = std::fs::File::open(&blob_path)
                            .map_err(|e| format!("cannot open the downloaded blob: {e}"))?;
                        Ok((Box::new(file) as Box<dyn Read + Send>, total))
                    }),
                    blob: None,
                    size: None,
                    diff_id: Some(diff_id),
                    source: format!("registry blob {blob}"),
                },
                observer.as_ref(),
            )
        })
        .await
        .map_err(|e| TemplateError::Build(format!("unpacking a layer panicked: {e}")))?;
        drop(download);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names() {
        assert_eq!(default_name_for("busybox").unwrap(), "busybox");
        assert_eq!(
            default_name_for("127.0.0.1:5000/team/python:3.12").unwrap(),
            "python-3.12"
        );
        assert_eq!(default_name_for("alpine:latest").unwrap(), "alpine");
        assert!(default_name_for("Not A Ref").is_err());
    }
}
