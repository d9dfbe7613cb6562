//! Build script: turns the PTX templates of `kernels/` into the kernels the crate embeds.
//!
//! 1. Expands each template for its element types (`f32`, `f16`, `bf16`) and variants by
//!    visible substitution (the rules are in `kernels/README.md`), writing the expanded text
//!    to `OUT_DIR/ptx/`. That text is what the simulator runs, ptxas assembles and the driver
//!    loads.
//! 2. Finds `ptxas` (`PTXAS`, `CUDA_PATH`/`CUDA_HOME`/`/usr/local/cuda` `bin/`, `PATH`, a
//!    pip-installed `nvidia-cuda-nvcc`) and assembles every module for sm_80, sm_86, sm_89 and
//!    sm_90. A ptxas error fails the build; its `-v` resource report goes to
//!    `OUT_DIR/ptxas-report.txt`, and any register spill is a cargo warning.
//! 3. Writes `OUT_DIR/kernels.rs`: the module table (`src/kernels.rs` includes it).
//!
//! Without ptxas the build succeeds with PTX only (the driver JITs it) and a warning;
//! `SPECTRAL_STEP_REQUIRE_PTXAS=1` turns that into an error.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The architectures every module is assembled for (A100, RTX 30xx/A-series, Ada, Hopper).
const ARCHES: [u32; 4] = [80, 86, 89, 90];

/// How one element type is loaded, stored and named in the templates.
struct Element {
    name: &'static str,
    /// log2 of the element size in bytes.
    shift: u32,
    /// `None` for f32; the `cvt` type of a 16-bit float otherwise.
    half: Option<&'static str>,
}

const ELEMENTS: [Element; 3] = [
    Element {
        name: "f32",
        shift: 2,
        half: None,
    },
    Element {
        name: "f16",
        shift: 1,
        half: Some("f16"),
    },
    Element {
        name: "bf16",
        shift: 1,
        half: Some("bf16"),
    },
];

/// A template and the variants it is expanded into.
struct Template {
    file: &'static str,
    /// Per element type (`None`: one module, no element type).
    typed: bool,
    variants: &'static [&'static str],
}

