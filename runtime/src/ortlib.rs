//! Finding and loading ONNX Runtime's shared library at run time (`ort`'s `load-dynamic`):
//! nothing is downloaded at build time. The library comes from the PyPI `onnxruntime` wheel,
//! unpacked by `scripts/setup-onnxruntime.sh` into `.local/onnxruntime/`.

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
}

/// Where to look, in order: the flag, the environment variable, `.local/onnxruntime/` under the
/// working directory, beside the executable, and under the repository the executable was built in.
pub fn candidates(flag: Option<&Path>) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = flag {
        c.push(p.to_path_buf());
        return c;
    }
    if let Some(p) = std::env::var_os(ENV_VAR) {
        c.push(PathBuf::from(p));
        return c;
    }
    c.push(Path::new(INSTALL_DIR).join(LIB_NAME));
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        c.push(dir.join(LIB_NAME));
        // target/release/<exe> → the repository root.
        if let Some(root) = dir.parent().and_then(Path::parent) {
            c.push(root.join(INSTALL_DIR).join(LIB_NAME));
        }
    }
    c
}

static LOADED: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// Loads the library once per process (later calls return the first result) and creates the
/// ONNX Runtime environment. Returns the library's path.
pub fn init(flag: Option<&Path>) -> Result<PathBuf, OrtLibError> {
    let cands = candidates(flag);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_says_how_to_install_it() {
        let e = init(Some(Path::new("/nonexistent/libonnxruntime.so.1.31.1"))).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/libonnxruntime.so.1.31.1") && e.contains("setup-onnxruntime.sh"), "{e}");
    }

    #[test]
    fn wrong_release_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("ortlib-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("libonnxruntime.so.1.20.0");
        std::fs::write(&p, b"not a library").unwrap();
        let e = init(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("1.20.0") && e.contains(ORT_VERSION), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
