//! Integration tests of the model crate on the real default model (fetched on first use).

mod errors;
mod hf_folder;
mod reference;
mod wgpu;

use std::sync::OnceLock;

use arbor_model::backend::cpu::CpuBackend;
use arbor_model::{Engine, EngineOptions, Model};

/// The default model, loaded once per test binary.
pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = arbor_model::fetch::ensure_default_model(&mut |ev| eprintln!("{ev:?}"))
            .expect("fetch default model");
        Model::load(&path).expect("load default model")
    })
}

/// A fresh engine over the shared model.
pub fn engine_with(options: EngineOptions) -> Engine {
    let m = model();
    Engine::new(
        Box::new(CpuBackend::new(m.config.clone(), m.weights.clone())),
        options,
    )
}

/// A fresh engine with default limits.
pub fn engine() -> Engine {
    engine_with(EngineOptions::default())
}
