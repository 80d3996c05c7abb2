//! Incremental detokenization: text pieces as soon as they are valid UTF-8.
//!
//! Decoding token by token breaks multi-byte characters split across tokens and loses
//! spaces that some decoders add only in context. So each step decodes a short window of
//! recent ids twice (with and without the new ones) and emits the difference, holding it
//! back while it ends in U+FFFD (an incomplete character). This is the scheme of TGI's
//! `decode_token`.

use tokenizers::Tokenizer;

use super::GenerateError;

pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Everything before this index has been emitted.
    read_offset: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        IncrementalDecoder { ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, GenerateError> {
        self.ids.push(id);
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, true)
                .map_err(|e| GenerateError::Tokenizer(e.to_string()))
        };
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// What is still held back at the end (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, GenerateError> {
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, true)
                .map_err(|e| GenerateError::Tokenizer(e.to_string()))
        };
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
