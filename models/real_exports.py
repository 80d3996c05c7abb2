"""Real ONNX exports of the default model, made by the official tools, and their own runtimes'
greedy output (run by models/real_exports.sh in the export venv, which has torch).

  python real_exports.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --tokenizer-from PKG --out DIR

DIR/hf            the GGUF read into a transformers checkpoint (fp32 safetensors), with the
                  default package's tokenizer files (as a hub repository ships them)
DIR/optimum-fp32  `optimum-cli export onnx --task text-generation-with-past --dtype fp32`
DIR/optimum-int4  the fp32 export through ONNX Runtime's MatMulNBitsQuantizer (block 32,
                  symmetric, accuracy_level 4), as onnx/model_q4.onnx like the hub's exports
DIR/optimum-q4f16 the 4-bit export with its whole graph in half precision (ONNX Runtime's
                  float16 converter; KV cache and logits f16), as the hub's onnx/model_q4f16.onnx
DIR/genai-int4    `python -m onnxruntime_genai.models.builder -p int4 -e cpu`
DIR/references.json  per export: prompt ids (Hugging Face's template and tokenizer) and the
                  greedy ids of the exporting tool's runtime (onnxruntime for the Optimum
                  exports, onnxruntime-genai for the builder's), with its decode tokens/s.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = [
    [{"role": "user", "content": "Tell me about Paris, the capital of France."}],
    [{"role": "system", "content": "You are a helpful assistant who explains things simply."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Give me three tips for staying healthy."}],
]
MAX_NEW = 48
# The files a hub repository's tokenizer comes in (copied next to each export when the tool
# does not write them itself).
SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja"]


def log(msg):
    print(f"[exports] {msg}", flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def hf_checkpoint(gguf: Path, tok_pkg: Path, out: Path):
    """transformers reads the GGUF (dequantized to fp32); the tokenizer is the default
    package's (transformers' own GGUF tokenizer conversion drops SmolLM2's digit splitting)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 torch_dtype=torch.float32)
    model.save_pretrained(out)
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(tok_pkg / name, out / name)
    # Saved again by transformers itself: its files are what a hub repository holds today
    # (the template in chat_template.jinja).
    tok = AutoTokenizer.from_pretrained(out)
    tok.save_pretrained(out)


def optimum_fp32(hf: Path, out: Path):
    run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", hf,
         "--task", "text-generation-with-past", "--dtype", "fp32", out])


def optimum_int4(fp32: Path, out: Path):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    (out / "onnx").mkdir(parents=True)
    model = onnx.load(str(fp32 / "model.onnx"))
    quant = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=4)
    quant.process()
    quant.model.save_model_to_file(str(out / "onnx" / "model_q4.onnx"), True)
    for name in SIDE_FILES:
        if (fp32 / name).is_file():
            shutil.copy(fp32 / name, out / name)


