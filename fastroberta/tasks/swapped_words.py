"""The bundled tasks of the multiple-choice, token-classification and question-answering families: spoken lines of
the corpus in which a few neighbouring words were put in the wrong order.

Telling the line as written from its reordered copies takes knowing which word may follow which, the knowledge that
the small default pretraining run holds best. (Scored by masked-LM pseudo-likelihood, that run prefers a line to the
same line with two neighbouring words swapped three times in four, and to its middle words shuffled four times in
five; it prefers a line to the same line with two words replaced by random corpus words barely more often than by
chance, so tasks of replaced words would show little of what it learned.) Nothing else tells the changed words apart:
only plain words (letters, no punctuation) move, never a line's first or last word, so the capital that starts a line
and every punctuation mark stay where the author put them, and a changed line holds the same words as the original.
Every line, changed or not, is its whitespace-separated words joined by single spaces. Splits come from disjoint
blocks of speeches."""
import functools
import os
import random
import re

from fastroberta.tasks.errors import DataError

_PLAIN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # letters, apostrophes inside ("know't"), no punctuation
SPLITS = ("train", "validation", "test")
QUESTION = "Which words are out of order?"
TAGS = ("O", "B-SWAP", "I-SWAP")


@functools.lru_cache(maxsize=2)
def _speeches(corpus_path):
    """The corpus's speeches (the lines after a speaker's name, up to a blank line), each a tuple of lines as
    tuples of whitespace-separated words."""
    if corpus_path is None:
        corpus_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus",
                                   "tinyshakespeare.txt")
    with open(corpus_path, encoding="utf-8") as f:
        blocks = f.read().split("\n\n")
    speeches = []
    for block in blocks:
        lines = tuple(tuple(ln.split()) for ln in block.split("\n")[1:] if ln.strip())  # [0]: the speaker's name
        if lines:
            speeches.append(lines)
    return tuple(speeches)


