//! Generates the C header from the Rust doc comments into OUT_DIR; `make`
//! copies it to include/nbdkit-async.h when it changed, and `make check`
//! fails when the committed header differs from it.

fn main() {
    // The shared library carries its ABI version, like any system library.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnbdkit_async.so.0");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let config = cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml")).expect("cbindgen.toml");
    match cbindgen::generate_with_config(&crate_dir, config) {
        Ok(bindings) => {
            bindings.write_to_file(format!("{out_dir}/nbdkit-async.h"));
        }
        Err(e) => panic!("cbindgen: {e}"),
    }
}
