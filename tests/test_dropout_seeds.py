"""The dropout kernels' seeds: a given ``dropout_seed`` fixes a LayerNorm's mask whatever torch's generator holds,
the encoder draws one pool of seeds per forward (one launch, not one per dropout call), and a layer recomputed
under activation checkpointing drops what it dropped the first time. (Attention's own ``dropout_seed`` test is
in test_attention.py; the masks as functions of the seed in test_dropout_rng.py.)"""
import pytest
import torch

from fastroberta import RobertaConfig, RobertaForMaskedLM
from fastroberta.kernels import layer_norm
from fastroberta.kernels._checks import new_dropout_seeds


def tiny_config(layers, dropout=0.1):
    return RobertaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=70, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)


def test_a_given_seed_fixes_the_layer_norm_mask():
    x, residual = torch.randn(20, 48), torch.randn(20, 48)
    weight, bias = torch.randn(48), torch.randn(48)
    pool = new_dropout_seeds(2)
    runs = []
    for generator_seed, slot in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(generator_seed)
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
        y = layer_norm(leaves[0], leaves[2], leaves[3], residual=leaves[1], dropout_p=0.3,
                       dropout_seed=pool[slot:slot + 1])
        y.backward(torch.ones_like(y))
        runs.append([y] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not torch.equal(runs[0][0], runs[2][0])
    with pytest.raises(TypeError, match=r"dropout_seed must be a one-element int64 tensor, got torch.float32"):
        layer_norm(x, weight, bias, residual=residual, dropout_p=0.3, dropout_seed=pool[:1].float())
    with pytest.raises(ValueError, match="dropout_seed is on meta but the input is on cpu"):
        layer_norm(x, weight, bias, dropout_p=0.3, dropout_seed=torch.zeros(1, dtype=torch.int64, device="meta"))


def forward_draws(layers, kernels, training=True):
    """torch.randint launches in one forward of a tiny MLM model on meta (benchmarks/bench_model.py's counter)."""
    from benchmarks import bench_model
    with torch.device("meta"):
        model = RobertaForMaskedLM(tiny_config(layers), kernels=kernels).train(training)
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    counter = bench_model.OpCounter(seq_len=16, nonzero_rows=4)
    with bench_model.CudaChoices(), counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, validate=False)
    return sum(r.op == "randint" for r in counter.records)


def test_the_encoder_draws_its_seeds_once_per_forward():
    assert forward_draws(2, "triton") == forward_draws(4, "triton") == 1
    assert forward_draws(2, "triton", training=False) == 0  # eval: no dropout, no draw
    assert forward_draws(2, "torch") == 0  # the eager path draws its masks itself, no seeds


def test_recomputed_layers_drop_what_they_dropped():
    """gradient_checkpointing recomputes each layer in backward from the seeds the forward handed it: the loss and
    every gradient equal those of the run that kept its activations, bit for bit."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = RobertaForMaskedLM(tiny_config(2, dropout=0.2), kernels="triton").train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(1)
        ids = torch.randint(4, 96, (2, 24))
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name