const TEMPLATES: [Template; 3] = [
    Template {
        file: "power_pass.ptx",
        typed: true,
        variants: &["step", "plain"],
    },
    Template {
        file: "finish.ptx",
        typed: false,
        variants: &[""],
    },
    Template {
        file: "update.ptx",
        typed: true,
        variants: &[""],
    },
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
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

struct Module {
    name: String,
    ptx_path: PathBuf,
    cubins: Vec<(u32, PathBuf)>,
}

fn run() -> Result<(), String> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let ptx_dir = out.join("ptx");
    let cubin_dir = out.join("cubin");
    fs::create_dir_all(&ptx_dir).map_err(|e| e.to_string())?;
    fs::create_dir_all(&cubin_dir).map_err(|e| e.to_string())?;

    let mut modules = Vec::new();
    for template in &TEMPLATES {
        let path = manifest.join("kernels").join(template.file);
        let text = fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let elements: Vec<Option<&Element>> = if template.typed {
            ELEMENTS.iter().map(Some).collect()
        } else {
            vec![None]
        };
        for element in elements {
            for &variant in template.variants {
                let expanded = expand(&text, element, variant)
                    .map_err(|e| format!("kernels/{}: {e}", template.file))?;
                let name = entry_name(&expanded)
                    .ok_or_else(|| format!("kernels/{}: no .entry", template.file))?;
                let ptx_path = ptx_dir.join(format!("{name}.ptx"));
                write_if_changed(&ptx_path, &expanded)?;
                modules.push(Module {
                    name,
                    ptx_path,
                    cubins: Vec::new(),
                });
            }
        }
    }

    let require = env::var("SPECTRAL_STEP_REQUIRE_PTXAS").is_ok_and(|v| v == "1");
    let mut report = String::new();
    let ptxas = find_ptxas();
    let ptxas_version = match &ptxas {
        Some(ptxas) => {
            let version = ptxas_version(ptxas)?;
            writeln!(report, "# {} ({version})", ptxas.display()).ok();
            assemble(ptxas, &mut modules, &cubin_dir, &mut report)?;
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
        &module_table(&modules, ptxas_version.as_deref(), &out),
    )?;
    Ok(())
}

/// Expands one template (see `kernels/README.md` for the rules).
fn expand(template: &str, element: Option<&Element>, variant: &str) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() * 2);
    for (number, line) in template.lines().enumerate() {
        let line_no = number + 1;
        let trimmed = line.trim_start();
        let body = if let Some(rest) = trimmed.strip_prefix('@') {
            match rest.split_once(' ') {
                Some((tag, rest)) if tag == "step" || tag == "plain" => {
                    if tag != variant {
                        continue;
                    }
                    rest.trim_start()
                }
                _ => trimmed,
            }
        } else {
            trimmed
        };
        let indent = &line[..line.len() - trimmed.len()];
        let body = substitute(body, element, variant);
        match expand_macro(&body, element) {
            Some(Ok(lines)) => {
                for expanded in lines {
                    out.push_str(indent);
                    out.push_str(&expanded);
                    out.push('\n');
                }
            }
            Some(Err(e)) => return Err(format!("line {line_no}: {e}")),
            None => {
                if body.contains("{{") {
                    return Err(format!("line {line_no}: unknown placeholder in `{body}`"));
                }
                out.push_str(indent);
                out.push_str(&body);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

fn substitute(line: &str, element: Option<&Element>, variant: &str) -> String {
    let mut line = line.replace("{{VARIANT}}", variant);
    if let Some(element) = element {
        line = line
            .replace("{{T}}", element.name)
            .replace("{{ELEM_SHIFT}}", &element.shift.to_string())
            .replace("{{ELEM_BYTES}}", &(1u32 << element.shift).to_string())
            .replace("{{QUAD_BYTES}}", &(4u32 << element.shift).to_string());
    }
    line
}

/// `Some` when the line is one of the pseudo-instructions.
fn expand_macro(line: &str, element: Option<&Element>) -> Option<Result<Vec<String>, String>> {
    let (op, args) = line.split_once(char::is_whitespace)?;
    let args = args.trim().strip_suffix(';')?.trim();
    let known = [
        "LOAD_ELEM",
        "LOAD_ELEM.nc",
        "LOAD_ELEM4",
        "LOAD_ELEM4.nc",
        "STORE_ELEM",
        "STORE_ELEM4",
        "MOMENTUM",
        "WARP_SUM",
    ];
    if !known.contains(&op) {
        return None;
    }
    Some(expand_known(op, args, element))
}

fn expand_known(op: &str, args: &str, element: Option<&Element>) -> Result<Vec<String>, String> {
    let need_element = || element.ok_or_else(|| format!("{op} in an untyped template"));
    let vector = |text: &str| -> Result<Vec<String>, String> {
        let inner = text
            .trim()
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .ok_or_else(|| format!("{op}: expected {{a, b, c, d}}, got `{text}`"))?;
        let regs: Vec<String> = inner.split(',').map(|r| r.trim().to_string()).collect();
        if regs.len() == 4 {
            Ok(regs)
        } else {
            Err(format!("{op}: expected 4 registers, got `{text}`"))
        }
    };
    Ok(match op {
        "LOAD_ELEM" | "LOAD_ELEM.nc" => {
            let element = need_element()?;
            let cache = if op.ends_with(".nc") { ".nc" } else { "" };
            let (dst, addr) = args
                .split_once(',')
                .ok_or_else(|| format!("{op}: expected `dst, [addr]`"))?;
            let (dst, addr) = (dst.trim(), addr.trim());
            match element.half {
                None => vec![format!("ld.global{cache}.f32 {dst}, {addr};")],
                Some(half) => vec![
                    format!("ld.global{cache}.b16 %half0, {addr};"),
                    format!("cvt.f32.{half} {dst}, %half0;"),
                ],
            }
        }
        "LOAD_ELEM4" | "LOAD_ELEM4.nc" => {
            let element = need_element()?;
            let cache = if op.ends_with(".nc") { ".nc" } else { "" };
            let (regs, addr) = args
                .rsplit_once(',')
                .ok_or_else(|| format!("{op}: expected `{{...}}, [addr]`"))?;
            let regs = vector(regs)?;
            let addr = addr.trim();
            match element.half {
                None => vec![format!(
                    "ld.global{cache}.v4.f32 {{{}}}, {addr};",
                    regs.join(", ")
                )],
                Some(half) => {
                    let mut lines = vec![format!(
                        "ld.global{cache}.v4.b16 {{%half0, %half1, %half2, %half3}}, {addr};"
                    )];
                    for (k, reg) in regs.iter().enumerate() {
                        lines.push(format!("cvt.f32.{half} {reg}, %half{k};"));
                    }
                    lines
                }
            }
        }
        "STORE_ELEM" => {
            let element = need_element()?;
            let (addr, src) = args
                .split_once(',')
                .ok_or_else(|| format!("{op}: expected `[addr], src`"))?;
            let (addr, src) = (addr.trim(), src.trim());
            match element.half {
                None => vec![format!("st.global.f32 {addr}, {src};")],
                Some(half) => vec![
                    format!("cvt.rn.{half}.f32 %half0, {src};"),
                    format!("st.global.b16 {addr}, %half0;"),
                ],
            }
        }
        "STORE_ELEM4" => {
            let element = need_element()?;
            let (addr, regs) = args
                .split_once(',')
                .ok_or_else(|| format!("{op}: expected `[addr], {{...}}`"))?;
            let regs = vector(regs)?;
            let addr = addr.trim();
            match element.half {
                None => vec![format!("st.global.v4.f32 {addr}, {{{}}};", regs.join(", "))],
                Some(half) => {
                    let mut lines: Vec<String> = regs
                        .iter()
                        .enumerate()
                        .map(|(k, reg)| format!("cvt.rn.{half}.f32 %half{k}, {reg};"))
                        .collect();
                    lines.push(format!(
                        "st.global.v4.b16 {addr}, {{%half0, %half1, %half2, %half3}};"
                    ));
                    lines
                }
            }
        }
        "MOMENTUM" => {
            // M_new = beta M + (grad_coef G); U = Nesterov ? beta M_new + (grad_coef G) : M_new.
            let regs: Vec<&str> = args.split(',').map(str::trim).collect();
            let [new_momentum, direction, grad, momentum] = regs[..] else {
                return Err(format!("{op}: expected `m_new, u, g, m`"));
            };
            vec![
                format!("mul.rn.f32 %scaled_grad, %grad_coef, {grad};"),
                format!("fma.rn.f32 {new_momentum}, %beta, {momentum}, %scaled_grad;"),
                format!("fma.rn.f32 {direction}, %beta, {new_momentum}, %scaled_grad;"),
                format!("selp.f32 {direction}, {direction}, {new_momentum}, %is_nesterov;"),
            ]
        }
        "WARP_SUM" => {
            // Butterfly sum over the warp: every lane ends with the same total.
            let value = args.trim();
            let mut lines = Vec::new();
            for offset in [16, 8, 4, 2, 1] {
                lines.push(format!("mov.b32 %shuffled, {value};"));
                lines.push(format!(
                    "shfl.sync.bfly.b32 %shuffled, %shuffled, {offset}, 31, -1;"
                ));
                lines.push("mov.b32 %other, %shuffled;".to_string());
                lines.push(format!("add.rn.f32 {value}, {value}, %other;"));
            }
            lines
        }
        _ => unreachable!("checked by expand_macro"),
    })
}

fn entry_name(ptx: &str) -> Option<String> {
    let after = ptx.split(".entry").nth(1)?;
    let name: String = after
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

fn find_ptxas() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "ptxas.exe" } else { "ptxas" };
    if let Some(path) = env::var_os("PTXAS") {
        // An explicit PTXAS is used as given; a wrong one fails loudly in ptxas_version.
        return Some(PathBuf::from(path));
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var) {
            candidates.push(Path::new(&root).join("bin").join(exe));
        }
    }
    candidates.push(Path::new("/usr/local/cuda/bin").join(exe));
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join(exe)));
    }
    candidates.extend(pip_ptxas(exe));
    candidates.into_iter().find(|path| path.is_file())
}