def _split_speeches(corpus_path):
    """{split: its speeches}: train, validation and test take groups of 10 speeches in turn (4 : 1 : 1), so no
    line, nor the line before it, is in two splits."""
    pools = {name: [] for name in SPLITS}
    for i, speech in enumerate(_speeches(corpus_path)):
        pools[("train", "train", "train", "train", "validation", "test")[(i // 10) % 6]].append(speech)
    return pools


def movable_runs(words, length):
    """The start positions of runs of ``length`` plain words of ``words``, neither the first word nor the last,
    whose reversal changes the line (they are not all the same word)."""
    inner = range(1, len(words) - length)
    return [i for i in inner if all(_PLAIN.fullmatch(w) for w in words[i:i + length])
            and len({w.lower() for w in words[i:i + length]}) > 1]


def reverse_runs(words, runs):
    """``words`` with each run (a list of positions) in reverse order."""
    out = list(words)
    for run in runs:
        out[run[0]:run[-1] + 1] = reversed(words[run[0]:run[-1] + 1])
    return out


def _pick_runs(words, rng, count, lengths):
    """Up to ``count`` movable runs, each of a length drawn from ``lengths``, with an untouched word between any
    two (so each is its own entity), as sorted lists of positions."""
    taken, runs = set(), []
    for _ in range(count):
        length = rng.choice(lengths)
        starts = [i for i in movable_runs(words, length)
                  if not taken & set(range(i - 1, i + length + 1))]
        if not starts:
            continue
        start = rng.choice(starts)
        runs.append(list(range(start, start + length)))
        taken |= set(runs[-1])
    return sorted(runs)


def _take(pool, n, name, what):
    if len(pool) < n:
        raise DataError(f"the corpus has only {len(pool)} usable {what} for the {name} split, {n} asked")
    return pool[:n]


def swapped_line_choices(corpus_path=None, n_train=2000, n_validation=500, n_test=500, swaps=2, seed=1234):
    """{"train" | "validation" | "test": list of SWAG-form rows}, deterministic per ``seed``: ``sent1`` is a spoken
    line, the endings the line that follows it in the same speech (6 to 12 words) and three copies of that line,
    each with ``swaps`` pairs of neighbouring plain words swapped (each copy different); ``label`` is the index of
    the line as written. Every choice holds the same words, so only their order tells the right one."""
    rng = random.Random(seed)
    out = {}
    for name, n in zip(SPLITS, (n_train, n_validation, n_test)):
        pairs = [(before, line) for speech in _split_speeches(corpus_path)[name]
                 for before, line in zip(speech, speech[1:])
                 if 6 <= len(line) <= 12 and len(before) <= 12 and len(movable_runs(line, 2)) >= 2 * swaps + 1]
        rng.shuffle(pairs)
        rows = []
        for before, line in _take(pairs, n, name, "line pairs"):
            endings = [" ".join(line)]
            while len(endings) < 4:
                runs = _pick_runs(line, rng, swaps, (2,))
                copy = " ".join(reverse_runs(line, runs))
                if len(runs) == swaps and copy not in endings:
                    endings.append(copy)
            truth = endings[0]
            rng.shuffle(endings)
            row = {"sent1": " ".join(before), "sent2": ""}
            row.update({f"ending{c}": e for c, e in enumerate(endings)})
            row["label"] = endings.index(truth)
            rows.append(row)
        out[name] = rows
    return out


def swapped_word_tags(corpus_path=None, n_train=2000, n_validation=500, n_test=500, seed=1234):
    """{"train" | "validation" | "test": list of {"tokens", "tags"}}, deterministic per ``seed``: spoken lines of 6
    to 14 whitespace-separated words (punctuation stays on its word, so the words joined by spaces are the line) in
    which no pair (a fifth of the lines) or two or three pairs of neighbouring plain words (as many as fit apart,
    so in the end mostly two, one in a short line) were swapped; each swapped pair is an entity (B-SWAP, I-SWAP),
    every other word O. (One pair a line left the demo encoder at half the F1: fewer examples of a swap.)"""
    rng = random.Random(seed)
    out = {}
    for name, n in zip(SPLITS, (n_train, n_validation, n_test)):
        lines = [line for speech in _split_speeches(corpus_path)[name] for line in speech
                 if 6 <= len(line) <= 14 and len(movable_runs(line, 2)) >= 3]
        rng.shuffle(lines)
        rows = []
        for line in _take(lines, n, name, "lines"):
            runs = _pick_runs(line, rng, rng.choice((0, 2, 2, 3, 3)), (2,))
            tags = ["O"] * len(line)
            for run in runs:
                tags[run[0]], tags[run[1]] = "B-SWAP", "I-SWAP"
            rows.append({"tokens": reverse_runs(line, runs), "tags": tags})
        out[name] = rows
    return out


def swapped_span_questions(corpus_path=None, n_train=2000, n_validation=500, n_test=500, unanswerable=False,
                           seed=1234):
    """{"train" | "validation" | "test": list of QA JSONL rows ({"id", "context", "question", "answers": {"text",
    "answer_start"}})}, deterministic per ``seed``. The context is two consecutive lines of a speech (one per text
    line, 8 to 20 words together) in which one run of two or three plain words was put in reverse order; the
    question is always QUESTION, the answer that run as it stands in the context. With ``unanswerable`` (the SQuAD
    2.0 form) a quarter of the contexts are left as written and their answers are empty."""
    rng = random.Random(seed)
    out = {}
    for name, n in zip(SPLITS, (n_train, n_validation, n_test)):
        pairs = [(first, second) for speech in _split_speeches(corpus_path)[name]
                 for first, second in zip(speech, speech[1:])
                 if 8 <= len(first) + len(second) <= 20 and movable_runs(first, 4) + movable_runs(second, 4)]
        rng.shuffle(pairs)
        rows = []
        for k, (first, second) in enumerate(_take(pairs, n, name, "line pairs")):
            lines = [list(first), list(second)]
            answers = {"text": [], "answer_start": []}
            if not (unanswerable and rng.random() < 0.25):
                length = rng.choice((3, 4))
                where = [(j, i) for j in (0, 1) for i in movable_runs(lines[j], length)]
                j, i = where[rng.randrange(len(where))]
                lines[j] = reverse_runs(lines[j], [list(range(i, i + length))])
                start = (len(" ".join(first)) + 1 if j else 0) + sum(len(w) + 1 for w in lines[j][:i])
                answers = {"text": [" ".join(lines[j][i:i + length])], "answer_start": [start]}
            context = " ".join(lines[0]) + "\n" + " ".join(lines[1])
            rows.append({"id": f"{name}-{k}", "context": context, "question": QUESTION, "answers": answers})
        out[name] = rows
    return out
