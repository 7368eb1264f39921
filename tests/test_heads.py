"""RobertaModel and the classification heads are numerically Hugging Face's classes of the same names: same
outputs, losses and gradients from the same weights, on the eager ops and the Triton kernels (interpreter on
CPU), padded and unpadded; checkpoints move both ways, and loading an MLM checkpoint into a head model
initialises the head with a warning, as transformers does."""
import warnings

import pytest
import torch

from fastroberta import (RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification,
                         RobertaForTokenClassification, RobertaModel)
from fastroberta.hf import from_hf_state_dict, to_hf_state_dict
from fastroberta.kernels.layer_norm import FusedLayerNorm
from fastroberta.model import EncoderLayer, MLMHead

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           max_position_embeddings=40)
HF_CLASSES = {RobertaModel: "RobertaModel", RobertaForMaskedLM: "RobertaForMaskedLM",
              RobertaForSequenceClassification: "RobertaForSequenceClassification",
              RobertaForTokenClassification: "RobertaForTokenClassification"}


def make_pair(cls, kernels="torch", **extra):
    torch.manual_seed(1)
    hf_cfg = transformers.RobertaConfig(**CFG, type_vocab_size=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, **extra)
    hf_cls = getattr(transformers, HF_CLASSES[cls])
    kwargs = {"add_pooling_layer": False} if cls is RobertaModel else {}
    hf = hf_cls._from_config(hf_cfg, attn_implementation="eager", **kwargs).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a swapped parameter would show
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = cls(RobertaConfig(**CFG, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra),
               kernels=kernels).eval()
    state, missing, unexpected = from_hf_state_dict(ours, hf.state_dict())
    assert not missing and not unexpected, (missing, unexpected)
    ours.load_state_dict(state)
    return hf, ours


def batch(lengths=(14, 9, 16), seed=2):
    g = torch.Generator().manual_seed(seed)
    b, l = len(lengths), max(lengths)
    ids = torch.full((b, l), 1, dtype=torch.long)
    mask = torch.zeros(b, l, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, CFG["vocab_size"], (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 0, 2
        mask[i, :n] = 1
    return ids, mask, g


def grads_in_hf_names(model):
    clone = type(model)(model.config, kernels="torch")
    with torch.no_grad():
        for (_, p), (_, src) in zip(clone.named_parameters(), model.named_parameters()):
            p.copy_(src.grad if src.grad is not None else torch.zeros_like(src))
    return to_hf_state_dict(clone)


def assert_grads_match(hf, ours):
    hf_grads = {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}
    hf_grads.pop("lm_head.decoder.weight", None)  # tied; its grad is the word embedding's
    mapped = grads_in_hf_names(ours)
    assert hf_grads and set(hf_grads) <= set(mapped)
    for k, g in hf_grads.items():
        # The key bias gradient is zero in theory (softmax is shift-invariant): rounding only, hence the floor.
        assert (mapped[k] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-7, k


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("unpad", [False, True])
def test_roberta_model_matches_hf(kernels, unpad):
    hf, ours = make_pair(RobertaModel, kernels)
    ids, mask, _ = batch()
    ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    out = ours(ids, attention_mask=mask, output_hidden_states=True, unpad=unpad)
    real = mask.bool()
    assert len(out.hidden_states) == len(ref.hidden_states) == CFG["num_hidden_layers"] + 1
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], atol=1e-5, rtol=1e-4)
    if unpad:  # scattered back once: padding holds zeros
        assert out.last_hidden_state[~real].abs().max() == 0
    weights = torch.randn_like(ref.last_hidden_state) * real[..., None]
    (ref.last_hidden_state * weights).sum().backward()
    (out.last_hidden_state * weights).sum().backward()
    assert_grads_match(hf, ours)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("problem", ["regression", "single_label_classification", "multi_label_classification"])
def test_sequence_classification_matches_hf(kernels, problem):
    num_labels = 1 if problem == "regression" else 3
    hf, ours = make_pair(RobertaForSequenceClassification, kernels, num_labels=num_labels)
    ids, mask, g = batch()
    if problem == "regression":
        labels = torch.randn(3, generator=g)
    elif problem == "single_label_classification":
        labels = torch.tensor([2, 0, 1])
    else:
        labels = (torch.rand(3, num_labels, generator=g) < 0.5).float()
    # problem_type is left to HF's rule (num_labels and the labels' dtype) in both.
    assert ours.problem_type_for(labels) == problem
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    assert hf.config.problem_type == problem
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(hf, ours)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_token_classification_matches_hf(kernels):
    hf, ours = make_pair(RobertaForTokenClassification, kernels, num_labels=5)
    ids, mask, g = batch()
    labels = torch.where(mask.bool(), torch.randint(0, 5, ids.shape, generator=g), torch.full_like(ids, -100))
    labels[0, 0] = -100
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(hf, ours)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_masked_lm_unpadded_matches_hf(kernels):
    hf, ours = make_pair(RobertaForMaskedLM, kernels)
    ids, mask, g = batch()
    labels = torch.where((torch.rand(ids.shape, generator=g) < 0.4) & mask.bool(), ids, torch.full_like(ids, -100))
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels, unpad=True)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(hf, ours)


