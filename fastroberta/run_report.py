"""What a finished run can show a person: how its held-out loss compares with what knowing nothing but token
frequencies gives, what the model now predicts for masked words, and its loss curve.

- ``baselines(prepared)``: the held-out *unigram* cross-entropy, the loss of a model that ignores the context
  and always predicts the training shards' token frequencies (add-one smoothed over the maskable ids), measured
  on the held-out split's maskable tokens; and the *uniform* loss log(vocabulary size). A masked-LM loss below
  the unigram figure is what the context taught the model. The token counts are kept beside the shards.
- ``heldout_sentences(prepared)`` and ``fill_mask(...)``: a few held-out lines with one word masked, and the
  model's top-k guesses for it with their probabilities.
- ``plot_losses(...)``: train and eval loss against the step, with the unigram line, as a PNG when matplotlib
  is installed (``pip install -e .[plot]``); without it nothing is drawn and nothing fails.
"""
import json
import math
import os
import re

import numpy as np

COUNTS_FILE = "train.unigram.npy"


def _maskable(prepared):
    maskable = np.ones(prepared.vocab_size, bool)
    maskable[sorted(set(prepared.special_ids.values()))] = False
    return maskable


def token_counts(prepared, split):
    """int64 [vocab]: occurrences of every id in ``split``; the training counts are cached beside the shards."""
    path = os.path.join(prepared.path, COUNTS_FILE) if split == "train" else None
    if path is not None:
        try:
            counts = np.load(path)
            if counts.shape == (prepared.vocab_size,):
                return counts
        except (OSError, ValueError):
            pass
    tokens = prepared.tokens(split)
    counts = np.zeros(prepared.vocab_size, np.int64)
    block = 1 << 24  # a memory-mapped corpus of any size, counted a block at a time
    for start in range(0, len(tokens), block):
        counts += np.bincount(tokens[start:start + block], minlength=prepared.vocab_size)[:prepared.vocab_size]
    if path is not None:
        tmp = f"{path}.tmp-{os.getpid()}.npy"
        try:
            np.save(tmp, counts)
            os.replace(tmp, path)
        except OSError:  # a read-only cache: count again next time
            if os.path.exists(tmp):
                os.remove(tmp)
    return counts


def baselines(prepared):
    """{"unigram": nats, "uniform": nats}: the losses of context-blind predictors on the held-out split."""
    maskable = _maskable(prepared)
    train = token_counts(prepared, "train")[maskable].astype(np.float64)
    val = token_counts(prepared, "val")[maskable].astype(np.float64)
    log_p = np.log(train + 1.0) - math.log(train.sum() + len(train))
    unigram = float(-(val * log_p).sum() / val.sum()) if val.sum() else float("nan")
    return {"unigram": unigram, "uniform": math.log(prepared.vocab_size)}


def summary_line(record, base):
    """``eval loss 5.10 (unigram baseline 6.30, uniform 9.01), accuracy 0.210``."""
    return (f"eval loss {record['eval_loss']:.2f} (unigram baseline {base['unigram']:.2f}, uniform "
            f"{base['uniform']:.2f}), accuracy {record['eval_accuracy']:.3f}")


# --- fill-mask samples ------------------------------------------------------------------------------------

_WORD = re.compile(r"^[A-Za-z]{3,}$")


