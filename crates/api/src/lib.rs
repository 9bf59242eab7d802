//! Shared API types.
