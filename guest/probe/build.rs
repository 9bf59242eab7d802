//! Links the probe as a static, non-PIE ELF at 1 MiB using `link.ld`.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
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
