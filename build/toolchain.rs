//! Finding ptxas and assembling the expanded modules with it.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The architectures every module is assembled for (A100, RTX 30xx/A-series, Ada, Hopper).
pub const ARCHES: [u32; 4] = [80, 86, 89, 90];

/// An expanded module on disk and the cubins assembled from it.
pub struct Module {
    /// The entry name (also the module's name).
    pub name: String,
    /// The expanded PTX.
    pub ptx_path: PathBuf,
    /// `(arch, path)` per assembled cubin.
    pub cubins: Vec<(u32, PathBuf)>,
}

/// ptxas: `PTXAS` if set (used as given, so a wrong one fails loudly), else the first of
/// `CUDA_PATH/bin`, `CUDA_HOME/bin`, `/usr/local/cuda/bin`, `PATH` and pip's
/// `nvidia-cuda-nvcc` wheel that holds one.
pub fn find_ptxas() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "ptxas.exe" } else { "ptxas" };
    if let Some(path) = env::var_os("PTXAS") {
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

/// The release line of `ptxas --version`.
pub fn ptxas_version(ptxas: &Path) -> Result<String, String> {
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

/// Runs ptxas for every module and architecture (in parallel threads), appending each `-v`
/// log to `report`; a spill is a cargo warning.
pub fn assemble(
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
                scope.spawn(move || assemble_one(ptxas, module, arch, cubin_dir))
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
            if spill_bytes(line).is_some_and(|spills| spills > 0) {
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

fn assemble_one(
    ptxas: &Path,
    module: &Module,
    arch: u32,
    cubin_dir: &Path,
) -> Result<(PathBuf, String), String> {
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
