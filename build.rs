//! Build script. The PTX kernels of `kernels/` are assembled here once they exist (issue 4);
//! until then there is nothing to build, and the crate is pure Rust.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
