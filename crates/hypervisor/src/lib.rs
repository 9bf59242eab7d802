//! KVM layer.
