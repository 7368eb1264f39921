"""RobertaForQuestionAnswering, RobertaForMultipleChoice and RobertaModel's pooler are numerically Hugging Face's
classes of the same names: same outputs, losses and gradients from the same weights, on the eager ops and the
Triton kernels (interpreter on CPU); checkpoints move both ways. The one intended difference, padding positions
masked out of the question-answering softmax, is checked against transformers run on each row without padding.
Also: the token head against what NER needs, and transformers.Trainer over the new heads."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastroberta import (MultipleChoiceOutput, QuestionAnsweringOutput, RobertaConfig, RobertaForMaskedLM,
                         RobertaForMultipleChoice, RobertaForQuestionAnswering, RobertaModel)
from fastroberta.hf import from_hf_state_dict, to_hf_state_dict
from test_heads import CFG, batch

transformers = pytest.importorskip("transformers")


def make_pair(cls, kernels="torch", pooler=False, **extra):
    torch.manual_seed(1)
    hf_cfg = transformers.RobertaConfig(**CFG, type_vocab_size=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, **extra)
    hf_kwargs, our_kwargs = {}, {}
    if cls is RobertaModel:
        hf_kwargs = our_kwargs = {"add_pooling_layer": pooler}
    hf = getattr(transformers, cls.__name__)._from_config(hf_cfg, attn_implementation="eager", **hf_kwargs).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a swapped parameter would show
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = cls(RobertaConfig(**CFG, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra),
               kernels=kernels, **our_kwargs).eval()
    state, missing, unexpected = from_hf_state_dict(ours, hf.state_dict())
    assert not missing and not unexpected, (missing, unexpected)
    ours.load_state_dict(state)
    return hf, ours


def assert_grads_match(hf, ours):
    clone = copy.deepcopy(ours)
    with torch.no_grad():
        for p, src in zip(clone.parameters(), ours.parameters()):
            p.copy_(src.grad if src.grad is not None else torch.zeros_like(src))
    mapped = to_hf_state_dict(clone)
    hf_grads = {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}
    assert hf_grads and set(hf_grads) <= set(mapped)
    for k, g in hf_grads.items():
        # The key bias gradient is zero in theory (softmax is shift-invariant): rounding only, hence the floor.
        assert (mapped[k] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-7, k


def choices_batch(b=2, c=3, lengths=(14, 9, 16, 12, 16, 5), seed=4):
    ids, mask, g = batch(lengths, seed=seed)
    return ids.view(b, c, -1), mask.view(b, c, -1), g


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_question_answering_matches_hf(kernels):
    hf, ours = make_pair(RobertaForQuestionAnswering, kernels)
    ids, mask, _ = batch(lengths=(16, 16, 16, 16))
    # An ordinary answer, one past the sequence (ignored), a negative one (HF clamps it to 0, the <s> token).
    start = torch.tensor([3, 40, -5, 15])
    end = torch.tensor([5, 7, 2, 15])
    ref = hf(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end,
             output_hidden_states=True)
    out = ours(ids, attention_mask=mask, start_positions=start, end_positions=end, output_hidden_states=True)
    assert isinstance(out, QuestionAnsweringOutput) and len(out.hidden_states) == len(ref.hidden_states)
    torch.testing.assert_close(out.start_logits, ref.start_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.end_logits, ref.end_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(hf, ours)
    loss, start_logits, end_logits = ours(ids, mask, start, end, return_dict=False)[:3]
    assert torch.equal(start_logits, out.start_logits.detach()) and loss.dim() == 0
    assert len(ours(ids, mask, return_dict=False)) == 2  # no positions: no loss


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_question_answering_masks_padding_out_of_the_softmax(kernels):
    """On a padded batch the loss is transformers' loss over each row alone (no padding), the same padded or
    unpadded, and the logits at real tokens are transformers' on the padded batch."""
    hf, ours = make_pair(RobertaForQuestionAnswering, kernels)
    lengths = (14, 9, 16)
    ids, mask, _ = batch(lengths)
    start, end = torch.tensor([3, 2, 0]), torch.tensor([5, 30, 15])  # row 1's end is past L: ignored

    seq_len = ids.shape[1]
    start_terms, end_terms = [], []
    for i, n in enumerate(lengths):
        row = hf(input_ids=ids[i:i + 1, :n], attention_mask=mask[i:i + 1, :n])
        for terms, logits, pos in ((start_terms, row.start_logits, start), (end_terms, row.end_logits, end)):
            if pos[i] < seq_len:
                terms.append(F.cross_entropy(logits, pos[i:i + 1]))
    want = (torch.stack(start_terms).mean() + torch.stack(end_terms).mean()) / 2

    out = ours(ids, mask, start_positions=start, end_positions=end)
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        padded_ref = hf(input_ids=ids, attention_mask=mask)
        unpadded = ours(ids, mask, start_positions=start, end_positions=end, unpad=True)
    real = mask.bool()
    torch.testing.assert_close(out.start_logits[real], padded_ref.start_logits[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.end_logits[real], padded_ref.end_logits[real], atol=1e-5, rtol=1e-4)
    assert (out.start_logits[~real] == torch.finfo(torch.float32).min).all()
    torch.testing.assert_close(unpadded.loss, out.loss, atol=1e-6, rtol=1e-6)
    want.backward()
    out.loss.backward()
    assert_grads_match(hf, ours)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("unpad", [False, True])
def test_multiple_choice_matches_hf(kernels, unpad):
    hf, ours = make_pair(RobertaForMultipleChoice, kernels)
    ids, mask, _ = choices_batch()
    labels = torch.tensor([2, 0])
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    out = ours(ids, mask, labels=labels, output_hidden_states=True, unpad=unpad)
    assert isinstance(out, MultipleChoiceOutput) and out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    flat_real = mask.view(-1, mask.shape[-1]).bool()
    for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):  # of the [B * C, L] batch
        torch.testing.assert_close(got[flat_real], want[flat_real], atol=1e-5, rtol=1e-4)
    ref.loss.backward()
    out.loss.backward()
    assert_grads_match(hf, ours)
    assert ours.roberta.pooler.dense.weight.grad.abs().max() > 0


