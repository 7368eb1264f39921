"""The bundled question-answering task: given a few lines of a speech and one of them as the question, find the
line that follows it."""
import os
import random

from fastroberta.tasks.errors import DataError

LINES_PER_CONTEXT = 4


def _speech_chunks(corpus_path):
    """Per speech of the corpus, its runs of LINES_PER_CONTEXT consecutive, distinct lines of 3 to 8 words (one
    run starting at every line)."""
    with open(corpus_path, encoding="utf-8") as f:
        blocks = f.read().split("\n\n")
    speeches = []
    for block in blocks:
        lines = [ln.strip() for ln in block.split("\n")[1:]]  # the first line is the speaker's name
        chunks = []
        for i in range(len(lines) - LINES_PER_CONTEXT + 1):
            chunk = lines[i:i + LINES_PER_CONTEXT]
            if all(3 <= len(ln.split()) <= 8 for ln in chunk) and len(set(chunk)) == len(chunk):
                chunks.append(chunk)
        if chunks:
            speeches.append(chunks)
    return speeches


def next_line_task(corpus_path=None, n_train=1500, n_validation=300, n_test=300, unanswerable=False, seed=1234):
    """{"train" | "validation" | "test": list of QA JSONL rows ({"id", "context", "question", "answers": {"text",
    "answer_start"}})} built deterministically from the bundled corpus. The context is four lines of a speech (one
    per text line), the question one of them verbatim, the answer the line after it. With ``unanswerable`` (the
    SQuAD 2.0 form) a quarter of the questions name the last line, which nothing follows: their answers are empty.
    Answering needs the model to match the question inside the context and to know where a line ends; the answer is
    always a whole line, so a model that only learns "answers are lines" is at 1 in 3 (1 in 4 with unanswerable).
    Splits come from disjoint speeches of the corpus."""
    if corpus_path is None:
        corpus_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus",
                                   "tinyshakespeare.txt")
    # Whole speeches go to one split (contexts of a speech overlap): train, validation and test take every
    # fourth, fifth and sixth group of 10 speeches.
    pools = {"train": [], "validation": [], "test": []}
    for i, chunks in enumerate(_speech_chunks(corpus_path)):
        pools[("train", "train", "train", "train", "validation", "test")[(i // 10) % 6]].extend(chunks)
    rng = random.Random(seed)
    out = {}
    for name, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        pool = pools[name][:]
        if len(pool) < n:
            raise DataError(f"the corpus has only {len(pool)} usable contexts for the {name} split, {n} asked")
        rng.shuffle(pool)
        rows = []
        for k, lines in enumerate(pool[:n]):
            context = "\n".join(lines)
            if unanswerable and rng.random() < 0.25:
                asked = len(lines) - 1
            else:
                asked = rng.randrange(len(lines) - 1)
            answers = {"text": [], "answer_start": []}
            if asked + 1 < len(lines):
                answers = {"text": [lines[asked + 1]],
                           "answer_start": [sum(len(ln) + 1 for ln in lines[:asked + 1])]}
            rows.append({"id": f"{name}-{k}", "context": context, "question": lines[asked], "answers": answers})
        out[name] = rows
    return out
