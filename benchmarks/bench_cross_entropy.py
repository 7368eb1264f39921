"""Masked-LM linear + softmax cross-entropy: fastroberta's chunked kernel against the eager head and Liger-Kernel.

N = 32 x 512 tokens with 15% labelled (the rest ignore_index = -100), E = 768 and 1024, V = 50265, fp16 and
bf16; hidden [N, E], weight [V, E] (the tied word embeddings), bias [V]. Every competitor gets all N rows and
the labels, and returns the mean loss over the labelled rows. Competitors:
    fastroberta      mlm_cross_entropy(hidden, weight, bias, labels)
    eager-full       (a) HF's head: logits = hidden Wᵀ + b for every token ([N, V] in the model dtype), then
                     F.cross_entropy(ignore_index=-100)
    eager-labelled   (b) the labelled rows selected first, then the same two ops on them
    liger            (c) Liger-Kernel's LigerFusedLinearCrossEntropyLoss (when liger_kernel is installed)

TFLOP/s counts the useful matmul work on the labelled rows M: forward 2·M·E·V, forward + backward 6·M·E·V
(eager-full spends ~6.7x that on rows without a label). Extra memory is what the loss needs above its inputs,
gradients included: the quantity the "less peak memory" targets compare.
"""
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Case, Competitor, Runner
from benchmarks.pytest_support import make_kernel_test
from fastroberta.config import IGNORE_INDEX
from fastroberta.kernels import mlm_cross_entropy, reference

NAME = "cross_entropy"
TITLE = "Masked-LM linear + cross-entropy over the labelled rows"
METRIC = "TFLOP/s"
MODES = ("fwd", "fwd+bwd")
BASELINE = "eager-full"
IGNORE = IGNORE_INDEX
VOCAB = 50265


def cases(profile):
    if profile == "smoke":
        specs = [(64, 32, 1000, "fp16")]
    elif profile == "check":
        specs = [(32 * 512, 768, VOCAB, "fp16"), (32 * 512, 768, VOCAB, "bf16"), (32 * 512, 1024, VOCAB, "fp16")]
    else:
        specs = [(32 * 512, e, VOCAB, dt) for e in (768, 1024) for dt in ("fp16", "bf16")]
    return [Case.make(f"N{n}-E{e}-V{v}-{dt}", rows=n, hidden=e, vocab=v, label_fraction=0.15, dtype=dt)
            for n, e, v, dt in specs]


def make_inputs(case, device):
    p = case.p
    g = torch.Generator().manual_seed(0)
    n, e, v = p["rows"], p["hidden"], p["vocab"]
    labels = torch.full((n,), IGNORE, dtype=torch.long)
    rows = torch.randperm(n, generator=g)[: max(1, round(p["label_fraction"] * n))]
    labels[rows] = torch.randint(0, v, (rows.numel(),), generator=g)
    return {
        # After the head's LayerNorm the hidden rows are ~N(0, 1); the tied embeddings start at N(0, 0.02).
        "hidden": torch.randn(n, e, generator=g).to(device=device, dtype=case.dtype),
        "weight": (0.02 * torch.randn(v, e, generator=g)).to(device=device, dtype=case.dtype),
        "bias": (0.02 * torch.randn(v, generator=g)).to(device=device, dtype=case.dtype),
        "labels": labels.to(device), "num_labelled": rows.numel(),
    }


def work(case, inputs, mode):
    """FLOPs on the labelled rows (see the module docstring)."""
    fwd = 2.0 * inputs["num_labelled"] * case.p["hidden"] * case.p["vocab"]
    return {"fwd": fwd, "fwd+bwd": 3 * fwd}[mode]


def _runner(inputs, fn):
    labels = inputs["labels"]
    return Runner(fn=fn, leaves=[inputs[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")],
                  leaf_names=("hidden", "weight", "bias"),
                  ref_fn=lambda h, w, b: reference.mlm_cross_entropy(h, w, b, labels, ignore_index=IGNORE))


def build_fastroberta(case, inputs):
    labels = inputs["labels"]
    return _runner(inputs, lambda h, w, b: mlm_cross_entropy(h, w, b, labels, ignore_index=IGNORE))


def build_eager_full(case, inputs):
    labels = inputs["labels"]
    return _runner(inputs, lambda h, w, b: F.cross_entropy(F.linear(h, w, b), labels, ignore_index=IGNORE))


def build_eager_labelled(case, inputs):
    labels = inputs["labels"]

    def fn(h, w, b):
        rows = (labels != IGNORE).nonzero().squeeze(-1)
        return F.cross_entropy(F.linear(h.index_select(0, rows), w, b), labels.index_select(0, rows))
    return _runner(inputs, fn)


def build_liger(case, inputs):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    labels = inputs["labels"]
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return _runner(inputs, lambda h, w, b: loss(w, h, labels, b))


def competitors(smoke=False):
    return [
        Competitor("fastroberta", build_fastroberta, ours=True),
        Competitor("eager-full", build_eager_full),
        Competitor("eager-labelled", build_eager_labelled),
        Competitor("liger", build_liger,
                   status=lambda: harness.import_status("liger_kernel.transformers",
                                                        "LigerFusedLinearCrossEntropyLoss")),
    ]


# `pytest benchmarks/ --benchmark-only` collects this (benchmarks/conftest.py collects bench_*.py).
test_cross_entropy = make_kernel_test(sys.modules[__name__])
