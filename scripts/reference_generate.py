#!/usr/bin/env python3
"""Reference outputs from Hugging Face transformers, for the generation
service's parity tests and benchmark.

Modes:
  --tiny DIR     write a tiny randomly initialised Qwen2 checkpoint to DIR
                 (fixed seed) and use it;
  --model DIR    use the checkpoint in DIR.

With --out PREFIX it writes PREFIX.json (prompt_ids, greedy_ids, logits shape)
and PREFIX.logits.f32 (little-endian f32 logits [prompt_len, vocab] of the
prompt's forward pass). The prompt is --messages (JSON list of {role,
content}, rendered with the checkpoint's chat template) or --ids (JSON list
of token ids).

With --bench N it instead times `generate` (greedy, N new tokens) and prints
one JSON line: {"dtype", "threads", "new_tokens", "ttft_ms", "decode_tok_s"}.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def tiny(dir_: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1234)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    # Random biases too, so the q/k/v bias path is exercised.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    model.save_pretrained(dir_, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny")
    src.add_argument("--model")
    ap.add_argument("--messages")
    ap.add_argument("--ids")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out")
    ap.add_argument("--bench", type=int)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs; the best is reported")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = args.model
    if args.tiny:
        tiny(args.tiny)
        model_dir = args.tiny
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager"
    ).eval()

    if args.ids:
        ids = json.loads(args.ids)
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        messages = json.loads(args.messages)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = [int(i) for i in ids]
    input_ids = torch.tensor([ids])
    gen_kwargs = dict(
        do_sample=False,
        max_new_tokens=args.new_tokens,
        pad_token_id=0,
    )

    if args.bench:
        gen_kwargs["max_new_tokens"] = args.bench
        gen_kwargs["min_new_tokens"] = args.bench
        ttft, decode = float("inf"), float("inf")
        with torch.inference_mode():
            model.generate(input_ids, **{**gen_kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
            for _ in range(max(1, args.repeat)):
                t0 = time.perf_counter()
                model.generate(input_ids, **{**gen_kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = model.generate(input_ids, **gen_kwargs)
                whole = time.perf_counter() - t0
                # Best TTFT and best decode time (the whole minus its own first
                # token) over the runs, as the Rust side reports.
                ttft, decode = min(ttft, first), min(decode, whole - first)
        new = out.shape[1] - input_ids.shape[1]
        print(json.dumps({
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "new_tokens": int(new),
            "ttft_ms": ttft * 1000,
            "decode_tok_s": (new - 1) / max(decode, 1e-9),
        }))
        return

    with torch.inference_mode():
        logits = model(input_ids).logits[0].float()
        if args.tiny:
            gen_kwargs["eos_token_id"] = None
        out = model.generate(input_ids, **gen_kwargs)
    greedy = [int(i) for i in out[0, len(ids):]]
    with open(args.out + ".logits.f32", "wb") as f:
        f.write(logits.contiguous().numpy().astype("<f4").tobytes())
    with open(args.out + ".json", "w") as f:
        json.dump({"prompt_ids": ids, "greedy_ids": greedy, "shape": list(logits.shape)}, f)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