/// ptxas from PyPI's `nvidia-cuda-nvcc` wheel, in the site-packages python3 knows about
/// (`nvidia/cu13/bin` in CUDA 13 wheels, `nvidia/cuda_nvcc/bin` in CUDA 12 wheels).
fn pip_ptxas(exe: &str) -> Vec<PathBuf> {
    let script = "import site, sys\n\
                  paths = list(sys.path) + site.getsitepackages() + [site.getusersitepackages()]\n\
                  print('\\n'.join(paths))";
    let Ok(output) = Command::new("python3").args(["-c", script]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.is_empty())
        .flat_map(|dir| {
            let dir = Path::new(dir).join("nvidia");
            [
                dir.join("cu13").join("bin").join(exe),
                dir.join("cuda_nvcc").join("bin").join(exe),
            ]
        })
        .collect()
}

fn ptxas_version(ptxas: &Path) -> Result<String, String> {
    let output = Command::new(ptxas)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    if !output.status.success() {
        return Err(format!("{} --version failed", ptxas.display()));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .find(|line| line.contains("release"))
        .unwrap_or("unknown version")
        .trim()
        .to_string())
}

/// Runs ptxas for every module and architecture (in parallel threads).
fn assemble(
    ptxas: &Path,
    modules: &mut [Module],
    cubin_dir: &Path,
    report: &mut String,
) -> Result<(), String> {
    let jobs: Vec<(usize, u32)> = (0..modules.len())
        .flat_map(|m| ARCHES.iter().map(move |&arch| (m, arch)))
        .collect();
    let results: Vec<Result<(PathBuf, String), String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(m, arch)| {
                let module = &modules[m];
                scope.spawn(move || {
                    let cubin = cubin_dir.join(format!("{}.sm_{arch}.cubin", module.name));
                    let output = Command::new(ptxas)
                        .arg(format!("-arch=sm_{arch}"))
                        .args(["-O3", "-v", "-o"])
                        .arg(&cubin)
                        .arg(&module.ptx_path)
                        .output()
                        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
                    let log = String::from_utf8_lossy(&output.stderr).into_owned()
                        + &String::from_utf8_lossy(&output.stdout);
                    if !output.status.success() {
                        return Err(format!(
                            "ptxas failed on {} for sm_{arch}:\n{log}",
                            module.ptx_path.display()
                        ));
                    }
                    Ok((cubin, log))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("ptxas thread panicked".into()))
            })
            .collect()
    });
    for (&(m, arch), result) in jobs.iter().zip(results) {
        let (cubin, log) = result?;
        writeln!(report, "## {} sm_{arch}", modules[m].name).ok();
        report.push_str(&log);
        for line in log.lines() {
            if let Some(spills) = spill_bytes(line)
                && spills > 0
            {
                println!(
                    "cargo:warning=spectral-step: {} spills registers on sm_{arch}: {}",
                    modules[m].name,
                    line.trim()
                );
            }
        }
        modules[m].cubins.push((arch, cubin));
    }
    Ok(())
}

