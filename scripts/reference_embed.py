#!/usr/bin/env python3
"""Reference sentence embeddings from Hugging Face transformers, for the
encoder's parity test and benchmark.

  reference_embed.py --model DIR --texts FILE.json --out FILE.f32
      embeds the JSON list of strings (mean pooling over the attention mask,
      L2-normalised, truncation at the model's max_seq_length) and writes
      little-endian f32 [n, dim];
  reference_embed.py --model DIR --bench --threads N
      prints one JSON line with sentences/s at batch 1 and batch 32 (on the
      first 256 texts of --texts when given), in f32 and under bf16
      autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModel, AutoTokenizer


def embed(model, tok, texts, max_len, bf16=False):
    batch = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--texts")
    ap.add_argument("--out")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    # The benchmark gets transformers' default attention (SDPA), its fastest
    # CPU path; the parity reference the plain eager one.
    attn = None if args.bench else "eager"
    model = AutoModel.from_pretrained(args.model, attn_implementation=attn).eval()
    max_len = 256
    cfg = os.path.join(args.model, "sentence_bert_config.json")
    if os.path.exists(cfg):
        max_len = json.load(open(cfg)).get("max_seq_length", max_len)
    texts = json.load(open(args.texts)) if args.texts else None
    if args.bench:
        texts = texts or [f"what is the balance of my checking account number {i}" for i in range(256)]
        result = {"threads": torch.get_num_threads()}
        # f32 (the reference) and bf16 autocast (transformers' own mixed
        # precision, to compare like with like).
        for bf16, suffix in ((False, ""), (True, "_bf16")):
            for bs in (1, 32):
                embed(model, tok, texts[:bs], max_len, bf16)  # warm-up
                n = 64 if bs == 1 else 256
                t0 = time.perf_counter()
                for i in range(0, n, bs):
                    embed(model, tok, texts[i % len(texts): i % len(texts) + bs], max_len, bf16)
                result[f"batch{bs}{suffix}_per_s"] = n / (time.perf_counter() - t0)
        print(json.dumps(result))
        return
    vecs = []
    for i in range(0, len(texts), 64):
        vecs.append(embed(model, tok, texts[i:i + 64], max_len))
    with open(args.out, "wb") as f:
        f.write(torch.cat(vecs).contiguous().numpy().astype("<f4").tobytes())


if __name__ == "__main__":
    main()
