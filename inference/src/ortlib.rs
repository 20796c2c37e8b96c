//! Finding and loading ONNX Runtime's shared library at run time (`ort`'s `load-dynamic`):
//! nothing is downloaded at build time. The library comes from the PyPI `onnxruntime` wheel,
//! unpacked by `scripts/setup-onnxruntime.sh` into `.local/onnxruntime/`; for the CUDA execution
//! provider, from the `onnxruntime-gpu` wheel and NVIDIA's CUDA 13 and cuDNN 9 wheels, installed
//! by `scripts/setup-onnxruntime.sh --gpu` into `.local/onnxruntime-gpu/`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The ONNX Runtime release this toolchain is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";
/// The library's file name in the wheel (which has no unversioned `libonnxruntime.so`).
pub const LIB_NAME: &str = "libonnxruntime.so.1.31.1";
/// Environment variable naming the library (the one `ort` itself reads, too).
pub const ENV_VAR: &str = "ORT_DYLIB_PATH";
/// Where the setup script installs the library, relative to the repository root.
pub const INSTALL_DIR: &str = ".local/onnxruntime";
/// Where `scripts/setup-onnxruntime.sh --gpu` installs onnxruntime-gpu and NVIDIA's libraries
/// (a pip `--target` folder: `onnxruntime/capi/` and `nvidia/` side by side).
pub const GPU_INSTALL_DIR: &str = ".local/onnxruntime-gpu";
/// The library's place in a pip folder.
const WHEEL_LIB: &str = "onnxruntime/capi";
/// The NVIDIA libraries the CUDA execution provider links, relative to the pip folder that holds
/// `onnxruntime/`, in the order onnxruntime's own Python `preload_dlls` loads them (cuBLASLt
/// before cuBLAS, which needs it).
const CUDA_LIBS: &[&str] = &[
    "nvidia/cu13/lib/libcublasLt.so.13",
    "nvidia/cu13/lib/libcublas.so.13",
    "nvidia/cu13/lib/libnvrtc.so.13",
    "nvidia/cu13/lib/libcurand.so.10",
    "nvidia/cu13/lib/libcufft.so.12",
    "nvidia/cu13/lib/libcudart.so.13",
    "nvidia/cudnn/lib/libcudnn.so.9",
];

/// Why ONNX Runtime could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum OrtLibError {
    #[error(
        "ONNX Runtime {ORT_VERSION} not found (looked for {looked}); run scripts/setup-onnxruntime.sh, \
         or pass --ort-lib PATH, or set {ENV_VAR}"
    )]
    NotFound { looked: String },
    #[error("{path}: cannot load ONNX Runtime: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error(
        "{path}: ONNX Runtime {found} found, but this build needs {ORT_VERSION} (run scripts/setup-onnxruntime.sh)"
    )]
    Version { path: PathBuf, found: String },
    #[error("{path}: cannot load this CUDA library: {reason}")]
    CudaLib { path: PathBuf, reason: String },
}

/// The library as `scripts/setup-onnxruntime.sh` installs it in the repository `root`.
pub fn installed(root: &Path) -> PathBuf {
    root.join(INSTALL_DIR).join(LIB_NAME)
}

