"""The model is numerically Hugging Face's RobertaForMaskedLM: same logits, loss and gradients from the
same weights, and checkpoints that move both ways."""
import json
import os

import pytest
import torch

from fastroberta import RobertaConfig, RobertaForMaskedLM
from fastroberta.hf import from_hf_state_dict, to_hf_state_dict

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
           max_position_embeddings=40)


def hf_config(**kw):
    return transformers.RobertaConfig(**{**CFG, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
                                         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw})


def make_pair():
    torch.manual_seed(1)
    hf = transformers.RobertaForMaskedLM._from_config(hf_config(), attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped parameter would show
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = RobertaForMaskedLM(RobertaConfig(**CFG, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                              kernels="torch").eval()
    ours.load_state_dict(from_hf_state_dict(ours, hf.state_dict())[0])
    return hf, ours


def padded_batch(lengths=(30, 17, 5, 38), vocab=300, seed=2):
    g = torch.Generator().manual_seed(seed)
    b, l = len(lengths), max(lengths)
    ids = torch.full((b, l), 1, dtype=torch.long)
    mask = torch.zeros(b, l, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 0, 2
        mask[i, :n] = 1
    labels = torch.where((torch.rand(b, l, generator=g) < 0.3) & mask.bool(), ids, torch.full_like(ids, -100))
    return ids, mask, labels


def test_logits_match_hf_on_real_tokens():
    hf, ours = make_pair()
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    # Padded query positions are defined as zeros in our attention (HF lets them attend); only real tokens
    # carry meaning, and they must agree.
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)


def test_loss_and_gradients_match_hf():
    hf, ours = make_pair()
    ids, mask, labels = padded_batch()
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = ours(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=0)
    ref.backward()
    out.loss.backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}
    if "lm_head.decoder.weight" in hf_grads:  # tied; its grad is the word embedding's
        hf_grads.pop("lm_head.decoder.weight")
    mapped = to_hf_state_dict(_grads_as_model(ours))
    assert set(hf_grads) <= set(mapped)
    for k, g in hf_grads.items():
        # The key bias gradient is exactly zero in theory (softmax is shift-invariant): rounding noise only,
        # hence the small absolute floor.
        assert (mapped[k] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-9, k


def _grads_as_model(model):
    """A shallow copy of ``model`` whose state dict holds the gradients (so the HF name mapping applies)."""
    clone = RobertaForMaskedLM(model.config, kernels="torch")
    with torch.no_grad():
        for (name, p), (_, src) in zip(clone.named_parameters(), model.named_parameters()):
            p.copy_(src.grad if src.grad is not None else torch.zeros_like(src))
    return clone


def test_hf_checkpoint_round_trips(tmp_path):
    hf, ours = make_pair()
    ids, mask, labels = padded_batch()
    hf.save_pretrained(tmp_path / "from_hf")
    loaded = RobertaForMaskedLM.from_pretrained(str(tmp_path / "from_hf"), kernels="torch").eval()
    loaded.config.hidden_dropout_prob = loaded.config.attention_probs_dropout_prob = 0.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, labels).loss, hf(input_ids=ids, attention_mask=mask,
                                                                       labels=labels).loss, atol=1e-5, rtol=0)
    ours.save_pretrained(str(tmp_path / "from_us"))
    back, info = transformers.RobertaForMaskedLM.from_pretrained(str(tmp_path / "from_us"), output_loading_info=True,
                                                                 attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    back.eval()
    assert back.lm_head.decoder.weight.data_ptr() == back.roberta.embeddings.word_embeddings.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, labels=labels).loss,
                                   ours(ids, mask, labels).loss, atol=1e-5, rtol=0)


def test_pytorch_model_bin_is_read(tmp_path):
    hf, _ = make_pair()
    hf.save_pretrained(tmp_path, safe_serialization=False) if _supports_bin() else _write_bin(hf, tmp_path)
    model = RobertaForMaskedLM.from_pretrained(str(tmp_path), kernels="torch")
    torch.testing.assert_close(model.roberta.embeddings.word_embeddings.weight, hf.roberta.embeddings.word_embeddings.weight)


def _supports_bin():
    import inspect
    return "safe_serialization" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def _write_bin(hf, path):
    hf.config.save_pretrained(path)
    torch.save(hf.state_dict(), os.path.join(path, "pytorch_model.bin"))


def test_labels_never_build_full_logits():
    _, ours = make_pair()
    ids, mask, labels = padded_batch()
    out = ours(ids, mask, labels)
    assert out.logits is None and out.loss is not None
    assert int(out.num_labels) == int((labels != -100).sum())


