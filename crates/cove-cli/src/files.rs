//! `cove cp` and `cove files`: moving files in and out of sandboxes
//! through the daemon's tar and file endpoints.
//!
//! `cove cp` follows `docker cp`: either side may be `ID:PATH`; a source
//! is a file or a directory tree (`SRC/.` copies a directory's contents);
//! an existing directory destination receives the source inside it, a
//! missing destination becomes the source's new name. `-` as the local
//! side is a tar stream on stdin or stdout. Archives coming out of a
//! sandbox are extracted with the tar crate's `unpack`, which refuses
//! entries that would land outside the destination.

use std::io::Write;
use std::path::{Path, PathBuf};

use cove_client::Client;
use cove_client::api::FileType;
use cove_protocol::client::ChunkReader;
use tokio::sync::mpsc;

use crate::remote::{Remote, fail, runtime};
use crate::{ExitCode, Failure};

#[derive(Debug, clap::Args)]
pub struct CpArgs {
    /// Source: a local path, `ID:PATH`, or `-` (a tar stream on stdin).
    pub src: String,
    /// Destination: a local path, `ID:PATH`, or `-` (a tar stream on stdout).
    pub dst: String,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum FilesCommand {
    /// List a directory in a sandbox.
    Ls {
        id: String,
        #[arg(default_value = ".")]
        path: String,
        /// Levels to descend (1: the directory's own entries).
        #[arg(short, long, default_value_t = 1)]
        depth: u32,
    },
    /// Print a file from a sandbox.
    Cat { id: String, path: String },
    /// Remove files or directories in a sandbox.
    Rm {
        id: String,
        #[arg(required = true)]
        paths: Vec<String>,
        /// Remove directories and their contents.
        #[arg(short, long)]
        recursive: bool,
    },
}

/// `ID:PATH` when the part before the first `:` has no `/` (so a local
/// path with a colon can be written `./a:b`).
fn remote_part(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (!id.is_empty() && !id.contains('/')).then_some((id, path))
}

fn base_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

fn parent_of(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => trimmed[..i].into(),
        None => ".".into(),
    }
}

fn human(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", units[unit])
    }
}

pub fn cp(remote: &Remote, args: CpArgs) -> Result<ExitCode, Failure> {
    let client = remote.client();
    let rt = runtime()?;
    match (remote_part(&args.src), remote_part(&args.dst)) {
        (None, Some((id, dest))) => rt.block_on(upload(&client, &args, id, dest)),
        (Some((id, src)), None) => rt.block_on(download(&client, &args, id, src)),
        (Some(_), Some(_)) => Err(Failure::usage(
            "copying between two sandboxes is not supported; copy to a local directory first",
        )),
        (None, None) => Err(Failure::usage(
            "one side must be in a sandbox: ID:PATH (write ./a:b for a local path with a colon)",
        )),
    }
}

/// A writer that hands 256 KiB chunks to an async stream.
struct ChunkSender {
    tx: mpsc::Sender<std::io::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 * 1024;

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = bytes::Bytes::from(std::mem::take(&mut self.buf));
            self.tx
                .blocking_send(Ok(chunk))
                .map_err(|_| std::io::Error::other("the upload stopped"))?;
        }
        Ok(())
    }
}

