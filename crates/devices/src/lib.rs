//! Legacy devices.