/// Bytes of spill stores plus loads in a ptxas `-v` line, if the line reports them.
fn spill_bytes(line: &str) -> Option<u64> {
    if !line.contains("spill") {
        return None;
    }
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',')
        .collect();
    let mut total = 0;
    for (k, word) in words.iter().enumerate() {
        if *word == "spill"
            && let Some(bytes) = words
                .get(k.wrapping_sub(2))
                .and_then(|n| n.parse::<u64>().ok())
        {
            total += bytes;
        }
    }
    Some(total)
}

fn module_table(modules: &[Module], ptxas_version: Option<&str>, out: &Path) -> String {
    let mut text =
        String::from("// Generated by build.rs: the kernel modules, as PTX and cubins.\n");
    writeln!(
        text,
        "pub(crate) const PTXAS_VERSION: Option<&str> = {ptxas_version:?};"
    )
    .ok();
    writeln!(
        text,
        "pub(crate) const PTXAS_REPORT: &str = include_str!({:?});",
        out.join("ptxas-report.txt")
    )
    .ok();
    text.push_str("pub(crate) static MODULES: &[KernelModule] = &[\n");
    for module in modules {
        writeln!(
            text,
            "    KernelModule {{ name: {:?}, ptx: include_str!({:?}), cubins: &[",
            module.name, module.ptx_path
        )
        .ok();
        for (arch, path) in &module.cubins {
            writeln!(
                text,
                "        Cubin {{ arch: {arch}, image: include_bytes!({path:?}) }},"
            )
            .ok();
        }
        text.push_str("    ] },\n");
    }
    text.push_str("];\n");
    text
}

fn write_if_changed(path: &Path, contents: &str) -> Result<(), String> {
    if fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
