#!/usr/bin/env python3
"""llama.cpp side of ``make bench-generation`` (services/generation/src/bin/bench.rs).

Runs the same GGUF that ``make models`` assembles through llama-cpp-python
(pinned in the Makefile, installed by the benchmark target only) on the same
prompt token ids, thread count and greedy decoding as our side, and prints
one JSON line:

- ``ttft_ms``: prompt evaluation + the first token, best of ``--repeat``;
- ``decode_tok_s``: the following ``--new-tokens − 1`` greedy tokens (EOS
  ignored, as on our side), best of ``--repeat``;
- ``peak_rss_mib``: the process's peak resident memory (``ru_maxrss``).

The KV cache is reset between runs, so nothing of an earlier run's prompt is
reused (llama.cpp would otherwise skip the shared prefix).
"""

import argparse
import json
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--gguf", required=True)
    p.add_argument("--prompt-ids", required=True, help="JSON list of token ids")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    from llama_cpp import Llama

    prompt = json.loads(args.prompt_ids)
    llm = Llama(
        model_path=args.gguf,
        n_ctx=2048,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
    )

    def run(n: int) -> tuple[float, float]:
        llm.reset()
        started = time.perf_counter()
        first = None
        count = 0
        for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter()
            if count == n:
                break
        end = time.perf_counter()
        return first - started, end - first

    run(4)  # warm-up
    best_ttft, best_decode = float("inf"), float("inf")
    for _ in range(args.repeat):
        ttft, decode = run(args.new_tokens)
        best_ttft, best_decode = min(best_ttft, ttft), min(best_decode, decode)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "ttft_ms": best_ttft * 1e3,
                "decode_tok_s": (args.new_tokens - 1) / best_decode,
                "peak_rss_mib": rss_mib,
            }
        )
    )


if __name__ == "__main__":
    main()
