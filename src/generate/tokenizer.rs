//! The model's tokenizer, loaded once from tokenizer.json: text to ids for prompts, ids to
//! text for what the model writes, and the bytes of every token, which constrained decoding
//! matches grammars against.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::GenerateError;
use crate::model::ModelPackage;

pub struct Tokenizer {
    hf: Arc<tokenizers::Tokenizer>,
    /// Token bytes and trie for llguidance; `Err` says why this tokenizer cannot be mapped
    /// to bytes (then only constrained requests are refused).
    env: Result<TokEnv, String>,
    /// The `decoder.type` of tokenizer.json ("ByteLevel", "Sequence", ...).
    decoder_type: String,
    /// Counted once: the tokenizers crate builds its whole vocabulary map to count it.
    vocab_size: usize,
}

impl Tokenizer {
    pub fn load(package: &ModelPackage) -> Result<Self, GenerateError> {
        let path = &package.tokenizer_file;
        let source = std::fs::read_to_string(path).map_err(|e| {
            GenerateError::Tokenizer(format!("cannot load {}: {e}", path.display()))
        })?;
        Self::from_json(
            &source,
            &path.display().to_string(),
            package.vocab_size,
            &package.eos_ids,
        )
    }

    /// From the text of a tokenizer.json (`origin` names it in errors). `vocab_size` is the
    /// model's (its logits rows), `eos_ids` its end-of-sequence ids.
    pub fn from_json(
        source: &str,
        origin: &str,
        vocab_size: usize,
        eos_ids: &[u32],
    ) -> Result<Self, GenerateError> {
        let cannot = |e: &dyn std::fmt::Display| {
            GenerateError::Tokenizer(format!("cannot load {origin}: {e}"))
        };
        let hf: tokenizers::Tokenizer = source.parse().map_err(|e| cannot(&e))?;
        let json: serde_json::Value = serde_json::from_str(source).map_err(|e| cannot(&e))?;
        let decoder_type = json["decoder"]["type"]
            .as_str()
            .unwrap_or("none")
            .to_string();
        let hf = Arc::new(hf);
        let env = byte_env(&json, hf.clone(), vocab_size, eos_ids).map_err(|e| {
            let reason =
                format!("{origin} (decoder {decoder_type}) cannot be mapped to token bytes: {e}");
            log::warn!("{reason}; constrained output (response_format) is unavailable");
            reason
        });
        let known = hf.get_vocab_size(true);
        Ok(Tokenizer {
            hf,
            env,
            decoder_type,
            vocab_size: known,
        })
    }

    /// Ids of `text`, without special tokens added (templates write their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        let encoding = self
            .hf
            .encode(text, false)
            .map_err(|e| GenerateError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, GenerateError> {
        self.hf
            .decode(ids, skip_special)
            .map_err(|e| GenerateError::Tokenizer(e.to_string()))
    }

    /// What llguidance needs: each token's bytes in a trie, and a tokenize function.
    /// `Err` says why this tokenizer cannot be mapped to bytes.
    pub fn token_env(&self) -> Result<&TokEnv, &str> {
        self.env.as_ref().map_err(String::as_str)
    }

    /// The bytes token `id` stands for; special tokens start with 0xFF (llguidance's marker),
    /// so no grammar text can match them.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let env = self.env.as_ref().ok()?;
        let trie = env.tok_trie();
        (id < trie.vocab_size() as u32).then(|| trie.token(id).to_vec())
    }

    /// How many ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn decoder_type(&self) -> &str {
        &self.decoder_type
    }
}

/// Token bytes from tokenizer.json (byte-level or byte-fallback decoders), padded to the
/// model's vocabulary: logits rows can be longer than the tokenizer (padding ids).
fn byte_env(
    json: &serde_json::Value,
    hf: Arc<tokenizers::Tokenizer>,
    vocab_size: usize,
    eos_ids: &[u32],
) -> anyhow::Result<TokEnv> {
    let mut words = llguidance::token_bytes_from_tokenizer_json(json)?;
    let vocab = words.len().max(vocab_size);
    words.resize(vocab, Vec::new());
    let eos = *eos_ids
        .first()
        .ok_or_else(|| anyhow::anyhow!("the package names no end-of-sequence token"))?;
    let info = TokRxInfo::new(vocab as u32, eos);
    let trie = TokTrie::from(&info, &words);
    Ok(Arc::new(ByteTokenizer { trie, hf }))
}

struct ByteTokenizer {
    trie: TokTrie,
    hf: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for ByteTokenizer {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // The real tokenizer where it can take the text; a byte string that is not UTF-8
        // (a cut character) falls back to the trie's greedy split.
        match std::str::from_utf8(s) {
            Ok(text) => match self.hf.encode(text, false) {
                Ok(encoding) => encoding.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }

    /// Not claimed: emberd never forces tokens, so nothing relies on it.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::constraint::Grammars;
    use crate::protocol::ResponseFormat;

    /// A word-level tokenizer: its tokens are words, not bytes, so no grammar can be matched
    /// against them.
    const WORD_LEVEL: &str = r###"{"version":"1.0","truncation":null,"padding":null,
        "added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},
        "post_processor":null,"decoder":{"type":"WordPiece","prefix":"##","cleanup":true},
        "model":{"type":"WordLevel","vocab":{"on":0,"off":1,"[UNK]":2},"unk_token":"[UNK]"}}"###;

    #[test]
    fn a_tokenizer_without_token_bytes_serves_text_and_refuses_formats_naming_why() {
        let tokenizer = Tokenizer::from_json(WORD_LEVEL, "words.json", 3, &[2]).unwrap();
        assert_eq!(tokenizer.decoder_type(), "WordPiece");
        assert_eq!(tokenizer.encode("on off").unwrap(), vec![0, 1]);
        let reason = tokenizer.token_env().err().unwrap();
        assert!(reason.contains("WordPiece"), "{reason}");
        let grammars = Grammars::new(&tokenizer, &[2]);
        assert!(grammars
            .compile(&ResponseFormat::Text {})
            .unwrap()
            .is_none());
        let refused = grammars
            .compile(&ResponseFormat::JsonObject {})
            .unwrap_err();
        assert_eq!(refused.code(), crate::protocol::ErrorCode::BadRequest);
        assert!(refused.to_string().contains("WordPiece"), "{refused}");
    }
}
