//! `cove template`: list, build, import, pull, inspect and remove templates
//! in this machine's template store (no daemon needed). The work is done
//! by `cove-template`; this file turns its progress into bars.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cove_template::{DebianOptions, ImportOptions, Observer, PullOptions, Template, TemplateStore};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{ExitCode, Failure, paths};

#[derive(Debug, clap::Subcommand)]
pub enum TemplateCommand {
    /// List templates.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build a template: busybox (from Debian's busybox-static) or debian
    /// (debootstrap from Debian's archive, cached).
    Build {
        /// What to build: busybox or debian.
        name: String,
        /// Build again even when the template exists (debian).
        #[arg(long)]
        rebuild: bool,
        /// Debian suite (debian).
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Debian mirror (debian).
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
    },
    /// Import a template from SOURCE: an OCI image layout directory (or a
    /// tar of one), a `docker save` archive, or a root filesystem
    /// directory or tarball (gzip or zstd compressed or not).
    Import {
        name: String,
        source: PathBuf,
        /// Replace an existing template of that name.
        #[arg(long)]
        replace: bool,
    },
    /// Pull an image from an OCI registry as a template.
    Pull {
        /// Image reference, e.g. docker.io/library/python:3.12 or
        /// 127.0.0.1:5000/team/app:v1.
        reference: String,
        /// Template name (default: from the reference, e.g. python-3.12).
        #[arg(long)]
        name: Option<String>,
        /// Talk plain HTTP to the registry (a local registry without TLS).
        #[arg(long)]
        plain_http: bool,
        /// Accept a registry certificate that does not verify.
        #[arg(long)]
        insecure: bool,
        /// Registry user name (the password is read from stdin with --password-stdin).
        #[arg(long)]
        username: Option<String>,
        /// Read the registry password from standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Give up on a registry request after this long, e.g. 30s.
        #[arg(long, value_parser = cove_api::units::parse_duration, default_value = "30s")]
        timeout: Duration,
        /// Replace an existing template of that name.
        #[arg(long)]
        replace: bool,
    },
    /// Show a template's metadata and layers as JSON.
    Inspect { name: String },
    /// Remove a template (and the layers no other template uses).
    Rm { name: String },
}

fn store() -> TemplateStore {
    TemplateStore::new(paths::default_data_dir().join("templates"))
}

fn progress_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// One progress bar per layer, plus a line for steps.
struct Bars {
    multi: MultiProgress,
    layers: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            layers: Mutex::new(HashMap::new()),
        }
    }

    fn finish(&self) {
        if let Ok(bars) = self.layers.lock() {
            for bar in bars.values() {
                if !bar.is_finished() {
                    bar.abandon();
                }
            }
        }
    }
}

impl Observer for Bars {
    fn layer(&self, layer: &str, phase: &str, done: u64, total: u64) {
        let Ok(mut bars) = self.layers.lock() else {
            return;
        };
        let bar = bars.entry(layer.to_string()).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:.bold} {msg:10} [{bar:30.cyan/blue}] {bytes}/{total_bytes}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(layer.to_string());
            bar
        });
        if total > 0 {
            bar.set_length(total);
        }
        bar.set_position(done);
        bar.set_message(phase.to_string());
        if matches!(phase, "done" | "exists") {
            bar.finish();
        }
    }

    fn step(&self, message: &str) {
        if self.multi.is_hidden() {
            // Not a terminal: no bars, but the steps still say what happens.
            eprintln!("{message}");
        } else {
            let _ = self.multi.println(message);
        }
    }
}

fn report(template: &Template, verb: &str) {
    println!(
        "{verb} template {} ({} layer{})",
        template.name(),
        template.meta.layers.len(),
        if template.meta.layers.len() == 1 {
            ""
        } else {
            "s"
        }
    );
}

