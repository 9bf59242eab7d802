//! Human tables and `--json` output.

use anyhow::Result;
use ferro_api::rest::{Vm, VmEvent};

fn json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A list of VMs.
pub fn vms(list: &[Vm], as_json: bool) -> Result<()> {
    if as_json {
        return json(&list);
    }
    println!(
        "{:<20} {:<8} {:>8} {:>5} {:>8} {:>8}  {:<10}  ADDRESS",
        "NAME", "STATE", "PID", "CPUS", "MEMORY", "RESTARTS", "RESTART"
    );
    for v in list {
        let address = v
            .nics
            .iter()
            .find_map(|n| n.address.as_deref())
            .unwrap_or("-");
        println!(
            "{:<20} {:<8} {:>8} {:>5} {:>7}M {:>8}  {:<10}  {}",
            v.name,
            v.state.as_str(),
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            v.cpus,
            v.memory_mib,
            v.restarts,
            v.restart.as_str(),
            address
        );
    }
    Ok(())
}

/// One VM.
pub fn vm(v: &Vm, as_json: bool) -> Result<()> {
    if as_json {
        return json(v);
    }
    println!("name:      {}", v.name);
    println!("state:     {}", v.state.as_str());
    if let Some(p) = v.pid {
        println!("pid:       {p}");
    }
    println!("cpus:      {}", v.cpus);
    println!("memory:    {} MiB", v.memory_mib);
    println!("kernel:    {}", v.kernel.display());
    if let Some(i) = &v.initrd {
        println!("initrd:    {}", i.display());
    }
    println!("cmdline:   {}", v.cmdline);
    for d in &v.disks {
        println!(
            "disk:      {}{}",
            d.path.display(),
            if d.readonly { " (read-only)" } else { "" }
        );
    }
    for n in &v.nics {
        println!(
            "nic{}:      {} tap {}{}{}",
            n.index,
            n.mac,
            n.tap.as_deref().unwrap_or("auto"),
            n.bridge
                .as_deref()
                .map(|b| format!(" bridge {b}"))
                .unwrap_or_default(),
            n.address
                .as_deref()
                .map(|a| format!(" address {a}"))
                .unwrap_or_default()
        );
    }
    println!(
        "restart:   {} ({} restarts)",
        v.restart.as_str(),
        v.restarts
    );
    println!("console:   ferro console {}", v.name);
    Ok(())
}

/// An event log.
pub fn events(list: &[VmEvent], as_json: bool) -> Result<()> {
    if as_json {
        return json(&list);
    }
    for e in list {
        let secs = e.at_ms / 1000;
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        println!(
            "{h:02}:{m:02}:{s:02}.{:03}  {:<14} {}",
            e.at_ms % 1000,
            e.kind,
            e.message
        );
    }
    Ok(())
}
