#!/usr/bin/env python3
"""Synthesises out-of-scope training texts for the understanding service's
outlier exposure (Hendrycks et al., "Deep Anomaly Detection with Outlier
Exposure", ICLR 2019), with the project's own generation model.

CLINC150's `oos_train` has 100 texts, too few and too narrow to teach the
intent head what a general chat assistant hears outside its 150 intents
("tell me a story about …" is nearest to `fun_fact`). This script asks the
local Qwen2.5-Coder-0.5B-Instruct (the generation service's model, converted
by `scripts/prepare_model.py`) for short user messages of each kind of task
people give an assistant (`TASKS`: InstructGPT's use cases, in their
measured shares) about Wikipedia's main topic classifications (`TOPICS`, in
turn; neither list is ours), sampled with a fixed seed, then keeps the ones that are no closer to any in-scope
CLINC150 training text than most of CLINC150's own out-of-scope training
texts are (base all-MiniLM-L6-v2, cosine), and drops any near-duplicate of
an evaluation text: CLINC150 `val`/`oos_val`, the probes, the issue's
acceptance examples (`HELD_OUT`), so none of them is trained on.

    python scripts/synth_oos.py --model DIR --encoder DIR --out FILE

The output (one text a line, with a header naming the command) is committed;
training reads it, nothing regenerates it at build or test time.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

# Wikipedia, "Category:Main topic classifications" (the top-level subject
# categories of the English Wikipedia), in its order.
TOPICS = [
    "academic disciplines", "business", "communication", "concepts", "culture",
    "economy", "education", "energy", "engineering", "entertainment", "ethics",
    "food and drink", "geography", "government", "health", "history",
    "human behavior", "humanities", "information", "internet", "knowledge",
    "language", "law", "life", "mass media", "mathematics", "military",
    "music", "nature", "people", "philosophy", "politics", "religion",
    "science", "society", "sports", "technology", "time", "universe",
]

# The acceptance examples and anything else held out from training:
# near-duplicates of these are dropped like those of the validation data.
HELD_OUT = [
    "tell me a story about dragons",
    "what's my checking account balance",
]

# The kinds of task people give an instruction-following assistant, with
# their share of real use: the use cases of Ouyang et al., "Training language
# models to follow instructions with human feedback" (NeurIPS 2022), Table 1
# (shares of the API prompt dataset, in %), less "Other". Each task gets that
# share of the prompts, its topics taken in turn.
TASKS = [
    ("asking it to write something new (generation)", 45.6),
    ("asking it an open question (open QA)", 12.4),
    ("asking it to brainstorm ideas (brainstorming)", 11.2),
    ("chatting with it (chat)", 8.4),
    ("asking it to rewrite a text (rewrite)", 6.6),
    ("asking it to summarize something (summarization)", 4.2),
    ("asking it to classify something (classification)", 3.5),
    ("asking it a question about a text they give (closed QA)", 2.6),
    ("asking it to extract information from a text (extraction)", 1.9),
]
PROMPT = (
    "Write {n} different short messages that people send to an AI chat "
    "assistant, {task}, about {topic}. Each is one sentence of 3 to 12 "
    "words, in lowercase, without quotes. Put one per line and nothing else."
)


def clean(line: str) -> str | None:
    """One generated line → a CLINC150-style text (lowercase, no list
    markers, quotes or final punctuation), or None when it is no request."""
    t = re.sub(r"^\s*(?:[-*•]|\d+[.)]|\(\d+\))\s*", "", line).strip().strip("\"'`").strip()
    t = re.sub(r"[.!?]+$", "", t).strip().lower()
    t = re.sub(r"\s+", " ", t)
    words = t.split()
    if not 3 <= len(words) <= 16 or not re.fullmatch(r"[a-z0-9 ,'?\-]+", t):
        return None
    return t


def tasks_and_topics(total: int) -> list[tuple[str, str]]:
    """`total` (task, topic) pairs, each task's count in proportion to its
    share (at least one), topics in turn across all of them."""
    weight = sum(w for _, w in TASKS)
    pairs: list[tuple[str, str]] = []
    for task, w in TASKS:
        for _ in range(max(1, round(total * w / weight))):
            pairs.append((task, TOPICS[len(pairs) % len(TOPICS)]))
    return pairs


def generate(model_dir: str, prompts_n: int, per_prompt: int, seed: int) -> list[str]:
    """Samples `per_prompt` messages for each of `prompts_n` (task, topic)
    prompts (batches of 32, bf16, top-p 0.95) and returns the cleaned lines."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.eval()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": PROMPT.format(n=per_prompt, task=k, topic=t)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for k, t in tasks_and_topics(prompts_n)
    ]
    out: list[str] = []
    torch.manual_seed(seed)
    for start in range(0, len(prompts), 32):
        batch = tok(prompts[start : start + 32], return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(
                **batch,
                max_new_tokens=18 * per_prompt,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        for row in ids[:, batch["input_ids"].shape[1] :]:
            text = tok.decode(row, skip_special_tokens=True)
            out.extend(c for c in map(clean, text.splitlines()) if c)
        print(f"synth: prompt {min(start + 32, len(prompts))}/{len(prompts)}: {len(out)} lines", flush=True)
    return out


def embed(encoder_dir: str, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM embeddings [len(texts), 384] f32,
    by the parity test's reference (`reference_embed.embed`), 128 at a time."""
    from transformers import AutoModel, AutoTokenizer

    from reference_embed import embed as reference

    tok = AutoTokenizer.from_pretrained(encoder_dir)
    model = AutoModel.from_pretrained(encoder_dir).eval()
    return torch.cat([reference(model, tok, texts[i : i + 128], 256) for i in range(0, len(texts), 128)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="Qwen2.5-Coder-0.5B-Instruct HF directory")
    ap.add_argument("--encoder", required=True, help="all-MiniLM-L6-v2 directory")
    ap.add_argument("--data", default="services/understanding/data/clinc150/data_full_train_val.json")
    ap.add_argument("--probes", default="services/understanding/data/probes/out_of_scope.txt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=351, help="prompts in all, shared out by TASKS")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep-quantile", type=float, default=0.95,
                    help="keep texts no closer to in-scope data than this quantile of oos_train's")
    ap.add_argument("--dedup", type=float, default=0.85,
                    help="cosine at or above which a text duplicates another or an evaluation text")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = json.load(open(args.data))
    in_scope = [t for t, _ in data["train"]]
    held_out = [t for t, _ in data["val"] + data["oos_val"]] + HELD_OUT
    with open(args.probes) as f:
        held_out += [l.strip() for l in f if l.strip()]

    raw = list(dict.fromkeys(generate(args.model, args.prompts, args.per_prompt, args.seed)))
    print(f"synth: {len(raw)} distinct generated texts", flush=True)
    e_raw = embed(args.encoder, raw)
    e_in = embed(args.encoder, in_scope)
    e_oos_train = embed(args.encoder, [t for t, _ in data["oos_train"]])
    e_held = embed(args.encoder, held_out)
    near_in = (e_raw @ e_in.T).max(1).values
    limit = torch.quantile((e_oos_train @ e_in.T).max(1).values, args.keep_quantile).item()
    near_held = (e_raw @ e_held.T).max(1).values
    kept: list[int] = []
    for i in range(len(raw)):
        if near_in[i] > limit or near_held[i] >= args.dedup:
            continue
        if kept and (e_raw[i] @ e_raw[kept].T).max().item() >= args.dedup:
            continue
        kept.append(i)
    print(
        f"synth: in-scope similarity limit {limit:.3f}; kept {len(kept)} of {len(raw)} "
        f"({int((near_in > limit).sum())} too near in-scope, "
        f"{int((near_held >= args.dedup).sum())} near an evaluation text)",
        flush=True,
    )
    with open(args.out, "w") as f:
        f.write(
            "# Synthetic out-of-scope requests (outlier exposure) - generated by\n"
            f"# python scripts/synth_oos.py --prompts {args.prompts} --per-prompt {args.per_prompt} "
            f"--seed {args.seed} --keep-quantile {args.keep_quantile} --dedup {args.dedup}\n"
            "# with Qwen2.5-Coder-0.5B-Instruct; see README.md beside this file.\n"
        )
        for i in sorted(kept, key=lambda i: raw[i]):
            f.write(raw[i] + "\n")


if __name__ == "__main__":
    main()
