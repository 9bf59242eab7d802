//! The types every face of Ferrovisor shares: the VMM's flags, the daemon's REST API and the CLI
//! all describe a VM with the same [`VmConfig`].

#![deny(unsafe_code)]

mod config;
pub mod control;
mod devices;
pub mod rest;
mod size;
pub mod storage;

pub use config::{
    ConfigError, HugePages, SerialMode, VmConfig, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB,
};
pub use devices::{
    BalloonConfig, DeviceError, DiskCache, DiskConfig, DiskFormat, MacAddr, NetConfig, VsockConfig,
};
pub use size::{parse_mib, SizeError};
