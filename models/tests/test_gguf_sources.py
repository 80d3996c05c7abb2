"""The GGUFs people download: k-quants (and llama.cpp's 5-bit fallbacks), Qwen2 and Llama 3,
through the converter, against llama.cpp's own decoding (the gguf package) and the numpy
reference; llama.cpp's logits where llama-cpp-python is installed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_dir

import convert_gguf as cg
import kquants
import llama_onnx as lo
import reference_numpy as rn

SOURCES = ("kq-llama3", "kq-qwen2")
IDS = [1, 40, 41, 42, 300, 301, 17, 18, 19, 250, 251, 252, 99, 98, 120, 121, 122, 123, 124, 125,
       126, 127, 128, 129, 130, 131, 132, 133, 134, 135, 136, 137]


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_the_converter_decodes_each_type_as_llama_cpp_does(kind):
    """Bit for bit: the converter's exact form of a tensor equals gguf.quants.dequantize."""
    import gguf
    qt = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(7).standard_normal((24, 512)).astype(np.float32)
    blocks = kquants.quantize(w, kind) if kind in kquants.BYTES else gguf.quants.quantize(w, qt)

    class Tensor:  # what GGUFReader yields, for _weight_from_tensor
        tensor_type, data, shape, name = qt, blocks, (512, 24), kind
    ours = cg._weight_from_tensor(Tensor())
    want = gguf.quants.dequantize(blocks, qt).reshape(24, 512)
    assert np.array_equal(ours.dequant(), want), np.abs(ours.dequant() - want).max()
    # and the encoder used for the test GGUFs is a fair quantizer (not all zeros)
    assert np.abs(want - w).max() < 0.35 * np.abs(w).max()


def _session(model):
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _compare(got, want, tol):
    d = np.abs(np.asarray(got, np.float64) - want)
    assert d.max() <= tol, f"max |dlogit| {d.max():.3g} > {tol}"
    assert (np.argmax(got, -1) == np.argmax(want, -1)).all(), "argmax differs"
    return float(d.max())


@pytest.mark.parametrize("name", SOURCES)
def test_every_form_reproduces_the_numpy_reference(name):
    """The plain graph with the 5/6-bit weights as 8-bit MatMulNBits (ONNX Runtime) and as
    4-bit planes (tract's form), and the GroupQueryAttention graph, all at accuracy_level 0,
    against the float64 numpy forward over gguf's decoding: the architecture (Qwen2's biases
    and NEOX rotary, Llama 3's rope_freqs) and the k-quant blocks both show up here."""
    d = tiny_dir(name)
    cfg, W, _, meta = cg.read_gguf(d / "source.gguf")
    want = rn.GGUFLlama(d / "source.gguf").forward(IDS)
    assert (cfg.rope_factors is not None) == (name == "kq-llama3")
    assert any(k.endswith(".bias") for k in W) == (name == "kq-qwen2")
    kinds = {type(w).__name__ for w in W.values()}
    assert {"Q41W", "QKW"} <= kinds, kinds
    for opts in (lo.BuildOptions(accuracy_level=0),
                 lo.BuildOptions(accuracy_level=0, kq="split4"),
                 lo.BuildOptions(accuracy_level=0, fuse=False),
                 lo.BuildOptions(accuracy_level=0, attention="gqa")):
        dec = cg.OrtDecoder(_session(lo.build_model(cfg, W, opts)), cfg)
        if opts.attention == "gqa":
            got = np.stack([dec.forward(IDS[:n], dec.empty_past())[0][0, -1] for n in range(1, len(IDS) + 1)])
        else:
            got = dec.forward(IDS, dec.empty_past())[0][0]
        _compare(got, want, 1e-3)


@pytest.mark.parametrize("name", SOURCES)
def test_the_tract_form_is_near_the_exact_weights(name):
    """tract packs 4-bit blocks of 32 with f16 scales, and the k-quants' scales (d * sc) are not
    all f16 numbers: model.tract.onnx rounds them, and this is the logit error that costs."""
    d = tiny_dir(name)
    cfg, W, _, _ = cg.read_gguf(d / "source.gguf")
    assert not cg.tract_loadable(lo.BuildOptions(), W)
    exact = _session(lo.build_model(cfg, W, lo.BuildOptions(accuracy_level=0)))
    rounded = _session(lo.build_model(cfg, W, cg.tract_options(lo.BuildOptions(accuracy_level=0))))
    want = cg.OrtDecoder(exact, cfg).forward(IDS, cg.OrtDecoder(exact, cfg).empty_past())[0][0]
    got = cg.OrtDecoder(rounded, cfg).forward(IDS, cg.OrtDecoder(rounded, cfg).empty_past())[0][0]
    err = np.abs(got - want)
    print(f"{name}: tract's form vs the exact weights: max |dlogit| {err.max():.3g}, mean {err.mean():.3g}, "
          f"logits' spread {want.std():.3g}")
    assert err.max() < 0.05 * want.std() and err.mean() < 0.005 * want.std(), (err.max(), err.mean())


