"""The token-classification family (NER: CoNLL-2003, a user's own tagged words): readers, sub-word features with
each word's label on its first sub-word, per-word predictions, entity-level precision / recall / F1 as seqeval
computes them in its default mode and token accuracy (the bundled task is in swapped_words.py).

Words are encoded one by one with a leading space, as RoBERTa's byte-level BPE sees a word inside a sentence (and
as transformers' RobertaTokenizerFast(add_prefix_space=True) does for words given one by one); the label of a
word sits on its first sub-word, the other sub-words, ``<s>`` and ``</s>`` carry -100 and are ignored by the loss.
"""
import os
import re
from dataclasses import dataclass
from typing import List

import torch

from fastroberta.tasks.batching import padded_length
from fastroberta.tasks.errors import DataError
from fastroberta.tasks.readers import hf_source, json_lines, load_hf

IGNORE = -100
CONLL2003_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


@dataclass
class TagSplit:
    """Raw sentences of one split: the words, the tag of each word (None where unlabelled) and where each word
    came from (for error messages)."""
    name: str
    source: str
    words: List[List[str]]
    tags: list
    places: List[List[str]]


def read_conll(path, split="train", need_labels=True):
    """Sentences of a CoNLL file: a word per line, its token in the first column and its tag in the last (columns
    split by whitespace), a blank line between sentences, ``-DOCSTART-`` lines skipped. A file of one column holds
    no tags."""
    words, tags, places = [], [], []
    sentence = ([], [], [])
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(list(f) + [""], start=1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if sentence[0]:
                    words.append(sentence[0])
                    tags.append(sentence[1])
                    places.append(sentence[2])
                sentence = ([], [], [])
                continue
            sentence[0].append(columns[0])
            sentence[1].append(columns[-1] if len(columns) > 1 else None)
            sentence[2].append(f"{path} line {i}")
    return _checked(TagSplit(split, path, words, tags, places), split, need_labels)


def _tag_row(row, where, words_field, tags_field, out, names=None):
    """Append one sentence: ``row[words_field]`` a list of words, ``row[tags_field]`` a tag per word (absent:
    unlabelled), given as tag strings or, with ``names``, as ids into them."""
    tokens = row.get(words_field)
    if not isinstance(tokens, list) or not tokens or not all(isinstance(w, str) and w.strip() for w in tokens):
        raise DataError(f"{where}: {words_field!r} must be a non-empty list of words "
                        f"(fields there: {', '.join(map(str, row))})")
    labels = row.get(tags_field)
    if labels is None:
        labels = [None] * len(tokens)
    elif not isinstance(labels, list) or len(labels) != len(tokens):
        raise DataError(f"{where}: {tags_field!r} must hold one tag per word ({len(tokens)} words)")
    if names is not None:
        for j, t in enumerate(labels):
            if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(names)):
                raise DataError(f"{where} word {j + 1}: {tags_field!r} holds {t!r}, not a tag id 0-{len(names) - 1}"
                                f" ({', '.join(names)})")
        labels = [None if t is None else names[t] for t in labels]
    out.words.append(tokens)
    out.tags.append([None if t is None else str(t) for t in labels])
    out.places.append([f"{where} word {j + 1}" for j in range(len(tokens))])


def read_tag_jsonl(path, split="train", need_labels=True, words_field="tokens", tags_field="tags"):
    """Sentences of a JSON-lines file, one per line: ``tokens`` (a list of words) and ``tags`` (a tag per word)."""
    out = TagSplit(split, path, [], [], [])
    for where, row in json_lines(path):
        _tag_row(row, f"{path} {where}", words_field, tags_field, out)
    return _checked(out, split, need_labels)


def hf_tag_names(feature):
    """The tag names of a ``datasets`` tag column (a sequence of ClassLabel: ``feature.feature.names``), or None
    when it holds strings."""
    inner = getattr(feature, "feature", None)
    names = getattr(inner, "names", None)
    return list(names) if names else None


def read_tags_hf(spec, split="train", need_labels=True):
    """A TagSplit from ``hf:conll2003`` or another ``hf:<dataset>[:<config>][@<split>]`` with ``tokens`` and
    ``ner_tags`` (or ``tags``): tag ids are mapped to the column's own ClassLabel names."""
    rows, hf_split = load_hf(spec, split, "CoNLL or JSONL files")
    source = hf_source(spec, hf_split)
    tags_field = next((f for f in ("ner_tags", "tags") if f in rows.column_names), None)
    if tags_field is None and need_labels:
        raise DataError(f"--{split} {source}: no tag column 'ner_tags' or 'tags' (columns: "
                        f"{', '.join(rows.column_names)})")
    names = hf_tag_names(rows.features.get(tags_field)) if tags_field else None
    out = TagSplit(split, source, [], [], [])
    for i, row in enumerate(rows):
        _tag_row(row, f"{source} row {i}", "tokens", tags_field, out, names)
    return _checked(out, split, need_labels)


def read_tags(path, split="train", need_labels=True):
    """A TagSplit from a .jsonl (``tokens``, ``tags``), ``hf:`` (``read_tags_hf``) or a CoNLL file (any other
    extension)."""
    if path.startswith("hf:"):
        return read_tags_hf(path, split, need_labels)
    if not os.path.isfile(path):
        raise DataError(f"--{split} {path!r} does not exist")
    if path.lower().endswith((".jsonl", ".json", ".ndjson")):
        return read_tag_jsonl(path, split, need_labels)
    return read_conll(path, split, need_labels)


