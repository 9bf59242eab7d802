//! `ferro image ...`: the image store.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use ferro_api::storage::{CreateTemplate, Image, ImportImage, Template};

use crate::client::Client;

/// Image subcommands.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Import a disk image (qcow2, raw, VMDK, VHD, VHDX) or an OVA; the file is read on the
    /// daemon's host and stored as qcow2.
    Import {
        /// The file.
        file: PathBuf,
        /// The image's name (default: the file name without its extension).
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    List,
    /// Delete an image (refused while a VM uses it).
    Delete {
        /// The image.
        name: String,
    },
}

fn json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024 && v.is_multiple_of(1024) && u < UNITS.len() - 1 {
        v /= 1024;
        u += 1;
    }
    format!("{v}{}", UNITS[u])
}

fn table(list: &[Image]) {
    println!(
        "{:<24} {:<6} {:>8} {:>5}  PATH",
        "NAME", "FROM", "SIZE", "DISKS"
    );
    for i in list {
        println!(
            "{:<24} {:<6} {:>8} {:>5}  {}",
            i.name,
            i.format,
            size(i.virtual_size),
            i.disks.len(),
            i.path.display()
        );
    }
}

/// Runs an image subcommand.
pub async fn run(c: &Client, cmd: &ImageCmd, as_json: bool) -> Result<()> {
    match cmd {
        ImageCmd::Import { file, name } => {
            let path = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            let label = format!("importing {}", path.display());
            let req = ImportImage {
                path,
                name: name.clone(),
            };
            let op = c.import_image_async(&req).await?;
            let img: Image = crate::progress::wait(c, op, &label, as_json).await?;
            if as_json {
                json(&img)
            } else {
                table(std::slice::from_ref(&img));
                Ok(())
            }
        }
        ImageCmd::List => {
            let list = c.list_images().await?;
            if as_json {
                json(&list)
            } else {
                table(&list);
                Ok(())
            }
        }
        ImageCmd::Delete { name } => {
            c.delete(&format!("/v1/images/{name}")).await?;
            if as_json {
                println!("{{}}");
            } else {
                println!("deleted image {name}");
            }
            Ok(())
        }
    }
}

/// Template subcommands.
#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// Make a template from a stopped VM (its disks are copied) or from an image.
    Create {
        /// The template's name.
        name: String,
        /// A stopped VM.
        #[arg(
            long,
            required_unless_present = "from_image",
            conflicts_with = "from_image"
        )]
        from_vm: Option<String>,
        /// An image.
        #[arg(long)]
        from_image: Option<String>,
    },
    /// List templates.
    List,
    /// Delete a template (refused while a VM is based on it).
    Delete {
        /// The template.
        name: String,
    },
}

fn template_table(list: &[Template]) {
    println!(
        "{:<24} {:<20} {:>5} {:>8} {:>5}",
        "NAME", "SOURCE", "CPUS", "MEMORY", "DISKS"
    );
    for t in list {
        println!(
            "{:<24} {:<20} {:>5} {:>7}M {:>5}",
            t.name,
            t.source,
            t.cpus,
            t.memory_mib,
            t.disks.len()
        );
    }
}

/// Runs a template subcommand.
pub async fn template(c: &Client, cmd: &TemplateCmd, as_json: bool) -> Result<()> {
    let list = match cmd {
        TemplateCmd::Create {
            name,
            from_vm,
            from_image,
        } => {
            let req = CreateTemplate {
                name: name.clone(),
                from_vm: from_vm.clone(),
                from_image: from_image.clone(),
            };
            let t = c.create_template(&req).await?;
            if as_json {
                return json(&t);
            }
            vec![t]
        }
        TemplateCmd::List => c.list_templates().await?,
        TemplateCmd::Delete { name } => {
            c.delete(&format!("/v1/templates/{name}")).await?;
            if as_json {
                println!("{{}}");
            } else {
                println!("deleted template {name}");
            }
            return Ok(());
        }
    };
    if as_json {
        json(&list)
    } else {
        template_table(&list);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::size(1 << 20), "1M");
        assert_eq!(super::size(3 << 30), "3G");
        assert_eq!(super::size(1000), "1000B");
    }
}
