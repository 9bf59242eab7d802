//! Links the probe as a static, non-PIE ELF at 1 MiB using `link.ld`.

use std::path::PathBuf;

fn main() {
    // The kernel must not contain SSE (PVM's CPL0 emulation cannot run it); the flags that forbid
    // it live in guest/probe/.cargo/config.toml, which cargo only reads when run from here.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !flags.split('\x1f').any(|f| f.contains("-sse")) {
        panic!(
            "build guest/probe from its own directory (or with guest/probe/build-probe.sh) so that \
             its .cargo/config.toml disables SSE; got RUSTFLAGS {flags:?}"
        );
    }
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTFLAGS");
    for arg in [
        "-nostdlib".to_string(),
        "-static".to_string(),
        "-no-pie".to_string(),
        "-Wl,--build-id=none".to_string(),
        "-Wl,-z,max-page-size=0x1000".to_string(),
        "-Wl,--no-dynamic-linker".to_string(),
        format!("-Wl,-T,{}", script.display()),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
