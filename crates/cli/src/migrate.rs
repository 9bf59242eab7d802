//! `ferro vm migrate NAME --to http://HOST:PORT [--copy-storage]`: a live migration to another
//! daemon, shown as it goes (the operation's rounds, bytes and dirty pages) until it ends.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use ferro_api::rest::{MigrateVm, MigrationResult, Operation, OperationState};
use hyper::Method;

use crate::client::{check, Client, ClientError};

/// `ferro vm migrate ...`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM (running).
    vm: String,
    /// The destination daemon's API: http://HOST:PORT (its TCP listener).
    #[arg(long)]
    to: String,
    /// The longest pause of the guest to aim for, ms (default 50).
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Copy rounds before the guest is paused anyway (default 30).
    #[arg(long)]
    max_rounds: Option<u32>,
    /// No shared storage: copy the disks, kernel and initrd along (the disks while the guest
    /// runs); the VM's disk files in this daemon's folder for it go once the move succeeded.
    #[arg(long)]
    copy_storage: bool,
}

fn failed(op: Operation) -> ClientError {
    let e = op.error.unwrap_or(ferro_api::rest::ApiErrorBody {
        code: "error".into(),
        message: "the migration failed".into(),
    });
    ClientError::Api {
        status: op.status.unwrap_or(500),
        code: e.code,
        message: e.message,
    }
}

/// Runs `ferro vm migrate ...`.
pub async fn run(c: &Client, args: &MigrateArgs, as_json: bool) -> Result<()> {
    let req = MigrateVm {
        to: args.to.clone(),
        downtime_ms: args.downtime_ms,
        max_rounds: args.max_rounds,
        copy_storage: args.copy_storage,
    };
    let (status, bytes) = c
        .raw(
            Method::POST,
            &format!("/v1/vms/{}/migrate", args.vm),
            Some(serde_json::to_vec(&req)?),
        )
        .await?;
    check(status, &bytes)?;
    let mut op: Operation = serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))?;
    let mut last = String::new();
    loop {
        if !as_json && op.message != last {
            eprintln!("{}: {}", args.vm, op.message);
            last = op.message.clone();
        }
        match op.state {
            OperationState::Running => {}
            OperationState::Failed => return Err(failed(op).into()),
            OperationState::Succeeded => {
                let v = op.result.unwrap_or_default();
                if as_json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    return Ok(());
                }
                let r: MigrationResult = serde_json::from_value(v)
                    .map_err(|e| ClientError::Http(format!("unexpected answer: {e}")))?;
                println!(
                    "migrated {} to {}: {} rounds, {} KiB, {} ms in the VMM, downtime {} ms, {} ms in all",
                    r.vm,
                    r.to,
                    r.rounds,
                    r.bytes >> 10,
                    r.total_ms,
                    r.downtime_ms
                        .map(|d| d.to_string())
                        .unwrap_or_else(|| "?".into()),
                    r.daemon_ms
                );
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        op = c.operation(op.id).await?;
    }
}