def test_multiple_choice_ignores_label_minus_100_and_returns_tuples():
    hf, ours = make_pair(RobertaForMultipleChoice)
    ids, mask, _ = choices_batch()
    labels = torch.tensor([-100, 1])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        loss, logits = ours(ids, mask, labels=labels, return_dict=False)
        (logits_only,) = ours(ids, mask, return_dict=False)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(logits[1:], labels[1:]))
    torch.testing.assert_close(logits_only, logits)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_roberta_model_pooler_matches_hf(kernels):
    hf, ours = make_pair(RobertaModel, kernels, pooler=True)
    ids, mask, _ = batch()
    ref = hf(input_ids=ids, attention_mask=mask)
    out = ours(ids, mask)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-4)
    assert out.keys() == ["last_hidden_state", "pooler_output"]
    weights = torch.randn_like(ref.pooler_output)
    (ref.pooler_output * weights).sum().backward()
    (out.pooler_output * weights).sum().backward()
    assert_grads_match(hf, ours)


def test_roberta_model_without_pooler_keeps_its_state_dict(tmp_path):
    config = RobertaConfig(**CFG)
    plain = RobertaModel(config, kernels="torch")
    assert plain.pooler is None and not any("pooler" in k for k in plain.state_dict())
    assert list(plain(*batch()[:2]).keys()) == ["last_hidden_state"]
    assert {k for k in RobertaModel(config, kernels="torch", add_pooling_layer=True).state_dict()} - set(
        plain.state_dict()) == {"pooler.dense.weight", "pooler.dense.bias"}
    hf, _ = make_pair(RobertaModel, pooler=True)
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pooler is skipped without a word, as before
        RobertaModel.from_pretrained(str(tmp_path), kernels="torch")
        pooled = RobertaModel.from_pretrained(str(tmp_path), kernels="torch", add_pooling_layer=True)
    torch.testing.assert_close(pooled.pooler.dense.weight, hf.pooler.dense.weight)
    with pytest.raises(ValueError, match="add_pooling_layer applies to RobertaModel only"):
        RobertaForMultipleChoice.from_pretrained(str(tmp_path), add_pooling_layer=True)


