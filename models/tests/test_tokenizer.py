"""tokenizer.json against an independent byte-level BPE over the GGUF's own vocab and merges."""
from __future__ import annotations

import json

import pytest
import regex
from conftest import GEN, tiny_dir

import convert_gguf as cg

GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
DIGIT_SPLIT = regex.compile(r"(\p{N})")

SAMPLES = {
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "digits": "Pi is 3.14159, e is 2.71828 and 1234567890 + 42 = 1234567932.",
    "whitespace": "  leading\tand\ttabs\n\n\nthree newlines   trailing   \r\n end ",
    "cjk": "你好，世界。日本語のテキストと한국어 텍스트.",
    "emoji": "Party 🎉🎉 thumbs 👍🏽 flag 🇫🇷 family 👨‍👩‍👧 ok",
    "code": "def f(x: int) -> int:\n    return x ** 2  # square\n\nfor i in range(10):\n    print(f(i))\n",
    "mixed": "naïve café — «quotes» ‘single’ x²+y² ≤ 10⁶ ½",
}


def _bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class IndependentBPE:
    """GPT-2 style BPE: specials split out, each digit isolated (llama.cpp 'smollm'), then the
    GPT-2 regex, byte->unicode mapping, and lowest-rank-first merging."""

    def __init__(self, tokens, types, merges):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        specials = sorted((t for t, ty in zip(tokens, types) if ty == 3), key=len, reverse=True)
        self.special_re = regex.compile("|".join(regex.escape(s) for s in specials))
        self.b2u = _bytes_to_unicode()

    def _bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == 1 << 60:
                break
            a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        return [self.vocab[p] for p in parts]

    def _ordinary(self, text):
        ids = []
        for piece in DIGIT_SPLIT.split(text):
            if not piece:
                continue
            for w in GPT2_SPLIT.findall(piece):
                ids += self._bpe("".join(self.b2u[b] for b in w.encode("utf-8")))
        return ids

    def encode(self, text):
        ids, pos = [], 0
        for m in self.special_re.finditer(text):
            ids += self._ordinary(text[pos:m.start()])
            ids.append(self.vocab[m.group()])
            pos = m.end()
        return ids + self._ordinary(text[pos:])


@pytest.fixture(scope="module")
def gguf_tok(gguf_path):
    import gguf
    r = gguf.GGUFReader(str(gguf_path))
    f = r.fields
    return {"tokens": f["tokenizer.ggml.tokens"].contents(),
            "types": [int(x) for x in f["tokenizer.ggml.token_type"].contents()],
            "merges": f["tokenizer.ggml.merges"].contents(),
            "template": f["tokenizer.chat_template"].contents(),
            "pre": f["tokenizer.ggml.pre"].contents()}


@pytest.fixture(scope="module")
def hf_tok(pkg):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(pkg / "tokenizer.json"))


def test_gguf_is_smollm_bpe(gguf_tok):
    assert gguf_tok["pre"] == "smollm"
    assert sum(1 for t in gguf_tok["types"] if t == 3) == 17


def test_chat_prompts_match_gguf_vocab(reference, gguf_tok, hf_tok):
    ref = IndependentBPE(gguf_tok["tokens"], gguf_tok["types"], gguf_tok["merges"])
    assert len(reference["prompts"]) >= 3
    for p in reference["prompts"]:
        msgs = ([{"role": "system", "content": p["system"]}] if p["system"] else []) + p["messages"]
        text = cg.render_chat(gguf_tok["template"], msgs, True)
        assert text == p["text"]
        want = ref.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False).ids == want
        assert p["prompt_ids"] == want


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_ids_and_round_trip(kind, gguf_tok, hf_tok):
    text = SAMPLES[kind]
    ref = IndependentBPE(gguf_tok["tokens"], gguf_tok["types"], gguf_tok["merges"])
    ids = hf_tok.encode(text, add_special_tokens=False).ids
    assert ids == ref.encode(text)
    assert hf_tok.decode(ids, skip_special_tokens=False) == text


def test_special_tokens(hf_tok, pkg):
    cfg = json.loads((pkg / "tokenizer_config.json").read_text())
    assert hf_tok.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False).ids[0] == 1
    assert hf_tok.token_to_id(cfg["eos_token"]) == 2 and hf_tok.token_to_id(cfg["bos_token"]) == 1
    assert hf_tok.encode("", add_special_tokens=True).ids == []  # no BOS added
    text = "<|im_start|>assistant\nSure: 1+1=2 👍<|im_end|>"
    assert hf_tok.decode(hf_tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    specials = [t for t in json.loads((pkg / "tokenizer.json").read_text())["added_tokens"] if t["special"]]
    assert [t["id"] for t in specials] == list(range(17))


def test_tiny_tokenizer_matches_its_vocab():
    """The tiny models' tokenizer.json against the independent BPE over its own GGUF."""
    import gguf
    from tokenizers import Tokenizer
    d = tiny_dir("q4")
    f = gguf.GGUFReader(str(d / "source.gguf")).fields
    ref = IndependentBPE(f["tokenizer.ggml.tokens"].contents(),
                         [int(x) for x in f["tokenizer.ggml.token_type"].contents()],
                         f["tokenizer.ggml.merges"].contents())
    for name in ("optimum", "optimum-merged", "genai", "q4"):
        tk = Tokenizer.from_file(str(GEN / name / "tokenizer.json"))
        assert 300 <= tk.get_vocab_size() <= 512
        for text in list(SAMPLES.values()) + ["<|im_start|>user\nHello, how are you?<|im_end|>\n"]:
            ids = tk.encode(text, add_special_tokens=False).ids
            assert ids == ref.encode(text)
            assert tk.decode(ids, skip_special_tokens=False) == text
