//! Incremental detokenization: text pieces as soon as they are valid UTF-8.
//!
//! Decoding token by token breaks multi-byte characters split across tokens and loses
//! spaces that some decoders add only in context. So each step decodes a short window of
//! recent ids twice (with and without the new ones) and emits the difference, holding it
//! back while it ends in U+FFFD (an incomplete character). This is the scheme of TGI's
//! `decode_token`.

use super::tokenizer::Tokenizer;
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
        IncrementalDecoder {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, GenerateError> {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
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
        let decode = |ids: &[u32]| tokenizer.decode(ids, true);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    /// A byte-level tokenizer with no merges: every byte is its own token, so any
    /// multi-byte character is split across tokens.
    fn byte_tokenizer() -> Tokenizer {
        let json = hf_byte_tokenizer().to_string(false).unwrap();
        Tokenizer::from_json(&json, "bytes", 256, &[0]).unwrap()
    }

    fn hf_byte_tokenizer() -> tokenizers::Tokenizer {
        let vocab: Vec<(String, u32)> = ByteLevel::alphabet()
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                vec![],
            )
            .build()
            .unwrap();
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        tokenizer
    }

    #[test]
    fn split_characters_are_held_until_complete_and_pieces_add_up() {
        let tokenizer = byte_tokenizer();
        let text = "Hi 😀 你好, code: fn main() {}\n\tdone ✓";
        let ids = tokenizer.encode(text).unwrap();
        assert!(
            ids.len() > text.chars().count(),
            "multi-byte characters must span tokens"
        );
        let mut decoder = IncrementalDecoder::new();
        let mut pieces = Vec::new();
        for &id in &ids {
            let piece = decoder.push(&tokenizer, id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "emitted a broken character: {piece:?}"
            );
            pieces.push(piece);
        }
        pieces.push(decoder.finish(&tokenizer).unwrap());
        assert_eq!(pieces.concat(), tokenizer.decode(&ids, true).unwrap());
        assert_eq!(pieces.concat(), text);
        // The emoji's four bytes come out as one piece, on its last byte.
        assert!(pieces.iter().any(|p| p == "😀"), "{pieces:?}");
    }

    #[test]
    fn an_unfinished_character_at_the_end_is_flushed_by_finish() {
        let tokenizer = byte_tokenizer();
        let ids = tokenizer.encode("a😀").unwrap();
        let mut decoder = IncrementalDecoder::new();
        let mut out = String::new();
        for &id in &ids[..ids.len() - 1] {
            out.push_str(&decoder.push(&tokenizer, id).unwrap());
        }
        assert_eq!(out, "a");
        assert!(!decoder.finish(&tokenizer).unwrap().is_empty());
    }
}
