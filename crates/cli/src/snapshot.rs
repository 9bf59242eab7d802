//! `ferro vm snapshot ...` and `ferro vm restore`: snapshots of a VM.
//!
//! `ferro vm snapshot NAME --name SNAP` snapshots a stopped VM's disks; with `--memory [--to
//! DIR]` a running or paused VM's memory, device state and disks. `list`, `revert` and
//! `delete` work on both kinds; `ferro vm restore NAME --snapshot SNAP | --from DIR` runs a
//! stopped VM from a memory snapshot.

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

use ferro_api::storage::{CreateSnapshot, RestoreVm, Snapshot};
use hyper::Method;

use crate::client::{Client, ClientError};

/// `ferro vm snapshot NAME --name SNAP`, or one of the subcommands.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    cmd: Option<SnapshotCmd>,
    /// The VM (stopped).
    #[arg(required = true)]
    vm: Option<String>,
    /// The snapshot's name.
    #[arg(long, required = true)]
    name: Option<String>,
    /// Save the memory and device state of the running (or paused) VM too; it runs on.
    #[arg(long)]
    memory: bool,
    /// Where the memory snapshot's directory goes (on the daemon's host; new or empty).
    #[arg(long, value_name = "DIR", requires = "memory")]
    to: Option<PathBuf>,
}

/// `ferro vm restore NAME --snapshot SNAP | --from DIR`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The VM (stopped).
    vm: String,
    /// One of its memory snapshots.
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    snapshot: Option<String>,
    /// A snapshot directory on the daemon's host.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// List a VM's snapshots.
    List {
        /// The VM.
        vm: String,
    },
    /// Revert a stopped VM's disks to a snapshot (later snapshots are kept).
    Revert {
        /// The VM.
        vm: String,
        /// The snapshot.
        snapshot: String,
    },
    /// Delete a snapshot (its data is folded into the disks above it).
    Delete {
        /// The VM.
        vm: String,
        /// The snapshot.
        snapshot: String,
    },
}

async fn call<T: serde::de::DeserializeOwned>(
    c: &Client,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Option<T>, ClientError> {
    let (status, bytes) = c.raw(method, path, body).await?;
    crate::client::check(status, &bytes)?;
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix milliseconds.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(secs / 86400).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}")
}

fn table(list: &[Snapshot]) {
    println!(
        "{:<24} {:>5} {:>8}  {:<19}  DIR",
        "NAME", "DISKS", "MEMORY", "CREATED (UTC)"
    );
    for s in list {
        let memory = match (s.memory, s.bytes) {
            (true, Some(b)) => format!("{}K", b >> 10),
            (true, None) => "yes".to_string(),
            (false, _) => "-".to_string(),
        };
        let dir = s
            .dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        println!(
            "{:<24} {:>5} {:>8}  {:<19}  {dir}",
            s.name,
            s.disks.len(),
            memory,
            utc(s.created_ms)
        );
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs `ferro vm snapshot ...`.
pub async fn run(c: &Client, args: &SnapshotArgs, as_json: bool) -> Result<()> {
    match (&args.cmd, &args.vm, &args.name) {
        (Some(SnapshotCmd::List { vm }), _, _) => {
            let list: Vec<Snapshot> =
                call(c, Method::GET, &format!("/v1/vms/{vm}/snapshots"), None)
                    .await?
                    .unwrap_or_default();
            if as_json {
                json(&list)
            } else {
                table(&list);
                Ok(())
            }
        }
        (Some(SnapshotCmd::Revert { vm, snapshot }), _, _) => {
            let v: Option<ferro_api::rest::Vm> = call(
                c,
                Method::POST,
                &format!("/v1/vms/{vm}/snapshots/{snapshot}/revert"),
                None,
            )
            .await?;
            match v {
                Some(v) if as_json => json(&v),
                _ => {
                    println!("reverted {vm} to snapshot {snapshot}");
                    Ok(())
                }
            }
        }
        (Some(SnapshotCmd::Delete { vm, snapshot }), _, _) => {
            call::<serde_json::Value>(
                c,
                Method::DELETE,
                &format!("/v1/vms/{vm}/snapshots/{snapshot}"),
                None,
            )
            .await?;
            if as_json {
                println!("{{}}");
            } else {
                println!("deleted snapshot {snapshot} of {vm}");
            }
            Ok(())
        }
        (None, Some(vm), Some(name)) => {
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let req = CreateSnapshot {
                name: name.clone(),
                memory: args.memory,
                dir: args.to.as_ref().map(abs),
            };
            let body = serde_json::to_vec(&req)?;
            let s: Option<Snapshot> = call(
                c,
                Method::POST,
                &format!("/v1/vms/{vm}/snapshots"),
                Some(body),
            )
            .await?;
            match s {
                Some(s) if as_json => json(&s),
                Some(s) => {
                    table(std::slice::from_ref(&s));
                    Ok(())
                }
                None => Ok(()),
            }
        }
        _ => anyhow::bail!("give a VM and --name SNAP, or list|revert|delete"),
    }
}

/// Runs `ferro vm restore ...`.
pub async fn restore(c: &Client, args: &RestoreArgs, as_json: bool) -> Result<()> {
    let req = RestoreVm {
        snapshot: args.snapshot.clone(),
        from: args
            .from
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    };
    let started = std::time::Instant::now();
    let v: Option<ferro_api::rest::Vm> = call(
        c,
        Method::POST,
        &format!("/v1/vms/{}/restore", args.vm),
        Some(serde_json::to_vec(&req)?),
    )
    .await?;
    match v {
        Some(v) if as_json => json(&v),
        _ => {
            println!(
                "restored {} ({} ms): {}",
                args.vm,
                started.elapsed().as_millis(),
                match (&args.snapshot, &args.from) {
                    (Some(s), _) => format!("snapshot {s}"),
                    (_, Some(d)) => d.display().to_string(),
                    _ => String::new(),
                }
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_796_322_259_923), "2026-12-03 18:24:19");
    }
}
