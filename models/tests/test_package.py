"""Package files, stored greedy references, chat-template fixtures, and tract (when installed)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import CONVERTED, GEN, ROOT, TINY, TractDecoder, model_file, teacher_forced, tiny_cfg, tiny_dir

import convert_gguf as cg

COMMON_WORDS = {"the", "a", "is", "of", "and", "to", "in", "it", "you", "your", "for", "with", "that",
                "are", "can", "by", "as", "this", "be", "or", "on"}


def test_manifest_and_configs(pkg, manifest, gguf_path):
    assert manifest["format"] == 1 and manifest["name"] == "smollm2-135m-instruct"
    for engine in ("ort", "tract"):
        assert (pkg / manifest["files"][engine]).is_file()
    assert manifest["source"]["gguf"] == gguf_path.name
    assert manifest["source"]["sha256"] == cg.sha256_file(gguf_path)
    cfg = json.loads((pkg / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]) == (30, 9, 3, 576, 64, 49152)
    assert cfg["max_position_embeddings"] == 8192 and cfg["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    gen = json.loads((pkg / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1 and 2 in gen["eos_token_id"]
    tc = json.loads((pkg / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["add_bos_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", False)
    assert "<|im_start|>" in tc["chat_template"]


def _io(path):
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    ins = {i.name: (i.type.tensor_type.elem_type, dims(i)) for i in m.graph.input if i.name not in init}
    outs = {o.name: (o.type.tensor_type.elem_type, dims(o)) for o in m.graph.output}
    return m, ins, outs


def test_default_model_io_and_ops(pkg, manifest):
    m, ins, outs = _io(pkg / manifest["files"]["tract"])
    I64, F32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert ins["input_ids"] == (I64, ["batch_size", "sequence_length"])
    assert ins["attention_mask"] == (I64, ["batch_size", "total_sequence_length"])
    assert ins["position_ids"] == (I64, ["batch_size", "sequence_length"])
    for i in range(30):
        for kv in ("key", "value"):
            assert ins[f"past_key_values.{i}.{kv}"] == (F32, ["batch_size", 3, "past_sequence_length", 64])
            assert outs[f"present.{i}.{kv}"] == (F32, ["batch_size", 3, "total_sequence_length", 64])
    # the last position only (convert_gguf --full-logits gives Optimum's [batch, seq, vocab])
    assert outs["logits"] == (F32, ["batch_size", 1, 49152])
    assert len(ins) == 63 and len(outs) == 61
    for engine in ("ort", "tract"):
        m, _, _ = _io(pkg / manifest["files"][engine])
        ops = Counter(n.op_type for n in m.graph.node)
        bits = Counter({a.name: a.i for a in n.attribute}["bits"] for n in m.graph.node
                       if n.op_type == "MatMulNBits")
        assert bits[4] >= 30 * 4, bits                      # fused qkv, o, gate_up, down
        if engine == "tract":  # tract 0.23.9: MatMulNBits bits 4 (and 2) only
            assert set(bits) == {4}, bits
        else:
            assert set(bits) <= {4, 8} and bits[8] <= 1, bits  # 8 only for the output layer
        assert {o.domain: o.version for o in m.opset_import}[""] == 17
        # no INT4 tensors, no DequantizeLinear (tract 0.23.9 loads neither)
        assert "DequantizeLinear" not in ops
        assert all(i.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
                   for i in m.graph.initializer)


def test_greedy_reference_is_coherent(reference):
    assert len(reference["prompts"]) >= 3
    for p in reference["prompts"]:
        ids, text = p["greedy_ids"], p["greedy_text"]
        assert len(ids) >= 40, (len(ids), text)
        words = [w.strip(".,:;!?'\"()").lower() for w in text.split()]
        assert sum(w in COMMON_WORDS for w in words) >= 5, text
        assert sum(c.isascii() for c in text) / len(text) > 0.97, text
        grams = Counter(tuple(ids[i:i + 4]) for i in range(len(ids) - 3))
        assert max(grams.values()) <= 3, f"repetition loop: {text!r}"
        assert "<|im_start|>" not in text
    topics = " ".join(p["greedy_text"] for p in reference["prompts"]).lower()
    for word in ("paris", "rayleigh", "water", "tomato"):
        assert word in topics


def test_greedy_reference_reproduces(pkg, reference, converted):
    """Greedy again with onnxruntime: the first 24 tokens of the stored run (the full run is
    bit-identical on the machine that made it; other CPUs may round int8 kernels differently)."""
    dec = cg.OrtDecoder(cg.ort_session(pkg / reference["model_file"]), converted[0])
    p = reference["prompts"][1]
    gen, _ = dec.greedy(p["prompt_ids"], 24, set(reference["eos_token_ids"]))
    assert gen == p["greedy_ids"][:24]


def test_template_fixtures_match_package(pkg):
    fx = json.loads((ROOT / "tests" / "fixtures" / "templates.json").read_text())
    tc = json.loads((pkg / "tokenizer_config.json").read_text())
    assert fx["template_source"] == "smollm2" and fx["chat_template"] == tc["chat_template"]
    kinds = set()
    for c in fx["cases"]:
        got = cg.render_chat(tc["chat_template"], c["messages"], c["add_generation_prompt"],
                             fx["bos_token"], fx["eos_token"])
        assert got == c["expected"], c["name"]
        kinds.add(c["name"])
    assert {"single_user", "system_user", "multi_turn", "no_generation_prompt"} <= kinds


def test_tiny_packages_layouts():
    for name in TINY:
        d = tiny_dir(name)
        for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
            assert (d / f).is_file(), (name, f)
        cfg = json.loads((d / "config.json").read_text())
        assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 64, 4, 2, 16)
        _, ins, outs = _io(d / model_file(d))
        assert ("position_ids" in ins) == (name != "genai")
        assert ("use_cache_branch" in ins) == (name == "optimum-merged")
        assert "past_key_values.1.value" in ins and "present.1.value" in outs and "logits" in outs
        tc = json.loads((d / "tokenizer_config.json").read_text())
        assert "<|im_start|>" in tc["chat_template"]
    gc = json.loads((GEN / "genai" / "genai_config.json").read_text())
    dec = gc["model"]["decoder"]
    assert dec["filename"] == "model.onnx" and dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert not (GEN / "genai" / "emberd.json").exists()
    man = json.loads((GEN / "optimum-merged" / "emberd.json").read_text())
    assert man["files"] == {"ort": "decoder_model_merged.onnx", "tract": "decoder_model_merged.onnx"}


# ----------------------------------------------------------------------------- tract
@pytest.fixture(scope="module")
def tract_mod():
    return pytest.importorskip("tract", reason="tract Python bindings not installed (optional)")


@pytest.mark.parametrize("name", TINY + CONVERTED[1:])
def test_tiny_models_in_tract(tract_mod, name):
    d = tiny_dir(name)
    ref = json.loads((d / "reference.json").read_text())
    dec = TractDecoder(d / model_file(d, "tract"), tiny_cfg(d))
    suffix = "_exact" if name in CONVERTED else ""   # tract computes what accuracy_level 0 does
    for c in ref["cases"]:
        path = c["greedy_ids" + suffix]
        got = teacher_forced(dec, c["prompt_ids"], path[:-1])
        assert np.abs(got - np.array(c["step_logits" + suffix])).max() <= 1e-3
        assert [int(x) for x in got.argmax(-1)] == path


def test_default_model_in_tract(tract_mod, pkg, manifest, reference, converted, numpy_logits, long_prompt):
    """tract loads the file named for it, matches the numpy reference (it does not quantize
    activations) and reproduces the start of greedy_ids_exact."""
    dec = TractDecoder(pkg / manifest["files"]["tract"], converted[0])
    # one position at a time: the graph returns the last position's logits only
    logits = teacher_forced(dec, long_prompt[:1], long_prompt[1:])
    d = np.abs(logits - numpy_logits)
    assert d.max() <= 1e-3 and (logits.argmax(-1) == numpy_logits.argmax(-1)).all()
    p = reference["prompts"][1]
    gen, _ = dec.greedy(p["prompt_ids"], 16, set(reference["eos_token_ids"]))
    assert gen == p["greedy_ids_exact"][:16]