def test_all_padding_row_is_finite():
    _, ours = make_pair()
    ids, mask, labels = padded_batch()
    mask[1] = 0
    ids[1] = 1
    labels[1] = -100
    out = ours(ids, mask, labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    with torch.no_grad():
        assert torch.isfinite(ours(ids, mask).logits).all()


def test_no_labelled_token_gives_zero_loss():
    _, ours = make_pair()
    ids, mask, labels = padded_batch()
    out = ours(ids, mask, torch.full_like(labels, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in ours.parameters() if p.grad is not None)


# Bad input ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny():
    return RobertaForMaskedLM(RobertaConfig(**CFG), kernels="torch")


def test_token_id_out_of_range(tiny):
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        tiny(torch.tensor([[0, 300, 2]]))
    with pytest.raises(ValueError, match="token id -1"):
        tiny(torch.tensor([[0, -1, 2]]))


def test_sequence_longer_than_position_table(tiny):
    ok = torch.full((1, 38), 5)
    tiny(ok)  # 40 positions - padding_idx - 1 = 38 tokens fit
    with pytest.raises(ValueError, match="exceeds the position table"):
        tiny(torch.full((1, 39), 5))


def test_mask_shape_and_dtypes(tiny):
    ids = torch.full((2, 8), 5)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tiny(ids, attention_mask=torch.ones(2, 7))
    with pytest.raises(TypeError, match="integer token ids"):
        tiny(ids.float())
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq_len\]"):
        tiny(ids[0])
    with pytest.raises(ValueError, match="label 300 is outside"):
        tiny(ids, labels=torch.full((2, 8), 300))


def test_unknown_kernels_value():
    with pytest.raises(ValueError, match="kernels must be one of"):
        RobertaForMaskedLM(RobertaConfig(**CFG), kernels="cuda")


def test_env_override_is_validated(tiny, monkeypatch):
    tiny.kernels = "auto"
    monkeypatch.setenv("FASTROBERTA_KERNELS", "fast")
    with pytest.raises(ValueError, match="FASTROBERTA_KERNELS"):
        tiny(torch.full((1, 4), 5))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        RobertaConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        RobertaConfig.preset("huge")
    assert RobertaConfig.tiny().num_hidden_layers == 4 and RobertaConfig.large().hidden_size == 1024


def test_checkpoint_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        RobertaForMaskedLM.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        RobertaForMaskedLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ValueError, match="not a RoBERTa model"):
        RobertaForMaskedLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", **CFG}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        RobertaForMaskedLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RobertaForMaskedLM.from_pretrained(str(tmp_path))


def test_packed_documents_equal_separate_rows():
    """A row packing two documents with cu_seqlens gives each document the logits it has alone: positions
    restart per document and documents do not attend to each other."""
    _, ours = make_pair()
    g = torch.Generator().manual_seed(5)
    doc_a, doc_b, doc_c = (torch.randint(3, 300, (n,), generator=g) for n in (9, 14, 6))
    packed = torch.full((2, 24), 1, dtype=torch.long)
    packed[0, :23] = torch.cat([doc_a, doc_b])
    packed[1, :6] = doc_c
    mask = packed.ne(1).long()
    cu = torch.tensor([0, 9, 23, 29], dtype=torch.int32)
    separate = torch.full((3, 14), 1, dtype=torch.long)
    for i, d in enumerate((doc_a, doc_b, doc_c)):
        separate[i, :len(d)] = d
    with torch.no_grad():
        got = ours(packed, attention_mask=mask, cu_seqlens=cu).logits
        ref = ours(separate, attention_mask=separate.ne(1).long()).logits
    torch.testing.assert_close(got[0, :9], ref[0, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 9:23], ref[1, :14], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :6], ref[2, :6], atol=1e-5, rtol=1e-5)
    labels = torch.where(mask.bool(), packed, torch.full_like(packed, -100))
    assert torch.isfinite(ours(packed, mask, labels, cu_seqlens=cu).loss)


def test_cu_seqlens_validation(tiny):
    ids = torch.full((1, 6), 5)
    mask = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="needs the attention_mask"):
        tiny(ids, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        tiny(ids, mask, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="ends at 5 but attention_mask has 6"):
        tiny(ids, mask, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="never decrease"):
        tiny(ids, mask, cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32))


def test_flops_per_token_counts_every_matmul_weight():
    """Cross-check the closed formula against the model's actual Linear/embedding shapes."""
    model = RobertaForMaskedLM(RobertaConfig.tiny(vocab_size=500), kernels="torch")
    c, seq, p = model.config, 128, 0.15
    encoder = sum(m.weight.numel() for layer in model.roberta.layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear))
    head = model.lm_head.dense.weight.numel() + model.roberta.embeddings.word_embeddings.weight.numel()
    expected = 6 * encoder + 12 * c.num_hidden_layers * c.hidden_size * seq + 6 * p * head
    assert model.flops_per_token(seq, p) == pytest.approx(expected)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_embeddings_drop_out_after_the_layer_norm(kernels):
    """As transformers' RobertaEmbeddings: LayerNorm(word + position + type), then dropout. Dropout after the
    LayerNorm leaves exact zeros (scaled survivors elsewhere); before it, the normalized rows would have none."""
    from fastroberta.model import Embeddings
    cfg = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.5)
    emb = Embeddings(cfg, kernels=kernels)
    ids = torch.randint(3, 50, (4, 16))
    pos = torch.arange(2, 18).expand(4, 16)
    emb.eval()
    kept = emb(ids, pos)
    emb.train()
    dropped = emb(ids, pos)
    zeros = dropped == 0
    assert 0.3 < zeros.float().mean() < 0.7
    torch.testing.assert_close(dropped[~zeros], 2 * kept[~zeros])