@pytest.mark.parametrize("name", SOURCES)
def test_the_shipped_files_load_on_each_engine(name):
    """model.ort.onnx (accuracy_level 4: int8 activations) stays near the exact logits; the
    tract file has only 4-bit MatMulNBits, and tract runs it to its exact reference."""
    import onnx
    d = tiny_dir(name)
    manifest = json.loads((d / "emberd.json").read_text())
    assert manifest["files"] == {"ort": "model.ort.onnx", "tract": "model.tract.onnx"}
    bits = {a.i for n in onnx.load(str(d / "model.tract.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4}, bits
    from conftest import TractDecoder, teacher_forced, tiny_cfg
    ref = json.loads((d / "reference.json").read_text())
    dec = cg.OrtDecoder(cg.ort_session(d / "model.ort.onnx"), tiny_cfg(d))
    for case in ref["cases"]:
        want = np.array(case["step_logits_exact"])
        got = teacher_forced(dec, case["prompt_ids"], case["greedy_ids_exact"][:-1])
        err = np.abs(got - want)
        print(f"{name}: accuracy_level 4 vs exact, max |dlogit| {err.max():.3g}, "
              f"mean {err.mean():.3g} (logits' spread {want.std():.3g})")
        # int8 activations' price, as on the default model (tests/generation.rs allows 2.5)
        assert err.mean() < 0.05 * want.std() and err.max() < 2.5, (err.mean(), err.max())
    try:
        import tract  # noqa: F401
    except ImportError:
        pytest.skip("tract's Python bindings are not installed")
    dec = TractDecoder(d / "model.tract.onnx", tiny_cfg(d))
    for case in ref["cases"]:
        got = teacher_forced(dec, case["prompt_ids"], case["greedy_ids_exact"][:-1])
        _compare(got, np.array(case["step_logits_exact"]), 1e-3)


LLAMA_CPP_LOGITS = """
import json, sys
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=2, logits_all=True, verbose=False)
ids = json.loads(sys.argv[2])
llm.eval(ids)
print(json.dumps([list(map(float, row)) for row in llm.scores[: len(ids)]]))
"""


def _llama_cpp_python():
    """An interpreter that has llama-cpp-python: this one, or bench/.venv-llama's (made by hand:
    `python3 -m venv bench/.venv-llama && bench/.venv-llama/bin/pip install llama-cpp-python`,
    which builds llama.cpp from source, ~12 minutes on 2 cores)."""
    import subprocess
    import sys
    from conftest import ROOT
    for py in (sys.executable, str(ROOT / "bench" / ".venv-llama" / "bin" / "python")):
        try:
            if subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
                return py
        except OSError:
            pass
    return None


@pytest.mark.parametrize("name", SOURCES + ("q4",))
def test_llama_cpp_computes_the_same_logits(name):
    """llama.cpp itself on the tiny GGUFs, where llama-cpp-python is installed. It rounds
    activations to 8 bits for its quantized dot products, so it is held to the numpy reference
    within that (as ONNX Runtime's accuracy_level 4 is) rather than to 1e-3."""
    import subprocess
    py = _llama_cpp_python()
    if py is None:
        pytest.skip("llama-cpp-python is not installed (bench/.venv-llama/bin/pip install llama-cpp-python "
                    "builds it from source)")
    d = tiny_dir(name)
    run = subprocess.run([py, "-c", LLAMA_CPP_LOGITS, str(d / "source.gguf"), json.dumps(IDS)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.array(json.loads(run.stdout), np.float64)
    want = rn.GGUFLlama(d / "source.gguf").forward(IDS)
    err = np.abs(got - want)
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    print(f"{name}: llama.cpp vs numpy: max |dlogit| {err.max():.3g}, mean {err.mean():.3g}, "
          f"argmax agreement {agree:.2f} (logits' spread {want.std():.3g})")
    assert err.mean() < 0.05 * want.std() and agree >= 0.85, (err.mean(), agree)


def _gguf_with(tmp_path, **kv):
    """The tiny GGUF, with `arch` and any further string metadata under test."""
    import dataclasses
    from make_test_models import TINY, random_weights, train_bpe, write_tiny_gguf
    tok = train_bpe()
    cfg = dataclasses.replace(TINY, vocab_size=len(tok["tokens"]))
    path = tmp_path / "x.gguf"
    arch = kv.pop("arch", "llama")
    write_tiny_gguf(path, cfg, random_weights(cfg, np.random.default_rng(0)), tok, arch=arch, extra_strings=kv)
    return path


def test_what_is_not_supported_is_named(tmp_path):
    with pytest.raises(SystemExit, match="architecture 'gemma' is not supported; supported: llama"):
        cg.read_gguf(_gguf_with(tmp_path, arch="gemma"))
    with pytest.raises(SystemExit, match="rope scaling 'yarn' is not supported"):
        cg.read_gguf(_gguf_with(tmp_path, **{"llama.rope.scaling.type": "yarn"}))


# ----------------------------------------------------------------------------- bring.py
def test_bring_converts_a_gguf_and_names_its_stages(tmp_path, capsys):
    import bring
    out = tmp_path / "pkg"
    assert bring.main([str(tiny_dir("kq-qwen2") / "source.gguf"), "--out", str(out), "--name", "mine"]) == 0
    said = capsys.readouterr().out
    assert "[bring] 1/3 source.gguf: GGUF, architecture qwen2, 2 layers" in said, said
    assert "Q5_K x" in said and "[bring] 2/3 converting" in said and f"[bring] package: {out}" in said
    assert json.loads((out / "emberd.json").read_text())["name"] == "mine"
    # the same GGUF, the same package as the generated one
    want = json.loads((tiny_dir("kq-qwen2") / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == want


def test_bring_names_what_it_cannot_take(tmp_path, capsys):
    import bring
    assert bring.main([str(_gguf_with(tmp_path, arch="gemma"))]) == 2
    assert "unsupported: architecture 'gemma' (supported: llama, mistral, qwen2)" in capsys.readouterr().err
    assert bring.main([str(tmp_path / "nothing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hi")
    assert bring.main([str(tmp_path / "notes.txt")]) == 2
    assert "neither a GGUF file nor a directory" in capsys.readouterr().err
    assert bring.main([str(tmp_path)]) == 2
    assert "no model found" in capsys.readouterr().err


def test_bring_refuses_external_data_that_onnx_runtime_refuses_and_copies_it(tmp_path, capsys):
    """An export whose external data is a symlink out of its directory (the Hugging Face cache
    makes those): ONNX Runtime refuses it, bring says so, and --out copies the file in."""
    import shutil
    import bring
    import onnxruntime as ort
    src, blobs = tmp_path / "export", tmp_path / "blobs"
    src.mkdir()
    blobs.mkdir()
    q4 = tiny_dir("q4")
    # model.ort.onnx reads its weights from model.onnx: that file becomes a link into blobs/
    for f in ("model.ort.onnx", "model.ort.onnx.data"):
        shutil.copy(q4 / f, src / f)
    shutil.copy(q4 / "model.onnx", blobs / "weights")
    (src / "model.onnx").symlink_to(blobs / "weights")
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        shutil.copy(q4 / f, src / f)
    (src / "emberd.json").write_text(json.dumps({"format": 1, "name": "linked", "layout": "optimum",
                                                 "files": {"ort": "model.ort.onnx", "tract": "model.onnx"}}))
    with pytest.raises(Exception, match="escapes model directory|External data"):
        ort.InferenceSession(str(src / "model.ort.onnx"), providers=["CPUExecutionProvider"])
    assert bring.main([str(src)]) == 2
    err = capsys.readouterr().err
    assert "model.ort.onnx: external data 'model.onnx' is a symlink to" in err and "--out DIR" in err, err
    out = tmp_path / "copied"
    assert bring.main([str(src), "--out", str(out)]) == 0
    assert not (out / "model.onnx").is_symlink()
    ort.InferenceSession(str(out / "model.ort.onnx"), providers=["CPUExecutionProvider"])
