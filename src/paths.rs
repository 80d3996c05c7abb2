//! Where the files that the setup prepares are found when config and flags name none.
//!
//! A source checkout keeps them in the repository (`vendor/onnxruntime/lib`,
//! `models/smollm2-135m-instruct`); an installed emberd keeps them under `/usr/lib/emberd`
//! and `/var/lib/emberd`. The first candidate that exists wins.

use std::path::PathBuf;

pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";
const ORT_LIBRARY_NAME: &str = "libonnxruntime.so";

/// Roots to search, most specific first.
fn roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(home) = std::env::var_os("EMBERD_HOME") {
        roots.push(PathBuf::from(home));
    }
    // target/{release,debug}/emberd (or .../deps/test-binary) inside a checkout.
    if let Ok(exe) = std::env::current_exe() {
        for ancestor in exe.ancestors().skip(1).take(4) {
            if ancestor.join("Cargo.toml").is_file() {
                roots.push(ancestor.to_path_buf());
                break;
            }
        }
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    roots
}

fn first_existing(candidates: Vec<PathBuf>) -> Option<PathBuf> {
    candidates.into_iter().find(|p| p.exists())
}

pub fn default_ort_library() -> PathBuf {
    let mut candidates: Vec<PathBuf> = roots()
        .into_iter()
        .map(|r| r.join("vendor/onnxruntime/lib").join(ORT_LIBRARY_NAME))
        .collect();
    candidates.push(PathBuf::from("/usr/lib/emberd").join(ORT_LIBRARY_NAME));
    let fallback = candidates[0].clone();
    first_existing(candidates).unwrap_or(fallback)
}

pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMBERD_MODEL") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = roots()
        .into_iter()
        .map(|r| r.join("models").join(DEFAULT_MODEL_NAME))
        .collect();
    candidates.push(PathBuf::from("/var/lib/emberd/models").join(DEFAULT_MODEL_NAME));
    let fallback = candidates[0].clone();
    first_existing(candidates).unwrap_or(fallback)
}
