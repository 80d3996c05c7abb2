//! The KV cache of one sequence.
//!
//! The tokens it holds are tracked here, engine-neutrally; the tensors themselves are the
//! engine's own type (ONNX Runtime values, tract tensors), so that an engine can hand its
//! `present` outputs back as the next step's `past` without copying.

pub struct KvCache {
    tokens: Vec<u32>,
    /// The row of the engine's batch buffers that holds this sequence's keys and values
    /// (continuous batching, see `Engine::decode_batch`); None: its tensors are in `store`.
    slot: Option<usize>,
    /// Per-layer keys and values, in the representation of the engine that made them.
    pub(crate) store: KvStore,
}

/// Whose tensors a cache holds: an engine meeting another's is an error, not a silent reset.
pub(crate) enum KvStore {
    Empty,
    /// ONNX Runtime, a graph that returns a grown copy of the cache every step.
    OrtGrown(super::ort::GrownKv),
    /// ONNX Runtime, buffers the graph appends to in place.
    OrtInPlace(super::ort::InPlaceKv),
    #[cfg(feature = "tract")]
    Tract(super::tract::TractKv),
}

impl KvStore {
    pub(crate) fn owner(&self) -> &'static str {
        match self {
            KvStore::Empty => "no",
            KvStore::OrtGrown(_) => "ONNX Runtime (grown)",
            KvStore::OrtInPlace(_) => "ONNX Runtime (in place)",
            #[cfg(feature = "tract")]
            KvStore::Tract(_) => "tract",
        }
    }
}

impl KvCache {
    pub fn new() -> Self {
        KvCache {
            tokens: Vec::new(),
            slot: None,
            store: KvStore::Empty,
        }
    }

    /// The cache of batch slot `slot`: its keys and values live in the engine's row `slot`.
    pub fn for_slot(slot: usize) -> Self {
        KvCache {
            slot: Some(slot),
            ..KvCache::new()
        }
    }

    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    /// Moves the tensors out, leaving the cache's store empty (its tokens stay).
    pub(crate) fn take_store(&mut self) -> KvStore {
        std::mem::replace(&mut self.store, KvStore::Empty)
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
        self.store = KvStore::Empty;
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
