"""fastroberta's native models where transformers users already are: the ModelOutput protocol of every output,
``return_dict=False``, transformers.Trainer (train with activation checkpointing, evaluate with compute_metrics,
save, resume, reload) and accelerate, for the masked-LM and sequence-classification heads. Tiny models on CPU,
the eager-reference kernels (the Triton path's parity with them is tested in test_model / test_heads)."""
import numpy as np
import pytest
import torch

from fastroberta import (RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification,
                         RobertaForTokenClassification, RobertaModel)
from fastroberta.outputs import ClassifierOutput, MaskedLMOutput

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V, L, N = 60, 12, 16


def tiny_config(**kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=L + 4, num_labels=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return RobertaConfig(**{**base, **kw})


def rows(head, n=N, seed=0):
    """Examples as a Trainer dataset: a class that token 1 decides, or every third token to predict."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, V, (L,), generator=g)
        mask = torch.ones(L, dtype=torch.long)
        if head == "mlm":
            labels = torch.full((L,), -100)
            labels[2::3] = ids[2::3]
        else:
            labels = torch.tensor(int(ids[1] > V // 2))
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def batch(head, n=3):
    examples = rows(head, n)
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


HEADS = {"mlm": RobertaForMaskedLM, "cls": RobertaForSequenceClassification}


# --------------------------------------------------------------------------------------------- outputs
def test_output_protocol_with_loss():
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(tiny_config(), kernels="torch")
    out = model(**batch("cls"))
    assert out.keys() == ["loss", "logits"] and "loss" in out and "hidden_states" not in out
    assert out["loss"] is out.loss and out[0] is out.loss and out[1] is out.logits and out[-1] is out.logits
    assert out[1:] == (out.logits,) and out.to_tuple() == (out.loss, out.logits) and len(out) == 2
    assert list(out) == ["loss", "logits"] and dict(out) == {"loss": out.loss, "logits": out.logits}
    assert out.values() == [out.loss, out.logits] and out.items() == [("loss", out.loss), ("logits", out.logits)]
    assert out.hidden_states is None and out.get("hidden_states") is None
    with pytest.raises(KeyError):
        out["hidden_states"]  # a field left None is not a key, as in transformers' ModelOutput
    with pytest.raises(IndexError):
        out[2]
    out["logits"] = out.logits * 2
    assert out[1] is out.logits


def test_output_protocol_without_loss_and_with_hidden_states():
    model = RobertaForMaskedLM(tiny_config(), kernels="torch")
    b = batch("mlm")
    out = model(b["input_ids"], output_hidden_states=True)
    assert out.keys() == ["logits", "hidden_states"] and out[0] is out.logits
    assert out[1] is out.hidden_states and len(out.hidden_states) == 2
    labelled = model(**b)
    assert labelled.keys() == ["loss", "num_correct", "num_labels"] and labelled[0] is labelled.loss
    base = RobertaModel(tiny_config(), kernels="torch")(b["input_ids"])
    assert base[0] is base.last_hidden_state and base.keys() == ["last_hidden_state"]


@pytest.mark.parametrize("cls", [RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification,
                                 RobertaForTokenClassification])
def test_return_dict_false_is_the_tuple(cls):
    torch.manual_seed(0)
    model = cls(tiny_config(), kernels="torch").eval()
    b = batch("mlm" if cls is RobertaForTokenClassification else ("cls" if cls is RobertaForSequenceClassification
                                                                  else "mlm"))
    if cls is RobertaForTokenClassification:
        b["labels"] = b["labels"].clamp(-100, 1)
    if cls is RobertaModel:
        b.pop("labels")
    as_dict = model(**b)
    as_tuple = model(**b, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for got, want in zip(as_tuple, as_dict.to_tuple()):
        torch.testing.assert_close(got, want)
    if cls is not RobertaModel:
        loss, *_ = as_tuple  # transformers' habit: loss first when labels are given
        torch.testing.assert_close(loss, as_dict.loss)


def test_outputs_do_not_import_transformers():
    import subprocess
    import sys
    code = ("import sys, fastroberta.model, fastroberta.outputs; "
            "assert 'transformers' not in sys.modules, 'fastroberta.model imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------- Trainer
def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                max_steps=4, learning_rate=1e-3, report_to="none", use_cpu=True, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**base, **kw})


@pytest.mark.parametrize("head", ["mlm", "cls"])
def test_trainer_trains_evaluates_saves_and_reloads(head, tmp_path):
    """Trainer.train (activation checkpointing on, as gradient_checkpointing=True asks), evaluate with
    compute_metrics, then the two ways back: Trainer's own state-dict folder and save_pretrained's HF folder."""
    from safetensors.torch import load_file
    torch.manual_seed(0)
    cls = HEADS[head]
    model = cls(tiny_config(), kernels="torch")
    seen = {}

    def compute_metrics(prediction):
        seen["prediction"] = prediction
        if head == "cls":
            return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}
        num_correct, num_labels = prediction.predictions  # per eval batch: the MLM head's labelled-row counts
        return {"accuracy": float(num_correct.sum() / num_labels.sum())}

    data = rows(head)
    args = training_args(tmp_path / "run", activation_checkpointing=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                   compute_metrics=compute_metrics)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert model.is_activation_checkpointing  # switched on by Trainer.train
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        direct = [model(**{k: torch.stack([e[k] for e in data[i:i + 4]]) for k in data[0]}) for i in range(0, N, 4)]
    torch.testing.assert_close(metrics["eval_loss"], float(torch.stack([o.loss for o in direct]).mean()),
                               rtol=1e-5, atol=1e-6)
    prediction = seen["prediction"]
    if head == "cls":
        assert prediction.predictions.shape == (N, 2)
        np.testing.assert_allclose(prediction.predictions, torch.cat([o.logits for o in direct]).numpy(),
                                   rtol=1e-5, atol=1e-6)
        assert prediction.label_ids.shape == (N,)
    else:
        num_correct, num_labels = prediction.predictions
        assert num_labels.tolist() == [16] * 4 and num_correct.tolist() == [int(o.num_correct) for o in direct]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0

    # Trainer.save_model writes the state dict (the model is not a transformers.PreTrainedModel) ...
    trainer.save_model(str(tmp_path / "trainer"))
    fresh = cls(tiny_config(), kernels="torch")
    fresh.load_state_dict(load_file(str(tmp_path / "trainer" / "model.safetensors")))
    # ... and save_pretrained a folder that from_pretrained (ours and transformers') reads.
    model.save_pretrained(str(tmp_path / "hf"))
    reloaded = cls.from_pretrained(str(tmp_path / "hf"), kernels="torch")
    hf = getattr(transformers, cls.__name__).from_pretrained(str(tmp_path / "hf"))
    b = batch(head)
    for other in (fresh, reloaded, hf):
        other.eval()
        with torch.no_grad():
            want, got = model(**b), other(**b)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    again = transformers.Trainer(model=reloaded, args=training_args(tmp_path / "again"), eval_dataset=data)
    torch.testing.assert_close(again.evaluate()["eval_loss"], metrics["eval_loss"], rtol=1e-5, atol=1e-6)


def test_trainer_resumes_from_its_checkpoint(tmp_path):
    """A run stopped after 2 of 4 steps and resumed from Trainer's checkpoint ends with the weights of the run
    that was never stopped (Trainer reloads the state dict it saved)."""
    data = rows("cls")

    def run(out, steps, resume=None, **kw):
        torch.manual_seed(0)
        model = RobertaForSequenceClassification(tiny_config(), kernels="torch")
        args = training_args(out, max_steps=steps, **kw)
        transformers.Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "part", 4, save_strategy="steps", save_steps=2)
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "part" / "checkpoint-2"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def word_tokenizer():
    """A transformers tokenizer over V - 3 words plus RoBERTa's <s>, <pad>, </s> ids (0, 1, 2), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def test_trainer_with_a_tokenizer_and_bf16(tmp_path):
    """Trainer(processing_class=tokenizer, bf16=True): it aligns the config's special ids with the tokenizer's,
    trains under bf16 autocast, and saves the tokenizer next to the weights; text in, loss out."""
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(tiny_config(), kernels="torch")
    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{int(i)}" for i in e["input_ids"]) for e in rows("cls")]
    data = [{**tokenizer(t), "labels": int(e["labels"])} for t, e in zip(texts, rows("cls"))]
    assert data[0]["input_ids"] == rows("cls")[0]["input_ids"].tolist()
    autocast_seen = []
    model.roberta.embeddings.register_forward_pre_hook(
        lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, bf16=True), train_dataset=data,
                                   eval_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert autocast_seen and all(autocast_seen)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert np.isfinite(trainer.evaluate()["eval_loss"])
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert model.config.pad_token_id == tokenizer.pad_token_id == 1


def test_checkpointing_switches():
    model = RobertaForMaskedLM(tiny_config(), kernels="torch")
    assert model.supports_gradient_checkpointing and model.main_input_name == "input_ids"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.roberta.gradient_checkpointing and model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    with pytest.raises(ValueError, match="non-reentrant"):
        model.activation_checkpointing_enable({"use_reentrant": True})
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))


@pytest.mark.parametrize("head", ["mlm", "cls"])
def test_accelerate_trains_under_bf16_autocast(head):
    """accelerate's prepare / backward with mixed_precision="bf16" (autocast on CPU): the loss is close to
    fp32's and a few steps of AdamW lower it."""
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = HEADS[head](tiny_config(), kernels="torch")
    b = batch(head, n=8)
    model.eval()
    with torch.no_grad():
        fp32_loss = float(model(**b).loss)
    model.train()
    # accelerate keeps one process-wide state; the Trainer tests above made it without mixed precision.
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    autocast_seen = []
    model.roberta.embeddings.register_forward_pre_hook(
        lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for _ in range(6):
        out = model(**b)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    assert abs(losses[0] - fp32_loss) < 0.05 * fp32_loss, (losses[0], fp32_loss)
    assert losses[-1] < losses[0], losses
    assert autocast_seen == [True] * 6