@pytest.mark.parametrize("cls", [RobertaModel, RobertaForSequenceClassification, RobertaForTokenClassification])
def test_checkpoints_round_trip_both_ways(cls, tmp_path):
    extra = {} if cls is RobertaModel else {"num_labels": 4}
    hf, ours = make_pair(cls, **extra)
    ids, mask, _ = batch()
    real = mask.bool()

    def first(out):  # padded positions differ by definition (our attention gives them zeros)
        if cls is RobertaModel:
            return out.last_hidden_state[real]
        return out.logits[real] if cls is RobertaForTokenClassification else out.logits

    hf.save_pretrained(tmp_path / "from_hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing unused
        loaded = cls.from_pretrained(str(tmp_path / "from_hf"), kernels="torch").eval()
    assert loaded.config.num_labels == ours.config.num_labels
    with torch.no_grad():
        torch.testing.assert_close(first(loaded(ids, mask)), first(ours(ids, mask)), atol=1e-6, rtol=0)
    ours.save_pretrained(str(tmp_path / "from_us"))
    back, info = getattr(transformers, HF_CLASSES[cls]).from_pretrained(
        str(tmp_path / "from_us"), output_loading_info=True, attn_implementation="eager")
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]  # we have no pooler
    assert not missing and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(first(back.eval()(input_ids=ids, attention_mask=mask)), first(ours(ids, mask)),
                                   atol=1e-5, rtol=1e-5)


def test_mlm_checkpoint_into_classifier_warns_and_initialises_head(tmp_path):
    _, mlm = make_pair(RobertaForMaskedLM)
    mlm.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="newly initialised.*classifier.out_proj.weight") as record:
        model, info = RobertaForSequenceClassification.from_pretrained(str(tmp_path), kernels="torch",
                                                                       num_labels=3, output_loading_info=True)
    assert "lm_head.dense.weight" in str(record[0].message)
    assert sorted(info["missing_keys"]) == ["classifier.dense.bias", "classifier.dense.weight",
                                            "classifier.out_proj.bias", "classifier.out_proj.weight"]
    assert "lm_head.bias" in info["unexpected_keys"]
    assert model.classifier.out_proj.weight.shape == (3, CFG["hidden_size"])
    torch.testing.assert_close(model.roberta.embeddings.word_embeddings.weight,
                               mlm.roberta.embeddings.word_embeddings.weight)
    # transformers reports the same keys
    _, hf_info = transformers.RobertaForSequenceClassification.from_pretrained(
        str(tmp_path), num_labels=3, output_loading_info=True)
    assert sorted(hf_info["missing_keys"]) == sorted(info["missing_keys"])


