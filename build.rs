//! Generates include/nbdkit-async.h from the Rust doc comments. The header
//! is committed; `make check` fails when it differs from what this writes.

fn main() {
    // The shared library carries its ABI version, like any system library.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnbdkit_async.so.0");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml")).expect("cbindgen.toml");
    match cbindgen::generate_with_config(&crate_dir, config) {
        Ok(bindings) => {
            bindings.write_to_file(format!("{crate_dir}/include/nbdkit-async.h"));
        }
        Err(e) => panic!("cbindgen: {e}"),
    }
}