/// Local → sandbox.
async fn upload(client: &Client, args: &CpArgs, id: &str, dest: &str) -> Result<ExitCode, Failure> {
    let dest = if dest.is_empty() { "." } else { dest };
    let (tx, mut rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    // Where the archive is extracted, how the copy is shown, and what writes it.
    type Build = Box<dyn FnOnce(ChunkSender) -> std::io::Result<()> + Send>;
    let (dir, shown, builder): (String, String, Build) = if args.src == "-" {
        // A tar stream on stdin goes as it is.
        let build = |mut out: ChunkSender| -> std::io::Result<()> {
            std::io::copy(&mut std::io::stdin().lock(), &mut out)?;
            out.flush()
        };
        (dest.to_string(), dest.to_string(), Box::new(build))
    } else {
        let src = PathBuf::from(&args.src);
        let meta = std::fs::symlink_metadata(&src)
            .map_err(|e| Failure::new(format!("{}: {e}", src.display())))?;
        let contents_only = args.src.ends_with("/.") && meta.is_dir();
        let src_name = if contents_only {
            None
        } else {
            // The name as given (a symlink is copied as itself, under its
            // own name); `.`, `..` and the like by what they point at.
            let name = src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .or_else(|| {
                    src.canonicalize()
                        .ok()
                        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                })
                .ok_or_else(|| Failure::new(format!("{}: cannot name it", src.display())))?;
            Some(name)
        };
        let existing = client.stat(id, dest, true).await;
        // Where to extract, and under which name the source lands.
        let (dir, name) = match existing {
            Ok(entry) if entry.kind == FileType::Dir => (dest.to_string(), src_name),
            Ok(_) if meta.is_dir() => {
                return Err(Failure::new(format!(
                    "cannot copy directory {} onto file {id}:{dest}",
                    src.display()
                )));
            }
            Ok(_) => (parent_of(dest), base_name(dest).map(String::from)),
            Err(err) if err.status() == Some(404) => {
                if dest.ends_with('/') {
                    (dest.to_string(), src_name)
                } else {
                    (parent_of(dest), base_name(dest).map(String::from))
                }
            }
            Err(err) => return Err(fail(err)),
        };
        let shown = match &name {
            Some(name) => format!("{}/{name}", dir.trim_end_matches('/')),
            None => dir.clone(),
        };
        let build = move |out: ChunkSender| -> std::io::Result<()> {
            let mut tar = tar::Builder::new(out);
            tar.follow_symlinks(false);
            match (&name, meta.is_dir()) {
                (Some(name), true) => tar.append_dir_all(name, &src)?,
                (None, _) => tar.append_dir_all(".", &src)?,
                (Some(name), false) => tar.append_path_with_name(&src, name)?,
            }
            tar.into_inner()?.flush()
        };
        (dir, shown, Box::new(build))
    };
    let writer = ChunkSender {
        tx: tx.clone(),
        buf: Vec::with_capacity(CHUNK),
    };
    let producer = tokio::task::spawn_blocking(move || {
        if let Err(err) = builder(writer) {
            let _ = tx.blocking_send(Err(err));
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let result = client.tar_upload(id, &dir, stream).await;
    let _ = producer.await;
    let done = result.map_err(fail)?;
    if !args.quiet {
        eprintln!(
            "copied {} ({} entries) to {id}:{shown}",
            human(done.bytes),
            done.entries
        );
    }
    Ok(ExitCode(0))
}

fn unpack(reader: ChunkReader, into: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.unpack(into)
}

/// Sandbox → local.
async fn download(
    client: &Client,
    args: &CpArgs,
    id: &str,
    src: &str,
) -> Result<ExitCode, Failure> {
    let contents_only = src.ends_with("/.");
    let src_path = if contents_only {
        &src[..src.len() - 2]
    } else {
        src
    };
    let mut archive = client.tar_download(id, src_path).await.map_err(fail)?;
    if args.dst == "-" {
        let mut stdout = std::io::stdout().lock();
        while let Some(chunk) = archive.chunk().await.map_err(fail)? {
            stdout
                .write_all(&chunk)
                .map_err(|e| Failure::new(format!("writing to stdout: {e}")))?;
        }
        return Ok(ExitCode(0));
    }
    let src_name = base_name(src_path).unwrap_or(".").to_string();
    let dst = PathBuf::from(&args.dst);
    let dst_meta = std::fs::metadata(&dst).ok();
    // Extract into an existing directory as is; anything else goes to a
    // fresh directory first and is renamed into place.
    let (extract_to, rename) = match &dst_meta {
        Some(meta) if meta.is_dir() => (dst.clone(), None),
        _ => {
            let parent = match dst.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !parent.is_dir() {
                return Err(Failure::new(format!(
                    "{}: the directory does not exist",
                    parent.display()
                )));
            }
            let staging = parent.join(format!(".cove-cp-{}", std::process::id()));
            std::fs::create_dir(&staging)
                .map_err(|e| Failure::new(format!("{}: {e}", staging.display())))?;
            (staging, Some(dst.clone()))
        }
    };
    let (tx, rx) = mpsc::channel(8);
    let target = extract_to.clone();
    let consumer = tokio::task::spawn_blocking(move || unpack(ChunkReader::new(rx), &target));
    let mut total = 0u64;
    let mut failure = None;
    loop {
        match archive.chunk().await {
            Ok(Some(chunk)) => {
                total += chunk.len() as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(err) => {
                let _ = tx
                    .send(Err(std::io::Error::other("the download broke off")))
                    .await;
                failure = Some(fail(err));
                break;
            }
        }
    }
    drop(tx);
    let unpacked = consumer
        .await
        .map_err(|e| Failure::new(format!("extracting: {e}")))?;
    let cleanup = |dir: &Path| {
        if rename.is_some() {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    if let Some(failure) = failure {
        cleanup(&extract_to);
        return Err(failure);
    }
    if let Err(err) = unpacked {
        cleanup(&extract_to);
        return Err(Failure::new(format!("extracting the archive: {err}")));
    }
    if let Some(dst) = &rename {
        let from = extract_to.join(&src_name);
        if let Some(meta) = &dst_meta
            && meta.is_dir() != from.is_dir()
        {
            cleanup(&extract_to);
            return Err(Failure::new(format!(
                "cannot copy {id}:{src} onto {}: one is a directory, the other is not",
                dst.display()
            )));
        }
        let moved = std::fs::rename(&from, dst);
        cleanup(&extract_to);
        moved.map_err(|e| Failure::new(format!("{}: {e}", dst.display())))?;
    } else if contents_only {
        // `SRC/.` into an existing directory: move the contents up.
        let top = extract_to.join(&src_name);
        if let Ok(entries) = std::fs::read_dir(&top) {
            for entry in entries.flatten() {
                let _ = std::fs::rename(entry.path(), extract_to.join(entry.file_name()));
            }
            let _ = std::fs::remove_dir(&top);
        }
    }
    if !args.quiet {
        eprintln!(
            "copied {id}:{src} to {} ({} as a tar stream)",
            dst.display(),
            human(total)
        );
    }
    Ok(ExitCode(0))
}

pub fn run(remote: &Remote, command: FilesCommand) -> Result<ExitCode, Failure> {
    let client = remote.client();
    let rt = runtime()?;
    match command {
        FilesCommand::Ls { id, path, depth } => {
            let list = rt
                .block_on(client.list_dir(&id, &path, depth))
                .map_err(fail)?;
            if remote.json {
                let text =
                    serde_json::to_string_pretty(&list).map_err(|e| Failure::new(e.to_string()))?;
                println!("{text}");
            } else {
                for e in &list.entries {
                    let link = e
                        .link_target
                        .as_deref()
                        .map(|t| format!(" -> {t}"))
                        .unwrap_or_default();
                    println!(
                        "{} {:>5} {:>5} {:>12} {} {}{link}",
                        e.permissions,
                        e.uid,
                        e.gid,
                        e.size,
                        e.mtime.get(..19).unwrap_or(&e.mtime).replace('T', " "),
                        e.path
                    );
                }
                if list.truncated {
                    eprintln!("cove: the listing was cut short; list a narrower path");
                }
            }
            Ok(ExitCode(0))
        }
        FilesCommand::Cat { id, path } => {
            rt.block_on(async {
                let mut download = client.download(&id, &path).await.map_err(fail)?;
                let mut stdout = std::io::stdout().lock();
                while let Some(chunk) = download.chunk().await.map_err(fail)? {
                    if let Err(err) = stdout.write_all(&chunk) {
                        if err.kind() == std::io::ErrorKind::BrokenPipe {
                            return Ok(());
                        }
                        return Err(Failure::new(format!("writing to stdout: {err}")));
                    }
                }
                let _ = stdout.flush();
                Ok(())
            })?;
            Ok(ExitCode(0))
        }
        FilesCommand::Rm {
            id,
            paths,
            recursive,
        } => {
            let mut code = 0;
            for path in &paths {
                if let Err(err) = rt.block_on(client.remove(&id, path, recursive)) {
                    eprintln!("cove: {id}:{path}: {}", fail(err).message());
                    code = 1;
                }
            }
            Ok(ExitCode(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides() {
        assert_eq!(remote_part("sbx-12345678:/w"), Some(("sbx-12345678", "/w")));
        assert_eq!(remote_part("./a:b"), None);
        assert_eq!(remote_part("/abs/path"), None);
        assert_eq!(remote_part(":x"), None);
        assert_eq!(base_name("/a/b/"), Some("b"));
        assert_eq!(base_name("/"), None);
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("a"), ".");
        assert_eq!(human(1500), "1.5kB");
    }
}
