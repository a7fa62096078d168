#!/usr/bin/env python3
"""Builds the second intent benchmark: CLINC150 open-intent (unknown intents).

The protocol of open intent classification (Lin & Xu, ACL 2019; Zhang, Xu
and Lin, AAAI 2021): a seeded 75 % of CLINC150's 150 intents are known, the
rest are unknown and must come out as out of scope. Built from the
committed train and validation splits only (the test split is not in the
repository), so that nothing scored was trained on or chosen on:

- train.jsonl: the known intents' `train` texts less 20 per intent,
  flat (`{"text", "intent"}`: no domains, no out-of-scope examples — the
  case of a user with a plain labelled export);
- test.jsonl: per known intent, the 20 held-back `train` texts and its 20
  `val` texts; every `val` text of the unknown intents (labels kept: the
  evaluator counts intents the head does not know as out of scope); and
  CLINC150's `oos_val` texts labelled `oos`.

Usage: scripts/intent_bench_open.py OUT_DIR [--known 0.75] [--seed 7]
"""

import argparse
import json
import pathlib
import random

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "services/understanding/data/clinc150/data_full_train_val.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--known", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--held", type=int, default=20, help="train texts per known intent held back for test")
    a = p.parse_args()
    data = json.loads(DATA.read_text())
    intents = sorted({i for _, i in data["train"]})
    rng = random.Random(a.seed)
    known = set(rng.sample(intents, round(len(intents) * a.known)))
    by_intent: dict[str, list[str]] = {}
    for text, intent in data["train"]:
        by_intent.setdefault(intent, []).append(text)
    train, test = [], []
    for intent in intents:
        if intent not in known:
            continue
        texts = by_intent[intent][:]
        rng.shuffle(texts)
        test += [(t, intent) for t in texts[: a.held]]
        train += [(t, intent) for t in texts[a.held :]]
    test += [(t, i) for t, i in data["val"]]
    test += [(t, "oos") for t, _ in data["oos_val"]]
    a.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(a.out / name, "w") as f:
            for t, i in rows:
                f.write(json.dumps({"text": t, "intent": i}) + "\n")
    unknown = sum(1 for _, i in test if i not in known and i != "oos")
    print(
        f"{len(known)} known and {len(intents) - len(known)} unknown intents; "
        f"train {len(train)} texts; test {len(test)} texts "
        f"({len(test) - unknown - len(data['oos_val'])} known, {unknown} unknown-intent, {len(data['oos_val'])} oos)"
    )


if __name__ == "__main__":
    main()