@pytest.mark.parametrize("cls", [RobertaForQuestionAnswering, RobertaForMultipleChoice, RobertaModel])
def test_checkpoints_round_trip_both_ways(cls, tmp_path):
    hf, ours = make_pair(cls, pooler=True)
    pooling = {"add_pooling_layer": True} if cls is RobertaModel else {}
    if cls is RobertaForMultipleChoice:
        ids, mask, _ = choices_batch()
    else:
        ids, mask, _ = batch(lengths=(16, 12))

    def first(out):
        if cls is RobertaModel:
            return out.pooler_output
        return out.logits if cls is RobertaForMultipleChoice else out.start_logits[mask.bool()]

    hf.save_pretrained(tmp_path / "from_hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing unused
        loaded = cls.from_pretrained(str(tmp_path / "from_hf"), kernels="torch", **pooling).eval()
    with torch.no_grad():
        torch.testing.assert_close(first(loaded(ids, mask)), first(ours(ids, mask)), atol=1e-6, rtol=0)
    ours.save_pretrained(str(tmp_path / "from_us"))
    back, info = getattr(transformers, cls.__name__).from_pretrained(
        str(tmp_path / "from_us"), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(first(back.eval()(input_ids=ids, attention_mask=mask)), first(ours(ids, mask)),
                                   atol=1e-5, rtol=1e-5)


def test_mlm_checkpoint_into_new_heads_initialises_what_transformers_does(tmp_path):
    _, mlm = make_pair(RobertaForMaskedLM)
    mlm.save_pretrained(str(tmp_path))
    for cls in (RobertaForQuestionAnswering, RobertaForMultipleChoice):
        with pytest.warns(UserWarning, match="newly initialised"):
            model, info = cls.from_pretrained(str(tmp_path), kernels="torch", output_loading_info=True)
        _, hf_info = getattr(transformers, cls.__name__).from_pretrained(str(tmp_path), output_loading_info=True)
        assert sorted(info["missing_keys"]) == sorted(hf_info["missing_keys"])
        torch.testing.assert_close(model.roberta.embeddings.word_embeddings.weight,
                                   mlm.roberta.embeddings.word_embeddings.weight)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight", "roberta.pooler.dense.bias",
                                            "roberta.pooler.dense.weight"]


def test_new_head_input_errors():
    qa = RobertaForQuestionAnswering(RobertaConfig(**CFG), kernels="torch")
    ids, mask, _ = batch()  # row 1 has 9 real tokens of 16
    with pytest.raises(ValueError, match="needs config.num_labels == 2"):
        RobertaForQuestionAnswering(RobertaConfig(**CFG, num_labels=3))
    with pytest.raises(ValueError, match="start_positions and end_positions come together"):
        qa(ids, mask, start_positions=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"end_positions\[1\] = 12 is a padding position"):
        qa(ids, mask, start_positions=torch.tensor([1, 1, 1]), end_positions=torch.tensor([2, 12, 3]))
    with pytest.raises(ValueError, match=r"start_positions must be \[batch\]"):
        qa(ids, mask, start_positions=torch.tensor([1, 1]), end_positions=torch.tensor([2, 2]))
    with pytest.raises(TypeError, match="start_positions must hold integer token positions"):
        qa(ids, mask, start_positions=torch.ones(3), end_positions=torch.ones(3))
    with pytest.raises(ValueError, match="cu_seqlens is not supported"):
        qa(ids, mask, cu_seqlens=torch.tensor([0, 39], dtype=torch.int32))
    mc = RobertaForMultipleChoice(RobertaConfig(**CFG), kernels="torch")
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, num_choices, seq_len\]"):
        mc(ids, mask)
    cids, cmask, _ = choices_batch()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mc(cids, cmask[:, :2])
    with pytest.raises(ValueError, match=r"label 3 is outside the classes \[0, 3\)"):
        mc(cids, cmask, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels has 3 entries but the batch has 2 questions"):
        mc(cids, cmask, labels=torch.tensor([0, 1, 2]))


def test_token_classification_serves_ner_labels_and_names(tmp_path):
    """What NER fine-tuning needs from the token head: a label on each word's first sub-word, -100 on the other
    sub-words, <s>, </s> and padding (the loss is the CE over the first sub-words alone), and the tag names
    (id2label) carried into the folder transformers' AutoModelForTokenClassification reads."""
    from fastroberta import RobertaForTokenClassification
    tags = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
    _, mlm = make_pair(RobertaForMaskedLM)
    mlm.save_pretrained(str(tmp_path / "mlm"))
    with pytest.warns(UserWarning, match="newly initialised"):
        model = RobertaForTokenClassification.from_pretrained(str(tmp_path / "mlm"), kernels="torch",
                                                              num_labels=5, id2label=tags)
    ids, mask, _ = batch(lengths=(12, 8))
    # Words of 1-3 sub-words; row 0: <s> w(2) w(1) w(3) w(1) w(2) w(1) </s> ...; row 1: <s> w(3) w(2) w(1) </s>
    first = torch.zeros_like(ids, dtype=torch.bool)
    first[0, [1, 3, 4, 7, 8, 10]] = True
    first[1, [1, 4, 6]] = True
    word_tags = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(3))
    labels = torch.where(first, word_tags, torch.full_like(ids, -100))
    model.eval()
    out = model(ids, mask, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[first], word_tags[first]))
    model.save_pretrained(str(tmp_path / "ner"))
    hf = transformers.AutoModelForTokenClassification.from_pretrained(str(tmp_path / "ner"))
    assert hf.config.id2label == tags and hf.config.label2id == {v: k for k, v in tags.items()}
    assert RobertaForTokenClassification.from_pretrained(str(tmp_path / "ner")).config.id2label == tags


