//! `cove template`: list, build, inspect and remove templates.

use cove_template::TemplateStore;
use indicatif::{ProgressBar, ProgressStyle};

use crate::{ExitCode, Failure, paths};

#[derive(Debug, clap::Subcommand)]
pub enum TemplateCommand {
    /// List templates.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build a template from packages on this host (busybox).
    Build {
        /// What to build: busybox (from Debian's busybox-static).
        name: String,
    },
    /// Show a template's metadata as JSON.
    Inspect { name: String },
    /// Remove a template.
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

pub fn run(command: TemplateCommand) -> Result<ExitCode, Failure> {
    let store = store();
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
                println!("{:<16} {:<8} SOURCE", "NAME", "KIND");
                for t in templates {
                    let kind = match t.meta.kind {
                        cove_template::TemplateKind::Host => "host",
                        cove_template::TemplateKind::Rootfs => "rootfs",
                    };
                    println!("{:<16} {:<8} {}", t.meta.name, kind, t.meta.source);
                }
            }
            Ok(ExitCode(0))
        }
        TemplateCommand::Build { name } => match name.as_str() {
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
                        Failure::new(e.to_string())
                    })?;
                bar.finish_and_clear();
                println!(
                    "built template {} in {}",
                    template.name(),
                    template.dir.display()
                );
                prepare_microvm(&template);
                Ok(ExitCode(0))
            }
            "host" => {
                let template = store.get("host").map_err(|e| Failure::new(e.to_string()))?;
                println!("template host is built in ({})", template.dir.display());
                Ok(ExitCode(0))
            }
            other => Err(Failure::new(format!(
                "cove cannot build a template named {other:?}; buildable: busybox"
            ))),
        },
        TemplateCommand::Inspect { name } => {
            let t = store.get(&name).map_err(|e| Failure::new(e.to_string()))?;
            let value = serde_json::json!({
                "meta": t.meta,
                "dir": t.dir,
                "layers": t.layers,
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
            store
                .remove(&name)
                .map_err(|e| Failure::new(e.to_string()))?;
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
        .and_then(|_| cove_vm::ensure_rootfs_image(&template.dir, &mut progress));
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
