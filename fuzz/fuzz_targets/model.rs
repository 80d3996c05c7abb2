//! The default model's tokenizer, template and grammars, loaded once per fuzzing process.
// Each target includes this module and uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use emberd::config::Config;
use emberd::generate::prompt::Prompter;
use emberd::model::ModelPackage;
use emberd::protocol::RequestPolicy;

pub struct Model {
    pub prompter: Prompter,
    pub eos_ids: Vec<u32>,
}

/// `EMBERD_FUZZ_MODEL`, else the package `models/prepare.sh` makes.
pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = std::env::var_os("EMBERD_FUZZ_MODEL").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/smollm2-135m-instruct"),
            PathBuf::from,
        );
        let package = ModelPackage::load(&dir).unwrap_or_else(|e| {
            panic!("fuzz targets need a model package (run models/prepare.sh): {e}")
        });
        Model {
            prompter: Prompter::load(&package).expect("the package's tokenizer and template load"),
            eos_ids: package.eos_ids.clone(),
        }
    })
}

pub fn prompter() -> &'static Prompter {
    &model().prompter
}

/// The daemon's policy with the default config.
pub fn policy() -> &'static RequestPolicy {
    static POLICY: OnceLock<RequestPolicy> = OnceLock::new();
    POLICY.get_or_init(|| Config::default().request_policy())
}
