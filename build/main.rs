//! Build script: turns the PTX templates of `kernels/` into the kernels the crate embeds.
//!
//! 1. Expands each template for its element types and variants ([`template::module_specs`]), with the
//!    record offsets and constants of `src/kernels/records.rs` (compiled in here as
//!    [`records`]), into `OUT_DIR/ptx/`.
//! 2. Finds ptxas and assembles every module for sm_80, sm_86, sm_89 and sm_90
//!    ([`toolchain`]). A ptxas error fails the build; its `-v` resource report goes to
//!    `OUT_DIR/ptxas-report.txt`, and a register spill is a cargo warning.
//! 3. Writes `OUT_DIR/kernels.rs`, the module table ([`codegen`]).
//!
//! Without ptxas the build succeeds with PTX only (the driver JITs it) and a warning;
//! `SPECTRAL_STEP_REQUIRE_PTXAS=1` turns that into an error.

#[path = "../src/kernels/records.rs"]
#[allow(dead_code)]
mod records;

mod codegen;
mod template;
mod toolchain;

use std::collections::HashMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use toolchain::Module;

fn main() {
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=src/kernels/records.rs");
    for var in [
        "PTXAS",
        "CUDA_PATH",
        "CUDA_HOME",
        "PATH",
        "SPECTRAL_STEP_REQUIRE_PTXAS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(message) = run() {
        panic!("spectral-step build: {message}");
    }
}

fn run() -> Result<(), String> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let ptx_dir = out.join("ptx");
    let cubin_dir = out.join("cubin");
    fs::create_dir_all(&ptx_dir).map_err(|e| e.to_string())?;
    fs::create_dir_all(&cubin_dir).map_err(|e| e.to_string())?;

    let values: HashMap<String, u64> = records::template_values().into_iter().collect();
    let mut modules = Vec::new();
    let mut texts: HashMap<&str, String> = HashMap::new();
    for spec in template::module_specs() {
        if !texts.contains_key(spec.file) {
            let path = manifest.join("kernels").join(spec.file);
            let text = fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            texts.insert(spec.file, text);
        }
        let expanded = template::expand(&texts[spec.file], &spec.roles, spec.variant, &values)
            .map_err(|e| format!("kernels/{}: {e}", spec.file))?;
        let name = template::entry_name(&expanded)
            .ok_or_else(|| format!("kernels/{}: no .entry", spec.file))?;
        let ptx_path = ptx_dir.join(format!("{name}.ptx"));
        write_if_changed(&ptx_path, &expanded)?;
        modules.push(Module {
            name,
            ptx_path,
            cubins: Vec::new(),
        });
    }

    let require = env::var("SPECTRAL_STEP_REQUIRE_PTXAS").is_ok_and(|v| v == "1");
    let mut report = String::new();
    let ptxas_version = match toolchain::find_ptxas() {
        Some(ptxas) => {
            let version = toolchain::ptxas_version(&ptxas)?;
            report.push_str(&format!("# {} ({version})\n", ptxas.display()));
            toolchain::assemble(&ptxas, &mut modules, &cubin_dir, &mut report)?;
            Some(version)
        }
        None if require => {
            return Err(
                "SPECTRAL_STEP_REQUIRE_PTXAS=1 but no ptxas was found (looked at PTXAS, \
                 CUDA_PATH/bin, CUDA_HOME/bin, /usr/local/cuda/bin, PATH and pip's \
                 nvidia-cuda-nvcc)"
                    .into(),
            );
        }
        None => {
            println!(
                "cargo:warning=spectral-step: ptxas not found; kernels are embedded as PTX only \
                 (the CUDA driver will JIT them). Set PTXAS=/path/to/ptxas to assemble them."
            );
            report.push_str("# ptxas not found: PTX only\n");
            None
        }
    };
    write_if_changed(&out.join("ptxas-report.txt"), &report)?;
    write_if_changed(
        &out.join("kernels.rs"),
        &codegen::module_table(&modules, ptxas_version.as_deref(), &out),
    )?;
    Ok(())
}

fn write_if_changed(path: &Path, contents: &str) -> Result<(), String> {
    if fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
