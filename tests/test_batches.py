"""The loader's batches on their way to the model: checked on the host, prepared one ahead without moving the
position a checkpoint records, and handed to the model as keyword arguments that need no device reads."""
import pytest
import torch

from fastroberta.data import MLMDataLoader, check_batch, prepare_dataset
from fastroberta.train import model_inputs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_dataset(None, cache_dir=tmp_path_factory.getbasetemp() / "fastroberta-cache",
                           show_progress=False)


def test_prefetching_keeps_the_checkpointed_position(prepared):
    loader = MLMDataLoader(prepared, seq_len=64, micro_batch_size=2, packing="varlen")
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()  # taken while the fourth batch is being prepared in the background
    fourth = next(it)
    resumed = MLMDataLoader(prepared, seq_len=64, micro_batch_size=2, packing="varlen")
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert state["step"] == 3 and again.keys() == fourth.keys()
    assert all(torch.equal(again[k], fourth[k]) for k in again)
    loader.set_epoch(0)  # a moved position discards the batch prepared ahead
    assert torch.equal(next(it)["input_ids"], first[0]["input_ids"])


def test_bad_batches_are_caught_on_the_host(prepared):
    batch = MLMDataLoader(prepared, seq_len=64, micro_batch_size=2, packing="varlen").collate(0, [0, 1])
    check_batch(batch, prepared.vocab_size)
    bad = dict(batch, input_ids=batch["input_ids"].clone())
    bad["input_ids"][0, 1] = prepared.vocab_size
    with pytest.raises(ValueError, match="token ids outside the vocabulary"):
        check_batch(bad, prepared.vocab_size)
    bad = dict(batch, labels=batch["labels"].clone())
    bad["labels"][1, -1] = 5  # on padding, or past the last real token
    bad["attention_mask"] = batch["attention_mask"].clone()
    bad["attention_mask"][1, -1] = 0
    with pytest.raises(ValueError, match="label outside the vocabulary"):
        check_batch(bad, prepared.vocab_size)
    bad = dict(batch, cu_seqlens=batch["cu_seqlens"].clone())
    bad["cu_seqlens"][-1] -= 1
    with pytest.raises(ValueError, match="cu_seqlens do not count its real tokens"):
        check_batch(bad, prepared.vocab_size)


def test_model_inputs_need_no_device_reads(prepared):
    batch = MLMDataLoader(prepared, seq_len=64, micro_batch_size=2, packing="varlen").collate(0, [0, 1])
    inputs = model_inputs(batch, torch.device("cpu"))
    cu = batch["cu_seqlens"]
    assert inputs["validate"] is False
    assert inputs["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    assert set(inputs) == {"input_ids", "attention_mask", "labels", "cu_seqlens", "max_seqlen", "validate"}