def _checked(out, split, need_labels):
    if not out.words:
        raise DataError(f"--{split} {out.source!r} holds no sentences")
    missing = [(p, t) for tags, places in zip(out.tags, out.places) for t, p in zip(tags, places) if t is None]
    if len(missing) == sum(map(len, out.tags)) and not need_labels:
        out.tags = None
    elif missing:
        raise DataError(f"{missing[0][0]}: the word has no tag")
    else:
        for tags, places in zip(out.tags, out.places):
            for t, p in zip(tags, places):
                if t != "O" and not re.fullmatch(r"[BIES]-\S+", t):
                    raise DataError(f"{p}: tag {t!r} is not in IOB form (O, B-TYPE, I-TYPE)")
    return out


def tag_names(train, preset=None):
    """The tags in id order: the preset's, or ``O`` then the training split's tags sorted by type, B- before I-;
    a type seen with B- also gets its I- tag (a training split of one-word entities says nothing against longer
    ones in validation)."""
    if preset is not None:
        return list(preset)
    found = {t for tags in train.tags for t in tags} - {"O"}
    found |= {"I-" + t[2:] for t in found if t.startswith("B-")}
    return ["O"] + sorted(found, key=lambda t: (t[2:], "BIES".index(t[0])))


def encode_tags(split, names):
    """Per sentence, the ids of its tags; DataError names the file and line of a tag outside ``names``."""
    if split.tags is None:
        return None
    index = {n: i for i, n in enumerate(names)}
    out = []
    for tags, places in zip(split.tags, split.places):
        for t, p in zip(tags, places):
            if t not in index:
                raise DataError(f"{p}: tag {t!r} is not in the label set ({', '.join(names)})")
        out.append([index[t] for t in tags])
    return out


@dataclass
class TagFeatures:
    """Model inputs of a split: ids per sentence (``<s> sub-words </s>``), per sentence the position of each
    word's first sub-word (-1 for a word cut off by --max-seq-len) and the token labels (None unlabelled)."""
    ids: List[List[int]]
    first: List[List[int]]
    labels: list


def tag_features(split, tokenizer, max_seq_len, special, tag_ids=None):
    """Sub-words of every sentence, each word encoded as `` word``; a sentence longer than ``max_seq_len`` loses
    its last words (they are predicted ``O``, and count as such against their gold tags)."""
    vocab = sorted({w for sentence in split.words for w in sentence})
    encoded = dict(zip(vocab, (e.ids for e in tokenizer.encode_batch([" " + w for w in vocab],
                                                                       add_special_tokens=False))))
    ids, firsts, labels = [], [], []
    for s, sentence in enumerate(split.words):
        row, first, lab = [special["bos"]], [], [IGNORE]
        for w, word in enumerate(sentence):
            pieces = encoded[word]
            if len(row) + len(pieces) > max_seq_len - 1:
                first.extend([-1] * (len(sentence) - w))
                break
            first.append(len(row))
            row.extend(pieces)
            if tag_ids is not None:
                lab.extend([tag_ids[s][w]] + [IGNORE] * (len(pieces) - 1))
        row.append(special["eos"])
        lab.append(IGNORE)
        ids.append(row)
        firsts.append(first)
        labels.append(lab if tag_ids is not None else None)
    return TagFeatures(ids, firsts, labels if tag_ids is not None else None)


def collate_tags(ids_list, pad_id, labels=None, multiple=1, limit=None):
    """``input_ids`` / ``attention_mask`` ``[B, L]`` right-padded as ``batching.collate`` does, and token
    ``labels`` ``[B, L]`` with -100 on the padding."""
    length = padded_length(max(len(x) for x in ids_list), multiple, limit)
    input_ids = torch.full((len(ids_list), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), length), dtype=torch.long)
    for i, x in enumerate(ids_list):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        out = torch.full((len(ids_list), length), IGNORE, dtype=torch.long)
        for i, lab in enumerate(labels):
            out[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        batch["labels"] = out
    return batch


def word_predictions(token_preds, first, names):
    """Tag names per word from each sentence's predicted tag ids per token: a word takes its first sub-word's
    prediction; a word cut off by truncation is ``O``."""
    return [[names[int(p[f])] if f >= 0 else "O" for f in fs] for p, fs in zip(token_preds, first)]


def _split_tag(tag):
    if tag == "O":
        return "O", ""
    return tag[0], tag[2:]


def _chunk_ends(prev_tag, tag, prev_type, type_):
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != type_


def _chunk_starts(prev_tag, tag, prev_type, type_):
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != type_


def entities(sentences):
    """The set of (type, sentence, first word, last word) spans of tag sequences, read the way conlleval and
    seqeval's default mode read them: an I- after O or after another type starts an entity, a type change ends
    one, E- and S- close one."""
    out = set()
    for s, tags in enumerate(sentences):
        prev_tag, prev_type, begin = "O", "", 0
        for i, tag in enumerate(list(tags) + ["O"]):
            t, type_ = _split_tag(tag)
            if _chunk_ends(prev_tag, t, prev_type, type_):
                out.add((prev_type, s, begin, i - 1))
            if _chunk_starts(prev_tag, t, prev_type, type_):
                begin = i
            prev_tag, prev_type = t, type_
    return out


def tag_metrics(predicted, gold):
    """Entity-level micro precision, recall and F1 over the sentences (seqeval's default, conlleval-like mode)
    and token accuracy over the words."""
    pred_set, gold_set = entities(predicted), entities(gold)
    correct = len(pred_set & gold_set)
    precision = correct / len(pred_set) if pred_set else 0.0
    recall = correct / len(gold_set) if gold_set else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    pairs = [(p, g) for ps, gs in zip(predicted, gold) for p, g in zip(ps, gs)]
    accuracy = sum(p == g for p, g in pairs) / len(pairs) if pairs else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}