/// Where to look, in order: the flag, the environment variable, then the default installs under
/// the working directory and under the repository the executable was built in, and beside the
/// executable. With `cuda`, onnxruntime-gpu's install (`.local/onnxruntime-gpu/`) comes first.
pub fn candidates(flag: Option<&Path>, cuda: bool) -> Vec<PathBuf> {
    if let Some(p) = flag {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os(ENV_VAR) {
        return vec![PathBuf::from(p)];
    }
    let mut roots = vec![PathBuf::new()];
    let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    // target/release/<exe> → the repository root.
    if let Some(root) = exe_dir.as_deref().and_then(Path::parent).and_then(Path::parent) {
        roots.push(root.to_path_buf());
    }
    let gpu = roots.iter().map(|r| r.join(GPU_INSTALL_DIR).join(WHEEL_LIB).join(LIB_NAME));
    let cpu = roots.iter().map(|r| installed(r));
    let mut c: Vec<PathBuf> = if cuda { gpu.chain(cpu).collect() } else { cpu.collect() };
    c.extend(exe_dir.map(|d| d.join(LIB_NAME)));
    c
}

static LOADED: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// Loads the library once per process (later calls return the first result) and creates the
/// ONNX Runtime environment. Returns the library's path.
pub fn init(flag: Option<&Path>, cuda: bool) -> Result<PathBuf, OrtLibError> {
    let cands = candidates(flag, cuda);
    let path = match cands.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => {
            let looked = cands.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(OrtLibError::NotFound { looked });
        }
    };
    // The wheel's file name carries the version: refuse another release before dlopen-ing it.
    let versioned = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("libonnxruntime.so."));
    if let Some(v) = versioned.filter(|v| *v != ORT_VERSION).map(str::to_string) {
        return Err(OrtLibError::Version { path, found: v });
    }
    let loaded = LOADED.get_or_init(|| {
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        let env = builder.with_name("footwear").build().map_err(|e| e.to_string())?;
        Ok((path.clone(), env))
    });
    match loaded {
        Ok((p, _)) => Ok(p.clone()),
        Err(reason) => Err(OrtLibError::Load { path, reason: reason.clone() }),
    }
}

/// The process's ONNX Runtime environment ([`init`] first).
pub(crate) fn environment() -> Option<&'static ort::environment::Environment> {
    LOADED.get().and_then(|r| r.as_ref().ok()).map(|(_, e)| e)
}

static CUDA_PRELOADED: OnceLock<Result<Vec<PathBuf>, (PathBuf, String)>> = OnceLock::new();

/// Makes the NVIDIA libraries that pip installed beside `lib` (the wheel layout:
/// `SITE/onnxruntime/capi/libonnxruntime.so.*` and `SITE/nvidia/...`) visible to the CUDA
/// execution provider, which links them by name but carries no search path: each is loaded once
/// with `RTLD_GLOBAL`, as onnxruntime's Python package does. Libraries not there are left to the
/// system's search path (`LD_LIBRARY_PATH`, a CUDA install). Returns the ones loaded.
pub fn preload_cuda_libraries(lib: &Path) -> Result<Vec<PathBuf>, OrtLibError> {
    let loaded = CUDA_PRELOADED.get_or_init(|| {
        let Some(site) = lib.parent().and_then(Path::parent).and_then(Path::parent) else { return Ok(vec![]) };
        let mut loaded = Vec::new();
        for rel in CUDA_LIBS {
            let path = site.join(rel);
            if !path.is_file() {
                continue;
            }
            use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
            // SAFETY: NVIDIA's libraries run no code at load time beyond their own
            // initialisers; they stay loaded for the life of the process.
            let library = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
                .map_err(|e| (path.clone(), e.to_string()))?;
            std::mem::forget(library);
            loaded.push(path);
        }
        Ok(loaded)
    });
    loaded.clone().map_err(|(path, reason)| OrtLibError::CudaLib { path, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_says_how_to_install_it() {
        let e = init(Some(Path::new("/nonexistent/libonnxruntime.so.1.31.1")), false).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/libonnxruntime.so.1.31.1") && e.contains("setup-onnxruntime.sh"), "{e}");
    }

    #[test]
    fn wrong_release_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("ortlib-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("libonnxruntime.so.1.20.0");
        std::fs::write(&p, b"not a library").unwrap();
        let e = init(Some(&p), false).unwrap_err().to_string();
        assert!(e.contains("1.20.0") && e.contains(ORT_VERSION), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cuda_looks_first_in_the_gpu_install() {
        if std::env::var_os(ENV_VAR).is_some() {
            return; // the variable overrides every default
        }
        let c = candidates(None, true);
        assert!(c[0].ends_with(".local/onnxruntime-gpu/onnxruntime/capi/libonnxruntime.so.1.31.1"), "{c:?}");
        assert!(c.iter().any(|p| p.ends_with(".local/onnxruntime/libonnxruntime.so.1.31.1")), "{c:?}");
        assert!(candidates(None, false).iter().all(|p| !p.to_string_lossy().contains("onnxruntime-gpu")));
    }
}