def heldout_sentences(prepared, count=3, min_words=6, max_words=16, max_tokens=30):
    """``count`` lines of the held-out split, each with one whole word (a single token of at least three
    letters, not the line's first word) to mask: [(text before, masked word, text after)]. Deterministic: the
    lines are spread evenly over the split and the word is the line's middle-most candidate. A line encodes to
    at most ``max_tokens`` ids with <s> and </s>, so that a model trained on short sequences has seen every
    position it needs."""
    tokenizer = prepared.tokenizer
    tokens, offsets = prepared.tokens("val"), prepared.doc_offsets("val")
    lines = []
    for i in range(len(offsets) - 1):
        text = tokenizer.decode(tokens[offsets[i]:offsets[i + 1] - 1].tolist())
        for line in text.split("\n"):
            line = line.strip()
            if min_words <= len(line.split()) <= max_words and len(tokenizer.encode(line).ids) <= max_tokens:
                lines.append(line)
    picked = []
    if not lines:
        return picked
    step = max(1, len(lines) // (4 * count))
    for line in lines[step // 2::step]:
        item = _mask_a_word(tokenizer, line)
        if item is not None and item[1] not in {w for _, w, _ in picked}:
            picked.append(item)
        if len(picked) == count:
            break
    return picked


def _mask_a_word(tokenizer, line):
    vocab = tokenizer.get_vocab()
    words = [(m.start(), m.group()) for m in re.finditer(r"\S+", line)]
    candidates = []
    for k, (start, word) in enumerate(words[1:], 1):
        bare = word.rstrip(",.;:!?'")
        if _WORD.match(bare) and ("\u0120" + bare) in vocab:  # byte-level BPE marks a leading space with U+0120
            candidates.append((abs(k - len(words) / 2), start, bare))
    if not candidates:
        return None
    _, start, bare = min(candidates)
    return line[:start], bare, line[start + len(bare):]


def fill_mask(model, tokenizer, sentences, top_k=3):
    """The model's ``top_k`` (token text, probability) for each sentence's masked word. ``model`` is a
    RobertaForMaskedLM (any precision, on CPU), ``tokenizer`` a tokenizers.Tokenizer with RoBERTa's specials."""
    import torch
    mask_id = tokenizer.token_to_id("<mask>")
    results = []
    was_training = model.training
    model.eval()
    for before, _, after in sentences:
        ids = tokenizer.encode(before + "<mask>" + after).ids
        position = ids.index(mask_id)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, position].float()
        probs = torch.softmax(logits, -1)
        top = torch.topk(probs, top_k)
        results.append([(tokenizer.decode([int(t)]), float(p)) for p, t in zip(top.values, top.indices)])
    model.train(was_training)
    return results


def format_fill_mask(sentences, predictions):
    lines = []
    for (before, word, after), top in zip(sentences, predictions):
        guesses = "  ".join(f"{text!r} {p:.2f}" for text, p in top)
        lines.append(f"  {before}<mask>{after}  [{word}] -> {guesses}")
    return lines


# --- loss curve -------------------------------------------------------------------------------------------

def plot_losses(metrics_path, png_path, unigram=None):
    """Train and eval loss against the step (and the unigram line) as ``png_path``; returns the path, or None
    when matplotlib is not installed or nothing was logged."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    held = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
    if not train and not held:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if held:
        ax.plot(*zip(*held), "o-", markersize=3, label="held-out loss", color="tab:orange")
    if unigram is not None:
        ax.axhline(unigram, linestyle="--", color="gray", label=f"held-out unigram baseline {unigram:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# --- the end of a run -------------------------------------------------------------------------------------

def end_of_run(say, output, last, base, prepared, hf_dir, samples=3):
    """What fastroberta-train shows when a run ends (rank 0): the final held-out loss against the baselines,
    ``samples`` fill-mask predictions of the exported model on held-out lines, and ``output/loss.png``.
    Returns {"fill_mask": [{"text", "word", "top"}], "loss_png": path or None}."""
    report = {"fill_mask": [], "loss_png": None}
    if last.get("eval_loss") is not None:
        say(summary_line(last, base))
    if hf_dir is not None and samples > 0:
        from fastroberta.model import RobertaForMaskedLM
        sentences = heldout_sentences(prepared, samples)
        if sentences:
            model = RobertaForMaskedLM.from_pretrained(hf_dir, kernels="torch")
            predictions = fill_mask(model, prepared.tokenizer, sentences)
            say("fill-mask on held-out lines ([the hidden word] -> the model's top 3 guesses):")
            for line in format_fill_mask(sentences, predictions):
                say(line)
            report["fill_mask"] = [{"text": f"{b}<mask>{a}", "word": w, "top": top}
                                   for (b, w, a), top in zip(sentences, predictions)]
    from fastroberta.plot import draw_run
    report["loss_png"] = draw_run(output, say, base.get("unigram"))
    return report