def optimum_q4f16(int4: Path, out: Path):
    """transformers.js's q4f16 form: the 4-bit model through ONNX Runtime's float16 converter,
    inputs and outputs included (f16 past/present and logits)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    (out / "onnx").mkdir(parents=True)
    model = convert_float_to_float16(onnx.load(str(int4 / "onnx" / "model_q4.onnx")), keep_io_types=False,
                                     disable_shape_infer=True)
    onnx.save(model, str(out / "onnx" / "model_q4f16.onnx"))
    for name in SIDE_FILES:
        if (int4 / name).is_file():
            shutil.copy(int4 / name, out / name)


def genai_int4(hf: Path, out: Path, cache: Path):
    run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out,
         "-p", "int4", "-e", "cpu", "-c", cache])


def prompt_ids(tok):
    cases = []
    for messages in PROMPTS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({"messages": messages, "text": text, "prompt_ids": ids})
    return cases


def eos_ids(export: Path):
    if (export / "generation_config.json").is_file():
        eos = json.loads((export / "generation_config.json").read_text()).get("eos_token_id")
    else:
        eos = json.loads((export / "genai_config.json").read_text())["model"]["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


def ort_file(export: Path) -> Path:
    """An Optimum export's model: top level, or the one in the hub's onnx/ folder."""
    if (export / "model.onnx").is_file():
        return export / "model.onnx"
    return next(f for f in (export / "onnx" / n for n in ("model_q4.onnx", "model_q4f16.onnx")) if f.is_file())


class OrtLoop:
    """The plain onnxruntime loop an Optimum export is run with: the prompt, then one token a
    step, with the present key/values fed back as the next past."""

    def __init__(self, model_file: Path):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        # Two threads, as tests/exports.rs and bench/exports.sh run emberd.
        opts.intra_op_num_threads = 2
        self.sess = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
        inputs = self.sess.get_inputs()
        self.kv = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.has_pos = any(i.name == "position_ids" for i in inputs)
        self.outs = [o.name for o in self.sess.get_outputs()]

    def start(self, prompt):
        """Runs the prompt from an empty cache; the greedy next token."""
        self.past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]),
                                      np.float16 if "float16" in i.type else np.float32) for i in self.kv}
        self.ids = []
        return self.step(prompt)

    def step(self, new):
        self.ids += list(new)
        feed = {"input_ids": np.array([new], np.int64),
                "attention_mask": np.ones((1, len(self.ids)), np.int64), **self.past}
        if self.has_pos:
            feed["position_ids"] = np.arange(len(self.ids) - len(new), len(self.ids), dtype=np.int64)[None]
        res = dict(zip(self.outs, self.sess.run(self.outs, feed)))
        self.past = {k: res[k.replace("past_key_values", "present")] for k in self.past}
        return int(np.argmax(res["logits"][0, -1]))


def ort_greedy(model_file: Path, cases, eos):
    loop = OrtLoop(model_file)
    decode_s, decode_n = 0.0, 0
    for case in cases:
        got = [loop.start(case["prompt_ids"])]
        while got[-1] not in eos and len(got) < MAX_NEW:
            t = time.perf_counter()
            got.append(loop.step([got[-1]]))
            decode_s += time.perf_counter() - t
            decode_n += 1
        case["greedy_ids"] = got
    return decode_n / decode_s


def genai_greedy(export: Path, cases, eos):
    import onnxruntime_genai as og
    model = og.Model(str(export))
    decode_s, decode_n = 0.0, 0
    for case in cases:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(case["prompt_ids"]) + MAX_NEW,
                                  batch_size=1)
        gen = og.Generator(model, params)
        gen.append_tokens(case["prompt_ids"])
        got = []
        while not gen.is_done() and len(got) < MAX_NEW:
            t = time.perf_counter()
            gen.generate_next_token()
            if got:
                decode_s += time.perf_counter() - t
                decode_n += 1
            got.append(int(gen.get_next_tokens()[0]))
        case["greedy_ids"] = got
    return decode_n / decode_s


def bench(export: Path, prompt_tokens: int, gen_tokens: int, runs: int):
    """The exporting tool's runtime on EXPORT as its users call it: prefill then one token a
    step, no eos stop; prints one JSON line per run (prefill ms, decode tokens/s)."""
    from transformers import AutoTokenizer
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 40)
    prompt = AutoTokenizer.from_pretrained(export)(text)["input_ids"][:prompt_tokens]
    genai = (export / "genai_config.json").is_file()
    if genai:
        import onnxruntime_genai as og
        model = og.Model(str(export))
    else:
        loop = OrtLoop(ort_file(export))
    for _ in range(runs):
        if genai:
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, min_length=len(prompt) + gen_tokens,
                                      max_length=len(prompt) + gen_tokens, batch_size=1)
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(prompt)
            gen.generate_next_token()
            t1 = time.perf_counter()
            for _ in range(gen_tokens - 1):
                gen.generate_next_token()
            t2 = time.perf_counter()
        else:
            t0 = time.perf_counter()
            token = loop.start(prompt)
            t1 = time.perf_counter()
            for _ in range(gen_tokens - 1):
                token = loop.step([token])
            t2 = time.perf_counter()
        print(json.dumps({"prefill_ms": round((t1 - t0) * 1e3, 1),
                          "decode_tokens_per_s": round((gen_tokens - 1) / (t2 - t1), 1)}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--tokenizer-from", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--bench", type=Path, metavar="EXPORT",
                    help="time the exporting tool's runtime on EXPORT instead (bench/exports.sh)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    if args.bench:
        return bench(args.bench, args.prompt_tokens, args.gen_tokens, args.runs)
    if not (args.gguf and args.tokenizer_from and args.out):
        ap.error("--gguf, --tokenizer-from and --out are needed to make the exports")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stages = [
        ("hf", lambda d: hf_checkpoint(args.gguf, args.tokenizer_from, d)),
        ("optimum-fp32", lambda d: optimum_fp32(out / "hf", d)),
        ("optimum-int4", lambda d: optimum_int4(out / "optimum-fp32", d)),
        ("optimum-q4f16", lambda d: optimum_q4f16(out / "optimum-int4", d)),
        ("genai-int4", lambda d: genai_int4(out / "hf", d, out / "genai-cache")),
    ]
    for i, (name, make) in enumerate(stages, 1):
        if (out / name / ".done").is_file():
            log(f"{i}/{len(stages) + 1} {name}: made earlier")
            continue
        log(f"{i}/{len(stages) + 1} {name}")
        t = time.time()
        shutil.rmtree(out / name, ignore_errors=True)
        make(out / name)
        (out / name / ".done").write_text("")
        log(f"{name} in {time.time() - t:.0f} s")
    shutil.rmtree(out / "genai-cache", ignore_errors=True)

    log(f"{len(stages) + 1}/{len(stages) + 1} greedy references from each tool's own runtime")
    refs = {}
    from transformers import AutoTokenizer
    for name, runner in [("optimum-fp32", "onnxruntime"), ("optimum-int4", "onnxruntime"),
                         ("optimum-q4f16", "onnxruntime"), ("genai-int4", "onnxruntime-genai")]:
        export = out / name
        tok = AutoTokenizer.from_pretrained(export)
        cases = prompt_ids(tok)
        eos = eos_ids(export)
        if runner == "onnxruntime":
            tps = ort_greedy(ort_file(export), cases, eos)
        else:
            tps = genai_greedy(export, cases, eos)
        for case in cases:
            # The reply as a client reads it: without the eos that ended it.
            reply = [t for t in case["greedy_ids"] if t not in eos]
            case["greedy_text"] = tok.decode(reply, skip_special_tokens=False)
        refs[name] = {"runtime": runner, "decode_tokens_per_s": round(tps, 1), "cases": cases}
        log(f"{name}: {runner} greedy, decode {tps:.1f} tokens/s")
    versions = {}
    for pkg in ["torch", "transformers", "optimum", "optimum-onnx", "onnxruntime", "onnxruntime-genai"]:
        from importlib.metadata import version
        versions[pkg] = version(pkg)
    (out / "references.json").write_text(json.dumps(
        {"max_new_tokens": MAX_NEW, "versions": versions, "exports": refs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
