//! stub
use crate::devices::Ctx;
pub fn run(_c: &mut Ctx, _m: crate::devices::BlkMode) {}
