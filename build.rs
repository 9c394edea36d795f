//! The `homicro` binary's code segment starts on a 2 MiB boundary, so that
//! `serve` can move all of it onto huge pages (see `src/hugetext.rs`).

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,max-page-size=0x200000");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
