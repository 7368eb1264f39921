"""A training forward + backward makes (almost) no host-device syncs, whatever the depth.

Each sync drains the GPU's launch queue and rules out CUDA graphs. On CPU there is no queue to drain, so
the test counts the calls that would sync on a GPU, by the source line in fastroberta that makes them: a
TorchFunctionMode sees every ``item``/``tolist``/``int()``/``float()``/``bool()``/``nonzero``/boolean
indexing and every ``torch.tensor(..., device=)``. Budget (kernels="triton", validate=False, as the trainer
runs it): padded 1 (the labelled-row count), varlen 2 (the real-token count, the labelled-row count).
"""
import collections
import contextlib
import importlib
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastroberta import RobertaConfig, RobertaForMaskedLM
from fastroberta.kernels._library import observe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(torch.__file__)

# Calls that read a tensor's values on the host (a device-to-host copy and a sync on CUDA) or copy host data
# to the device (torch.tensor with a device, blocking).
_READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "argwhere",
          "masked_select", "unique", "cpu", "numpy", "repeat_interleave"}


def _syncs(func, args, kwargs):
    name = getattr(func, "__name__", "")
    if name in _READS:
        return True
    if name == "tensor" and kwargs and kwargs.get("device") is not None:
        return True
    if name == "__getitem__" and len(args) > 1:  # boolean-mask indexing sizes its output on the host
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


def _repository_code(filename):
    """The repository's own files, not an environment kept inside the checkout (the README's .venv): pytest's
    frames there must never be charged with a call."""
    return filename.startswith(REPO + os.sep) and not filename.startswith(sys.prefix + os.sep)


class SyncCounter(TorchFunctionMode):
    """Counts syncing calls made from the repository's code, by ``path:line (function)``."""

    def __init__(self, charge_this_file=False):
        super().__init__()
        # Calls made from this test file are charged to their nearest caller in the repository's code, unless
        # charge_this_file (the counter's own test).
        self.charge_this_file = charge_this_file
        self.by_line = collections.Counter()
        self.ops_entered = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            frame = sys._getframe(1)
            while frame is not None and (frame.f_code.co_filename.startswith(_TORCH)
                                         or (frame.f_code.co_filename == __file__ and not self.charge_this_file)):
                frame = frame.f_back
            if frame is not None and _repository_code(frame.f_code.co_filename):
                where = os.path.relpath(frame.f_code.co_filename, REPO)
                self.by_line[f"{where}:{frame.f_lineno} ({frame.f_code.co_name})"] += 1
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "fastroberta":
            self.ops_entered += 1
        return func(*args, **kwargs)


    @property
    def total(self):
        return sum(self.by_line.values())


@contextlib.contextmanager
def sync_counter(charge_this_file=False):
    """A SyncCounter that also sees inside the custom ops: their implementations (the kernels' launch code) run
    while the mode is off for the op call it handles; ``observe`` switches it on again inside them."""
    counter = SyncCounter(charge_this_file)
    with counter, observe(counter):
        yield counter


def training_batch(varlen, seed=0):
    """A right-padded MLM batch; ``varlen`` packs two documents into the first row (as packing="varlen")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    ids[1, 10:], mask[1, 10:] = 1, 0
    labels = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[1, 10:] = -100
    labels[0, 3] = ids[0, 3]
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if varlen:
        batch.update(cu_seqlens=torch.tensor([0, 7, 16, 26], dtype=torch.int32), max_seqlen=10)
    return batch


def count(layers, varlen, checkpointing=False, validate=False):
    cfg = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(0)
    model = RobertaForMaskedLM(cfg, kernels="triton").train()  # dropout on, as in training
    model.gradient_checkpointing = checkpointing
    with sync_counter() as counter:
        out = model(**training_batch(varlen), validate=validate)
        out.loss.backward()
    assert torch.isfinite(out.loss)
    return counter


@pytest.mark.slow  # four interpreted layers with dropout: ~10-30 s on 2 busy cores
@pytest.mark.parametrize("varlen, budget", [(False, 1), (True, 2)])
def test_training_step_syncs_do_not_grow_with_depth(varlen, budget):
    shallow, deep = count(2, varlen), count(4, varlen)
    assert shallow.total <= budget, dict(shallow.by_line)
    assert deep.by_line == shallow.by_line, (dict(shallow.by_line), dict(deep.by_line))


def test_activation_checkpointing_adds_no_syncs():
    plain, recomputed = count(1, True), count(1, True, checkpointing=True)
    assert recomputed.by_line == plain.by_line, (dict(plain.by_line), dict(recomputed.by_line))


def test_validation_reads_once_per_forward_not_per_layer():
    # The checks of ids, labels and cu_seqlens cost a few reads, but never one per layer.
    assert count(1, True, validate=True).by_line == count(2, True, validate=True).by_line


def test_counter_sees_inside_the_custom_ops(monkeypatch):
    # The kernels' launch code runs inside torch.library custom ops (forward, and backward under autograd's
    # engine); a sync there must count too.
    ln_mod = importlib.import_module("fastroberta.kernels.layer_norm")
    forward, backward = ln_mod._layer_norm_forward, ln_mod._layer_norm_backward

    def syncing_forward(x, *args):
        int(x[0, 0] > 0)  # a read, as a careless launch function might make
        return forward(x, *args)

    def syncing_backward(dy, *args):
        int(dy[0, 0] > 0)
        return backward(dy, *args)
    monkeypatch.setattr(ln_mod, "_layer_norm_forward", syncing_forward)
    monkeypatch.setattr(ln_mod, "_layer_norm_backward", syncing_backward)
    x = torch.randn(2, 16, requires_grad=True)
    with sync_counter() as counter:
        ln_mod.layer_norm(x, None, None, dropout_p=0.1).sum().backward()
    assert counter.ops_entered >= 1  # the forward op's call reached the mode, its inside did too:
    # Reads made from this file are charged to the nearest repository caller: the op implementations.
    assert sorted(k.split(" ")[1] for k in counter.by_line) == ["(_layer_norm_backward_op)", "(_layer_norm_op)"], \
        dict(counter.by_line)
    assert counter.total == 2


def test_counter_sees_the_syncs_it_is_meant_to():
    # The counter itself: each of these calls is one sync (charged to this file's line, wherever the Python
    # environment lives: inside the checkout, as the README's .venv, or outside it).
    t = torch.tensor([1, 0, 2])
    with sync_counter(charge_this_file=True) as counter:
        int(t[0]), t.tolist(), t.nonzero(), t[t > 0], bool(t[1]), torch.tensor([1], device=t.device)
    assert counter.total == 6, dict(counter.by_line)


def test_fine_tuning_step_makes_no_syncs():
    """fastroberta-finetune's step: the batch as its loader collates it, through ``finetune.model_inputs``
    (validate=False), a classifier forward + backward with the Triton kernels reads nothing on the host."""
    from fastroberta import RobertaForSequenceClassification
    from fastroberta.finetune import model_inputs
    from fastroberta.tasks import collate
    cfg = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, num_labels=3)
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg, kernels="triton").train()
    batch = collate([[0, 5, 6, 7, 2], [0, 9, 2], [0, 4, 4, 4, 4, 4, 2]], pad_id=1, labels=[2, 0, 1])
    with SyncCounter() as counter:
        out = model(**model_inputs(batch, torch.device("cpu")))
        out.loss.backward()
    assert torch.isfinite(out.loss)
    assert counter.total == 0, dict(counter.by_line)
    with SyncCounter() as checked:  # the counter does see the checks that validate=True makes
        model(**batch).loss.backward()
    assert checked.total > 0
