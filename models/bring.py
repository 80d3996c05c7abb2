#!/usr/bin/env python3
"""Turn a GGUF file or an ONNX export directory into a package emberd serves.

    bash models/prepare.sh PATH [--out DIR] [--name NAME]    (sets up .venv, then runs this)
    .venv/bin/python models/bring.py PATH [--out DIR] [--name NAME]

A GGUF is inspected (architecture, vocabulary, tensor types) and converted by
convert_gguf.py into DIR (default: models/<name>). An export directory (Optimum,
onnxruntime-genai, or an emberd package) is checked where it is, or copied into DIR with
--out; either way its external-data files must be files ONNX Runtime will open. Each stage
prints one line; anything unsupported stops it with a message that names it. prepare.sh then
runs `emberd info` on the result.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# What emberd looks for in a directory, in its order (src/model/mod.rs)
MODEL_FILES = ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx")


class Unsupported(Exception):
    """Something in the source emberd cannot serve; the message names it."""


def say(stage: str, text: str):
    print(f"[bring] {stage} {text}", flush=True)


# ----------------------------------------------------------------------------- GGUF
def inspect_gguf(path: Path) -> dict:
    import gguf
    import convert_gguf as cg
    r = gguf.GGUFReader(str(path))

    def field(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()
    arch = field("general.architecture")
    if arch not in cg.ARCHITECTURES:
        raise Unsupported(f"architecture {arch!r} (supported: {', '.join(cg.ARCHITECTURES)})")
    vocab = field("tokenizer.ggml.model")
    if vocab != "gpt2":
        raise Unsupported(f"vocabulary {vocab!r}: only byte-level BPE (gpt2) is supported, not SentencePiece")
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in cg.PRE_TOKENIZERS:
        raise Unsupported(f"pre-tokenizer {pre!r} (supported: {', '.join(sorted(cg.PRE_TOKENIZERS))})")
    types = Counter(t.tensor_type.name for t in r.tensors)
    exact = cg.EXACT_TYPES
    undecodable = [t for t in types if t not in exact and not _decodable(t)]
    if undecodable:
        raise Unsupported(f"tensor type(s) {', '.join(sorted(undecodable))}: neither emberd's converter "
                          "nor the gguf package decodes them")
    return {"arch": arch, "pre": pre, "layers": field(f"{arch}.block_count"), "types": types,
            "as_f32": sorted(t for t in types if t not in exact)}


def _decodable(type_name: str) -> bool:
    import gguf
    import numpy as np
    qt = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    try:
        gguf.quants.dequantize(np.zeros(size, np.uint8), qt)
        return True
    except NotImplementedError:
        return False


def bring_gguf(path: Path, out: Path, name: str):
    import convert_gguf as cg
    info = inspect_gguf(path)
    kinds = ", ".join(f"{t} x{n}" for t, n in sorted(info["types"].items()))
    say("1/3", f"{path.name}: GGUF, architecture {info['arch']}, {info['layers']} layers, "
               f"pre-tokenizer {info['pre']}, tensors {kinds}")
    if info["as_f32"]:
        say("1/3", f"note: {', '.join(info['as_f32'])} have no exact form here and are stored as f32 "
                   "(more memory; see models/README.md)")
    say("2/3", f"converting -> {out}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cg.convert(path, tmp, name=name, log=lambda line: print(f"        {line}", flush=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ----------------------------------------------------------------------------- export dirs
def model_files(d: Path) -> list:
    """The ONNX files emberd would load from `d`, as it finds them."""
    if (d / "emberd.json").is_file():
        files = json.loads((d / "emberd.json").read_text())["files"]
        return sorted({files["ort"], files.get("tract", files["ort"])})
    if (d / "genai_config.json").is_file():
        return [json.loads((d / "genai_config.json").read_text())["model"]["decoder"]["filename"]]
    for f in MODEL_FILES:
        if (d / f).is_file():
            return [f]
    raise Unsupported(f"{d}: no model found (looked for emberd.json, genai_config.json, {', '.join(MODEL_FILES)})")


def external_data(model: Path) -> list:
    """The external-data locations an ONNX file's initializers name."""
    import onnx
    m = onnx.load(str(model), load_external_data=False)
    found = set()
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in t.external_data if e.key == "location")
    return sorted(found)


def check_external_data(d: Path):
    """ONNX Runtime (1.24 and later) opens an external-data file only where its real path lies
    in the model's directory (or beside the model file's real path): a symlink out of it, as
    the Hugging Face cache makes, is refused when the session is created."""
    for f in model_files(d):
        model = d / f
        if not model.is_file():
            raise Unsupported(f"{model}: named by the directory's manifest, but missing")
        for loc in external_data(model):
            data = model.parent / loc
            if os.path.isabs(loc) or not data.exists():
                raise Unsupported(f"{f}: external data {loc!r} is {'an absolute path' if os.path.isabs(loc) else 'missing'}")
            real = data.resolve()
            homes = (model.parent.resolve(), model.resolve().parent)
            if not any(real.is_relative_to(h) for h in homes):
                raise Unsupported(f"{f}: external data {loc!r} is a symlink to {real}, outside the model's "
                                  "directory, and ONNX Runtime refuses it; copy the export with --out DIR "
                                  "(which copies what the links point to) or replace the link by the file")


def bring_dir(src: Path, out: Path | None):
    files = model_files(src)
    layout = ("emberd package" if (src / "emberd.json").is_file() else
              "onnxruntime-genai export" if (src / "genai_config.json").is_file() else "Optimum export")
    say("1/3", f"{src}: {layout}, model file(s) {', '.join(files)}")
    if out is None:
        check_external_data(src)
        say("2/3", "external data in place (no copy: pass --out DIR to copy)")
        return src
    say("2/3", f"copying -> {out} (links replaced by the files they point to)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=False)
    check_external_data(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path, help="a .gguf file or an export directory")
    ap.add_argument("--out", type=Path, help="package directory (a GGUF's default: models/<name>)")
    ap.add_argument("--name", help="package name (default: the file or directory name)")
    a = ap.parse_args(argv)
    src = a.path
    try:
        if src.is_dir():
            out = bring_dir(src, a.out)
        elif src.is_file() and src.open("rb").read(4) == b"GGUF":
            name = a.name or src.stem.lower()
            out = a.out or HERE / name
            bring_gguf(src, out, name)
        elif src.exists():
            raise Unsupported(f"{src}: neither a GGUF file nor a directory")
        else:
            raise Unsupported(f"{src}: no such file or directory")
    except Unsupported as e:
        print(f"[bring] ERROR: unsupported: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:   # the converter's own refusals name what they refuse
        if isinstance(e.code, str):
            print(f"[bring] ERROR: unsupported: {e.code}", file=sys.stderr)
            return 2
        raise
    print(f"[bring] package: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