def test_checkpoint_without_encoder_weights_is_an_error(tmp_path):
    _, ours = make_pair(RobertaModel)
    ours.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("encoder.layer.1.output.dense.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks encoder weights.*layers.1.ffn_out.weight"):
        RobertaModel.from_pretrained(str(tmp_path), kernels="torch")


def test_classification_label_errors():
    model = RobertaForSequenceClassification(RobertaConfig(**CFG, num_labels=3), kernels="torch")
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match=r"label 3 is outside the classes \[0, 3\)"):
        model(ids, mask, labels=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="multi-label classification needs labels of shape"):
        model(ids, mask, labels=torch.ones(3, 2))
    tokens = RobertaForTokenClassification(RobertaConfig(**CFG, num_labels=3), kernels="torch")
    with pytest.raises(ValueError, match="label 7 is outside the classes"):
        tokens(ids, mask, labels=torch.full_like(ids, 7))
    with pytest.raises(ValueError, match="problem_type"):
        RobertaConfig(**CFG, problem_type="ranking")


def test_parts_run_alone_with_their_own_kernel_choice():
    cfg = RobertaConfig(**CFG, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    layers = [EncoderLayer(cfg, kernels=k).eval() for k in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 7, cfg.hidden_size)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    padded = [layer(x, mask) for layer in layers]
    torch.testing.assert_close(padded[1][mask.bool()], padded[0][mask.bool()], atol=1e-5, rtol=1e-5)
    packed = x[mask.bool()]
    cu = torch.tensor([0, 7, 11], dtype=torch.int32)
    for layer, want in zip(layers, padded):
        torch.testing.assert_close(layer(packed, cu_seqlens=cu, max_seqlen=7), want[mask.bool()], atol=1e-5,
                                   rtol=1e-5)
    assert layers[0].ops(x.device).name == "torch" and layers[1].ops(x.device).name == "triton"
    head = MLMHead(cfg, kernels="torch")
    decoder = torch.randn(cfg.vocab_size, cfg.hidden_size)
    h = torch.randn(5, cfg.hidden_size)
    labels = torch.tensor([3, -100, 7, -100, 1])
    loss, correct, n = head.loss(h, decoder, labels)
    logits = head(h, decoder)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    assert int(n) == 3
    ln = FusedLayerNorm(cfg.hidden_size, kernels="torch")
    assert list(ln.state_dict()) == ["weight", "bias"]


def test_kernel_choice_is_resolved_once_and_moves_with_the_module(monkeypatch):
    model = RobertaForMaskedLM(RobertaConfig(**CFG), kernels="auto").eval()
    ids, mask, _ = batch()
    model(ids, mask)
    layer = model.roberta.layers[0]
    assert layer._ops is not None and layer._ops.name == "torch"
    model.to(torch.float32)  # any move forgets the resolution ...
    assert layer._ops is None
    monkeypatch.setenv("FASTROBERTA_KERNELS", "triton")
    model(ids, mask)  # ... and the next forward resolves again
    assert layer._ops.name == "triton" and model.lm_head.layer_norm._ops.name == "triton"
    model.kernels = "torch"  # setting the choice reaches every part
    assert all(m.kernels == "torch" for m in model.modules() if hasattr(m, "_kernels"))
    with pytest.raises(ValueError, match="kernels must be one of"):
        model.kernels = "cuda"


def test_unpadded_input_errors():
    model = RobertaForMaskedLM(RobertaConfig(**CFG), kernels="torch")
    ids, mask, _ = batch(lengths=(6, 4))
    labels = torch.full_like(ids, -100)
    labels[1, 5] = 7  # on padding
    with pytest.raises(ValueError, match="label sits on a padding position"):
        model(ids, mask, labels, unpad=True)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen=5 is shorter than the longest segment"):
        model(ids, mask, cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(TypeError, match="max_seqlen must be an int"):
        model(ids, mask, cu_seqlens=cu, max_seqlen=torch.tensor(6))
    with pytest.raises(ValueError, match="cu_seqlens is not supported"):
        RobertaForSequenceClassification(RobertaConfig(**CFG), kernels="torch")(ids, mask, cu_seqlens=cu)
