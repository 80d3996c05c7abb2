//! The KV cache of one sequence.
//!
//! The tokens it holds are tracked here, engine-neutrally; the tensors themselves are the
//! engine's own type (ONNX Runtime values, tract tensors), kept behind `Any` so that an
//! engine can hand its `present` outputs back as the next step's `past` without copying.

use std::any::Any;

pub struct KvCache {
    tokens: Vec<u32>,
    /// Per-layer keys and values in the engine's own representation; None when empty.
    pub(crate) store: Option<Box<dyn Any + Send>>,
}

impl KvCache {
    pub fn new() -> Self {
        KvCache {
            tokens: Vec::new(),
            store: None,
        }
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The ids whose keys and values are cached, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn clear(&mut self) {
        self.tokens.clear();
        self.store = None;
    }

    /// Keeps the first `len` positions' ids; the engine trims its tensors to match.
    pub(crate) fn truncate_tokens(&mut self, len: usize) {
        self.tokens.truncate(len);
    }

    pub(crate) fn extend(&mut self, ids: &[u32]) {
        self.tokens.extend_from_slice(ids);
    }
}

/// Length of the common prefix of two id sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Default for KvCache {
    fn default() -> Self {
        Self::new()
    }
}
