"""The bundled task: is a line of Shakespeare in its own word order, or shuffled?"""
import os
import random

from fastroberta.tasks.errors import DataError


def word_order_task(corpus_path=None, n_train=2000, n_validation=500, n_test=500, seed=1234):
    """{"train" | "validation" | "test": list of {"text", "label"}} built deterministically from the bundled
    corpus: spoken lines of 6 to 14 words, half of them with the words between the first and the last shuffled
    (never left unchanged).
    Distinguishing the two needs word-order knowledge, which masked-LM pretraining provides; a bag of words
    cannot do better than chance. Splits come from disjoint thirds of the corpus lines."""
    if corpus_path is None:
        corpus_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus", "tinyshakespeare.txt")
    with open(corpus_path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f]
    # Spoken lines only (speaker names end with ':'), 6-14 words, distinct.
    seen, candidates = set(), []
    for ln in lines:
        words = ln.split()
        if 6 <= len(words) <= 14 and len(set(words[1:-1])) > 1 and not ln.endswith(":") and ln not in seen:
            seen.add(ln)
            candidates.append(ln)
    rng = random.Random(seed)
    # Contiguous blocks keep the splits from sharing scenes: train, validation and test take every third block.
    block = 50
    blocks = [candidates[i:i + block] for i in range(0, len(candidates), block)]
    pools = {"train": [], "validation": [], "test": []}
    for i, b in enumerate(blocks):
        pools[("train", "train", "train", "train", "validation", "test")[i % 6]].extend(b)
    out = {}
    for name, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        pool = pools[name][:]
        rng.shuffle(pool)
        if len(pool) < n:
            raise DataError(f"the corpus has only {len(pool)} usable lines for the {name} split, {n} asked")
        rows = []
        for i, text in enumerate(pool[:n]):
            if i % 2:
                # The first and last words stay: a capital at the start and punctuation at the end give
                # nothing away; the words between are shuffled into a different order.
                words = text.split()
                middle = words[1:-1]
                while middle == words[1:-1]:
                    rng.shuffle(middle)
                rows.append({"text": " ".join([words[0], *middle, words[-1]]), "label": "shuffled"})
            else:
                rows.append({"text": text, "label": "original"})
        rng.shuffle(rows)
        out[name] = rows
    return out