pub fn run(command: TemplateCommand) -> Result<ExitCode, Failure> {
    let store = store();
    let fail = |e: cove_template::TemplateError| Failure::new(e.to_string());
    match command {
        TemplateCommand::Ls { json } => {
            let templates = store.list();
            if json {
                let metas: Vec<_> = templates.iter().map(|t| &t.meta).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&metas)
                        .map_err(|e| Failure::new(e.to_string()))?
                );
            } else {
                println!("{:<20} {:<7} {:>6} SOURCE", "NAME", "KIND", "LAYERS");
                for t in templates {
                    println!(
                        "{:<20} {:<7} {:>6} {}",
                        t.meta.name,
                        t.meta.kind.as_str(),
                        t.layers.len(),
                        t.meta.source
                    );
                }
            }
            Ok(ExitCode(0))
        }
        TemplateCommand::Build {
            name,
            rebuild,
            suite,
            mirror,
        } => match name.as_str() {
            "busybox" => {
                let bar = progress_bar("busybox");
                let template = store
                    .build_busybox(&mut |done, total, msg| {
                        bar.set_length(total);
                        bar.set_position(done);
                        bar.set_message(msg.to_string());
                    })
                    .map_err(|e| {
                        bar.abandon();
                        fail(e)
                    })?;
                bar.finish_and_clear();
                report(&template, "built");
                prepare_microvm(&template);
                Ok(ExitCode(0))
            }
            "debian" => {
                let bars = Bars::new();
                let options = DebianOptions {
                    suite,
                    mirror,
                    rebuild,
                    ..DebianOptions::default()
                };
                let result = store.build_debian(&options, &bars);
                bars.finish();
                let template = result.map_err(fail)?;
                report(&template, "built");
                Ok(ExitCode(0))
            }
            "host" => {
                let template = store.get("host").map_err(fail)?;
                println!("template host is built in ({})", template.dir.display());
                Ok(ExitCode(0))
            }
            other => Err(Failure::new(format!(
                "cove cannot build a template named {other:?}; buildable: busybox, debian \
                 (for images use `cove template import` or `cove template pull`)"
            ))),
        },
        TemplateCommand::Import {
            name,
            source,
            replace,
        } => {
            let bars = Bars::new();
            let result = store.import(&name, &source, &ImportOptions { replace }, &bars);
            bars.finish();
            report(&result.map_err(fail)?, "imported");
            Ok(ExitCode(0))
        }
        TemplateCommand::Pull {
            reference,
            name,
            plain_http,
            insecure,
            username,
            password_stdin,
            timeout,
            replace,
        } => {
            let password = if password_stdin {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|e| Failure::new(format!("cannot read the password: {e}")))?;
                Some(text.trim_end_matches(['\r', '\n']).to_string())
            } else {
                None
            };
            let options = PullOptions {
                name,
                plain_http,
                insecure,
                username,
                password,
                timeout,
                replace,
            };
            let bars = Arc::new(Bars::new());
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))?;
            let observer: Arc<dyn Observer> = bars.clone();
            let result = runtime.block_on(store.pull(&reference, &options, observer));
            bars.finish();
            report(&result.map_err(fail)?, "pulled");
            Ok(ExitCode(0))
        }
        TemplateCommand::Inspect { name } => {
            let t = store.get(&name).map_err(fail)?;
            let layer_store = store.layers();
            let layers: Vec<_> = t
                .meta
                .layers
                .iter()
                .map(|d| {
                    let info = layer_store.info(d).unwrap_or_default();
                    serde_json::json!({
                        "digest": d,
                        "bytes": info.bytes,
                        "entries": info.entries,
                        "source": info.source,
                    })
                })
                .collect();
            let value = serde_json::json!({
                "meta": t.meta,
                "dir": t.dir,
                "layers": layers,
                "lower_dirs": t.layers,
                "binds": t.binds,
                "masks": t.masks,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&value).map_err(|e| Failure::new(e.to_string()))?
            );
            Ok(ExitCode(0))
        }
        TemplateCommand::Rm { name } => {
            store.remove(&name).map_err(fail)?;
            println!("removed template {name}");
            Ok(ExitCode(0))
        }
    }
}

/// Where the host can run microVMs, also build what a microVM of this
/// template boots (the guest image, shared by all templates, and the
/// template's root disk), so the first `--backend microvm` sandbox does
/// not wait for it. Nothing here is fatal: the template itself is built.
fn prepare_microvm(template: &cove_template::Template) {
    let Ok(me) = std::env::current_exe() else {
        return;
    };
    let agent = match cove_server::backend::microvm::probe_host(&me) {
        Ok(agent) => agent,
        Err(why) => {
            eprintln!("(no microVM images built: {why})");
            return;
        }
    };
    let bar = progress_bar("microVM");
    let mut progress = |done: u64, total: u64, msg: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(msg.to_string());
    };
    let built = cove_vm::ensure_guest_image(&crate::run_vm::cache_dir(), &agent, &mut progress)
        .and_then(|_| {
            cove_vm::ensure_rootfs_image_of(&template.dir, template.root_layers(), &mut progress)
        });
    match built {
        Ok(disk) => {
            bar.finish_and_clear();
            println!("built its microVM root disk {}", disk.display());
        }
        Err(err) => {
            bar.abandon();
            eprintln!("cove: warning: the microVM images were not built: {err}");
        }
    }
}