@pytest.mark.parametrize("cls", [RobertaForQuestionAnswering, RobertaForMultipleChoice])
def test_trainer_trains_and_evaluates_the_new_heads(cls, tmp_path):
    """transformers.Trainer finds the heads' label names (start/end positions; labels) and reads their outputs:
    the loss first, then the logits it hands to compute_metrics."""
    torch.manual_seed(0)
    model = cls(RobertaConfig(**CFG), kernels="torch")
    ids, mask, _ = batch(lengths=(16, 11, 16, 7, 16, 13, 9, 16))
    if cls is RobertaForQuestionAnswering:
        data = [{"input_ids": i, "attention_mask": m, "start_positions": torch.tensor(1),
                 "end_positions": torch.tensor(int(m.sum()) - 2)} for i, m in zip(ids, mask)]
    else:
        data = [{"input_ids": i, "attention_mask": m, "labels": torch.tensor(k % 2)}
                for k, (i, m) in enumerate(zip(ids.view(4, 2, -1), mask.view(4, 2, -1)))]
    seen = {}

    def compute_metrics(prediction):
        seen["prediction"] = prediction
        return {}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          per_device_eval_batch_size=2, max_steps=2, learning_rate=1e-3,
                                          report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                   compute_metrics=compute_metrics)
    before = model.classifier.weight.clone() if cls is RobertaForMultipleChoice else model.qa_outputs.weight.clone()
    trainer.train()
    after = model.classifier.weight if cls is RobertaForMultipleChoice else model.qa_outputs.weight
    assert not torch.equal(before, after)
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    prediction = seen["prediction"]
    if cls is RobertaForQuestionAnswering:
        start_logits, end_logits = prediction.predictions
        assert start_logits.shape == end_logits.shape == (8, 16)
        assert [list(x) for x in prediction.label_ids] == [[1] * 8, [int(m.sum()) - 2 for m in mask]]
    else:
        assert prediction.predictions.shape == (4, 2) and list(prediction.label_ids) == [0, 1, 0, 1]
