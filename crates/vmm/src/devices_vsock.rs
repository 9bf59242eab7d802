//! virtio-vsock from `--vsock cid=N,uds=PATH`: a [`ferro_virtio::vsock::Vsock`] whose host side
//! listens on the unix socket PATH (host-initiated connections: `CONNECT <port>\n`) and
//! connects guest-initiated ones to `PATH_<port>`.

use ferro_api::VsockConfig;
use ferro_virtio::vsock::Vsock;
use ferro_virtio::VirtioDevice;

use crate::VmmError;

/// Appends the vsock device `cfg` asks for to `out`.
pub fn create(
    cfg: Option<&VsockConfig>,
    out: &mut Vec<Box<dyn VirtioDevice>>,
) -> Result<(), VmmError> {
    let Some(cfg) = cfg else {
        return Ok(());
    };
    let dev = Vsock::new(u64::from(cfg.cid), &cfg.uds).map_err(|e| {
        VmmError::Devices(format!(
            "vsock: cannot listen on {}: {e}",
            cfg.uds.display()
        ))
    })?;
    out.push(Box::new(dev));
    Ok(())
}
