"""fastroberta.apply_kernels on Hugging Face transformers' own encoders: patched vs unpatched parity per
architecture, both kernel paths (Triton through the interpreter, the eager reference), dropout statistics,
padding, the two patching modes, and a few steps of transformers.Trainer."""
import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastroberta  # noqa: E402
from fastroberta import hf_kernels  # noqa: E402
from fastroberta import kernels as triton_ops  # noqa: E402
from fastroberta.kernels import reference as torch_ops  # noqa: E402

transformers.logging.set_verbosity_error()

V, B, L = 50, 3, 13  # tiny vocab; L odd so no block divides it
ARCHS = {
    "roberta": (transformers.RobertaConfig, "Roberta", dict(pad_token_id=1, type_vocab_size=1)),
    "xlm-roberta": (transformers.XLMRobertaConfig, "XLMRoberta", dict(pad_token_id=1, type_vocab_size=1)),
    "camembert": (transformers.CamembertConfig, "Camembert", dict(pad_token_id=1, type_vocab_size=1)),
    "bert": (transformers.BertConfig, "Bert", dict(pad_token_id=0, type_vocab_size=2)),
    # embedding_size != hidden_size: ELECTRA projects its (narrower) embeddings up.
    "electra": (transformers.ElectraConfig, "Electra", dict(pad_token_id=0, type_vocab_size=2, embedding_size=16)),
}
TASKS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
CUDA = torch.cuda.is_available()


def device_for(kernels):
    """The Triton path runs on CUDA where there is one (the interpreter is only switched on without CUDA)."""
    return torch.device("cuda" if kernels == "triton" and CUDA else "cpu")


def tolerances(device):
    """(rtol, atol) for outputs and for gradients: fp32 on CPU is exact to rounding; on a GPU the kernels'
    fp32 dots may run in TF32."""
    if device.type == "cuda":
        return dict(rtol=2e-3, atol=2e-3), dict(rtol=1e-2, atol=1e-3)
    return dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=2e-5)


def to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def make_config(arch, dropout=0.0, layers=1, **overrides):
    config_cls, _, extra = ARCHS[arch]
    kwargs = dict(vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=L + 4, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, num_labels=3, **extra)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def model_class(arch, task):
    return getattr(transformers, ARCHS[arch][1] + task)


def make_batch(arch, task, seed=0):
    """Right padding in row 1, a padding hole in row 2, token types for BERT/ELECTRA, labels for the task."""
    g = torch.Generator().manual_seed(seed)
    pad = ARCHS[arch][2]["pad_token_id"]
    ids = torch.randint(3, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 4:6] = 0
    ids[mask == 0] = pad
    batch = {"input_ids": ids, "attention_mask": mask}
    if ARCHS[arch][2]["type_vocab_size"] > 1:
        batch["token_type_ids"] = (torch.arange(L) >= 6).long().expand(B, L).clone()
    if task == "ForMaskedLM":
        labels = torch.full((B, L), -100)
        chosen = (torch.rand(B, L, generator=g) < 0.3) & (mask == 1)
        chosen[0, 2] = True
        labels[chosen] = ids[chosen]
    elif task == "ForSequenceClassification":
        labels = torch.randint(0, 3, (B,), generator=g)
    else:
        labels = torch.randint(0, 3, (B, L), generator=g).masked_fill(mask == 0, -100)
    batch["labels"] = labels
    return batch


class Spy:
    """Counts the calls that reach one op of fastroberta.kernels (or its reference) and records dropout_p."""

    def __init__(self, monkeypatch, module, name):
        self.calls, self.dropout = 0, []
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            self.dropout.append(kwargs.get("dropout_p", 0.0))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)


def spies(monkeypatch, kernels):
    module = triton_ops if kernels == "triton" else torch_ops
    return {name: Spy(monkeypatch, module, name) for name in ("attention", "layer_norm", "mlm_cross_entropy")}


def real_rows(batch):
    return batch["attention_mask"].bool()


@pytest.mark.parametrize("kernels", ["triton", "torch"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parity_with_unpatched(arch, task, kernels, monkeypatch):
    """Dropout off: loss, logits at real tokens and every parameter gradient match the unpatched model."""
    device = device_for(kernels)
    tol, grad_tol = tolerances(device)
    torch.manual_seed(0)
    reference = model_class(arch, task)(make_config(arch)).to(device).train()
    patched = fastroberta.apply_kernels(copy.deepcopy(reference), kernels=kernels)
    assert patched.config._attn_implementation == "fastroberta"
    spy = spies(monkeypatch, kernels)
    batch = to(make_batch(arch, task), device)

    out_ref = reference(**batch)
    out_pat = patched(**batch)
    torch.testing.assert_close(out_pat.loss, out_ref.loss, **tol)
    out_ref.loss.backward()
    out_pat.loss.backward()
    for (name, p_ref), (_, p_pat) in zip(reference.named_parameters(), patched.named_parameters()):
        if p_ref.grad is None:
            assert p_pat.grad is None or not p_pat.grad.any(), name
            continue
        torch.testing.assert_close(p_pat.grad, p_ref.grad, **grad_tol, msg=lambda m: f"{name}: {m}")

    layers = patched.config.num_hidden_layers
    assert spy["attention"].calls == layers
    assert spy["layer_norm"].calls == 2 * layers + 1  # SelfOutput + Output per layer, the embeddings
    if task == "ForMaskedLM":
        assert spy["mlm_cross_entropy"].calls == 1
        assert out_pat.logits is None  # the fused loss never builds [B, L, V] logits

    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits_ref = reference.eval()(**no_labels).logits
        logits_pat = patched.eval()(**no_labels).logits
    if task == "ForSequenceClassification":
        torch.testing.assert_close(logits_pat, logits_ref, **tol)
    else:
        real = real_rows(batch)
        torch.testing.assert_close(logits_pat[real], logits_ref[real], **tol)


@pytest.mark.parametrize("arch", ["roberta", "bert"])
def test_padded_positions_do_not_reach_real_outputs(arch):
    """Documented: padded queries get zeros from our attention (transformers lets them attend), so hidden states
    at padded positions differ from the unpatched model's, while nothing at a real token depends on them."""
    device = device_for("triton")
    tol, _ = tolerances(device)
    torch.manual_seed(0)
    reference = model_class(arch, "Model")(make_config(arch, layers=2)).to(device).eval()
    patched = fastroberta.apply_kernels(copy.deepcopy(reference), kernels="triton")
    batch = to(make_batch(arch, "ForTokenClassification"), device)
    batch.pop("labels")
    real = real_rows(batch)
    contexts = {}

    def keep_context(name):
        def hook(module, args, output):
            contexts[name] = output[0].detach()  # the attention context [B, L, hidden] of layer 0
        return hook
    reference.encoder.layer[0].attention.self.register_forward_hook(keep_context("ref"))
    patched.encoder.layer[0].attention.self.register_forward_hook(keep_context("pat"))
    with torch.no_grad():
        h_ref = reference(**batch).last_hidden_state
        h_pat = patched(**batch).last_hidden_state
        # Other tokens under the padding (position ids pinned: RoBERTa derives them from the pad token).
        positions = torch.arange(2, L + 2, device=device).expand(B, L)
        h_pinned = patched(**batch, position_ids=positions).last_hidden_state
        other = dict(batch, input_ids=batch["input_ids"].masked_fill(~real, 7), position_ids=positions)
        h_other = patched(**other).last_hidden_state
    torch.testing.assert_close(h_pat[real], h_ref[real], **tol)
    # The documented difference: a padded query's attention context is zero here, not in transformers.
    assert not contexts["pat"][~real].any()
    assert contexts["ref"][~real].abs().amax(dim=-1).min() > 1e-3
    torch.testing.assert_close(h_other[real], h_pinned[real], rtol=0, atol=1e-6)
    assert torch.isfinite(h_pat).all()


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_fully_padded_row_is_finite(kernels):
    """A sequence with no real token at all: zeros from attention, finite everywhere, finite gradients."""
    device = device_for(kernels)
    torch.manual_seed(0)
    model = model_class("roberta", "ForSequenceClassification")(make_config("roberta")).to(device)
    fastroberta.apply_kernels(model, kernels=kernels)
    batch = make_batch("roberta", "ForSequenceClassification")
    batch["attention_mask"][1] = 0
    batch = to(batch, device)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _keep_rate_of_output_block(block):
    """dense = identity, input ones, residual 0: LayerNorm(dropout(ones)) is positive exactly where dropout kept
    the element (hidden 64, so a row with all or none kept never happens in practice)."""
    n = block.dense.in_features
    with torch.no_grad():
        block.dense.weight.copy_(torch.eye(n))
        block.dense.bias.zero_()
        x = torch.ones(64, n, device=block.dense.weight.device)
        y = block(x, torch.zeros_like(x))
    return (y > 0).float().mean().item()


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_dropout_statistics_match(kernels, monkeypatch):
    """Dropout on: the fused blocks keep the same fraction of elements as transformers' own (1 - p), and the
    model passes the configured attention dropout to the attention kernel."""
    p = 0.3
    device = device_for(kernels)
    tol, _ = tolerances(device)
    torch.manual_seed(0)
    config = make_config("roberta", dropout=p, hidden_size=64, num_attention_heads=4)
    reference = transformers.RobertaForMaskedLM(config).to(device).train()
    patched = fastroberta.apply_kernels(copy.deepcopy(reference), kernels=kernels)
    block_ref = reference.roberta.encoder.layer[0].output
    block_pat = patched.roberta.encoder.layer[0].output
    rate_ref, rate_pat = _keep_rate_of_output_block(block_ref), _keep_rate_of_output_block(block_pat)
    # 4096 Bernoulli(0.7) draws: one standard deviation is 0.0072.
    assert abs(rate_ref - (1 - p)) < 0.03 and abs(rate_pat - (1 - p)) < 0.03, (rate_ref, rate_pat)

    # Attention: q = k = 0 gives uniform probabilities 1/L; v = identity reads them back, so an output entry is
    # 0 where dropout dropped the (query, key) pair and 1 / (L (1 - p)) where it kept it.
    attn = patched.roberta.encoder.layer[0].attention.self
    n = 16
    q = torch.zeros(4, 4, n, n, device=device)
    v = torch.eye(n, device=device).expand(4, 4, n, n).contiguous()
    out_pat, _ = hf_kernels.fastroberta_attention(attn, q, q, v, None, scaling=1.0, dropout=p)
    out_eager, _ = hf_kernels._fallback(attn, q, q, v, None, 1.0, p, eager=True)
    for out in (out_pat, out_eager):
        kept = out != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 0.03
        torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (n * (1 - p))), **tol)

    spy = spies(monkeypatch, kernels)
    batch = to(make_batch("roberta", "ForMaskedLM"), device)
    loss = patched(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert spy["attention"].dropout == [p]
    assert sorted(spy["layer_norm"].dropout) == [0.0, p, p]  # the embeddings' LayerNorm has no fused dropout


def test_class_mode_equals_instance_mode(tmp_path):
    """apply_kernels() before construction / from_pretrained and apply_kernels(model) after give the same
    patched model; remove_kernels() stops patching new models."""
    torch.manual_seed(0)
    plain = transformers.RobertaForMaskedLM(make_config("roberta"))
    plain.save_pretrained(tmp_path)
    batch = make_batch("roberta", "ForMaskedLM")
    try:
        fastroberta.apply_kernels(kernels="torch")
        fastroberta.apply_kernels(kernels="torch")  # idempotent
        by_class = transformers.RobertaForMaskedLM.from_pretrained(tmp_path)
        built = transformers.BertForTokenClassification(make_config("bert"))
    finally:
        fastroberta.remove_kernels()
    later = transformers.RobertaForMaskedLM.from_pretrained(tmp_path)
    assert later.config._attn_implementation != "fastroberta"
    assert "_fastroberta_options" not in later.__dict__
    by_instance = fastroberta.apply_kernels(transformers.RobertaForMaskedLM.from_pretrained(tmp_path), kernels="torch")

    assert built.config._attn_implementation == "fastroberta"
    for model in (by_class, by_instance):
        assert model.config._attn_implementation == "fastroberta"
        assert model._fastroberta_options == by_instance._fastroberta_options
    patched_modules = [name for name, m in by_class.named_modules() if "_fastroberta_saved_forward" in m.__dict__]
    assert patched_modules == [name for name, m in by_instance.named_modules()
                               if "_fastroberta_saved_forward" in m.__dict__]
    assert len(patched_modules) == 4  # the embeddings' LayerNorm, SelfOutput, Output, the MLM forward
    torch.testing.assert_close(by_class(**batch).loss, by_instance(**batch).loss, rtol=0, atol=0)
    torch.testing.assert_close(by_class(**batch).loss, plain(**batch).loss, rtol=1e-5, atol=1e-5)


def test_idempotent_remove_and_context_manager():
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(make_config("bert"))
    original_impl = model.config._attn_implementation
    batch = make_batch("bert", "ForMaskedLM")
    expected = model(**batch).loss

    assert fastroberta.apply_kernels(model, kernels="torch") is model
    forward = model.forward
    fastroberta.apply_kernels(model, kernels="torch")
    assert model.forward is forward  # a second call with the same options changes nothing
    fastroberta.apply_kernels(model, kernels="triton", cross_entropy=False)  # other options: re-patched
    assert model._fastroberta_options["kernels"] == "triton"
    assert "forward" not in model.__dict__  # no fused MLM loss any more
    assert model(**batch).logits is not None

    fastroberta.apply_kernels(model, kernels="torch")
    clone = copy.deepcopy(model)  # a copy's patched forwards belong to the copy
    assert clone.forward.__self__ is clone
    assert clone.bert.encoder.layer[0].output.forward.__self__ is clone.bert.encoder.layer[0].output
    before = model(**batch).loss
    torch.testing.assert_close(clone(**batch).loss, before, rtol=0, atol=0)
    with torch.no_grad():
        clone.cls.predictions.decoder.bias.normal_()  # only the copy's loss may move
    assert abs(clone(**batch).loss - before) > 1e-3
    torch.testing.assert_close(model(**batch).loss, before, rtol=0, atol=0)

    fastroberta.remove_kernels(model)
    assert model.config._attn_implementation == original_impl
    assert not any("_fastroberta_saved_forward" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(**batch).loss, expected, rtol=0, atol=0)

    with fastroberta.kernels_applied(model, kernels="torch") as patched:
        assert patched is model and model.config._attn_implementation == "fastroberta"
        assert model(**batch).logits is None
    assert model.config._attn_implementation == original_impl
    assert model(**batch).logits is not None


def test_fallbacks_to_transformers_attention(monkeypatch):
    """output_attentions, a caller's 4-D mask and a causal decoder fall back to
    transformers' own attention and still give the right answer."""
    torch.manual_seed(0)
    reference = transformers.RobertaModel._from_config(make_config("roberta"), attn_implementation="eager").eval()
    patched = copy.deepcopy(reference)
    patched.set_attn_implementation("sdpa")  # transformers' default, which apply_kernels takes over (not eager)
    fastroberta.apply_kernels(patched, kernels="torch")
    assert patched.config._attn_implementation == hf_kernels.ATTN_NAME
    spy = spies(monkeypatch, "torch")
    batch = make_batch("roberta", "ForTokenClassification")
    batch.pop("labels")
    real = real_rows(batch)
    with torch.no_grad():
        out_ref = reference(**batch, output_attentions=True)
        out_pat = patched(**batch, output_attentions=True)
    assert spy["attention"].calls == 0
    torch.testing.assert_close(out_pat.attentions[0], out_ref.attentions[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_pat.last_hidden_state, out_ref.last_hidden_state, rtol=1e-5, atol=1e-5)

    # A caller's own 4-D additive mask (transformers passes 4-D masks through untouched).
    mask4d = torch.zeros(B, 1, L, L).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    with torch.no_grad():
        h_pat = patched(input_ids=batch["input_ids"], attention_mask=mask4d).last_hidden_state
        h_ref = reference(input_ids=batch["input_ids"], attention_mask=mask4d).last_hidden_state
    assert spy["attention"].calls == 0
    torch.testing.assert_close(h_pat[real], h_ref[real], rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # the ordinary path does use the kernel
        patched(**batch)
    assert spy["attention"].calls == 1

    # A head_mask (older transformers pass one down) goes to transformers' eager attention, which applies it.
    attn = patched.encoder.layer[0].attention.self
    q = torch.randn(B, 2, L, 16)
    out, weights = hf_kernels.fastroberta_attention(attn, q, q, q, real, scaling=0.25, head_mask=torch.ones(2, 1, 1))
    assert weights is not None and spy["attention"].calls == 1
    torch.testing.assert_close(out[real], torch_ops.attention(q, q, q, real, softmax_scale=0.25).transpose(1, 2)[real])

    calls = spy["attention"].calls
    decoder_ref = transformers.RobertaModel(make_config("roberta", is_decoder=True)).eval()
    decoder = fastroberta.apply_kernels(copy.deepcopy(decoder_ref), kernels="torch")
    with torch.no_grad():
        logits = decoder(**batch, use_cache=False).last_hidden_state
        logits_ref = decoder_ref(**batch, use_cache=False).last_hidden_state
    assert spy["attention"].calls == calls  # causal: transformers' SDPA, not our bidirectional kernel
    torch.testing.assert_close(logits[real], logits_ref[real], rtol=1e-5, atol=1e-5)


def test_attn_implementation_name_and_bad_input():
    torch.manual_seed(0)
    model = transformers.AutoModelForTokenClassification.from_config(make_config("camembert"),
                                                                     attn_implementation="fastroberta")
    assert model.config._attn_implementation == "fastroberta"
    with pytest.raises(TypeError, match="apply_kernels does not support GPT2LMHeadModel; supported: .*RoBERTa"):
        fastroberta.apply_kernels(transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16)))
    with pytest.raises(ValueError, match="kernels must be one of auto, triton, torch"):
        fastroberta.apply_kernels(model, kernels="cuda")
    with pytest.raises(TypeError, match="attention must be True or False"):
        fastroberta.apply_kernels(model, attention="yes")


def test_transformers_without_attention_registry_gets_a_clear_error(monkeypatch):
    """An older transformers (no AttentionMaskInterface): attention=True says what is missing; the LayerNorm and
    loss swaps still work without it."""
    from transformers import masking_utils
    monkeypatch.delattr(masking_utils, "AttentionMaskInterface")
    torch.manual_seed(0)
    model = transformers.RobertaForMaskedLM(make_config("roberta"))
    with pytest.raises(RuntimeError, match="no attention-function registry .* attention=False"):
        fastroberta.apply_kernels(model)
    assert "_fastroberta_options" not in model.__dict__  # nothing half-patched
    fastroberta.apply_kernels(model, attention=False, kernels="torch")
    assert model.config._attn_implementation != "fastroberta"
    assert model(**make_batch("roberta", "ForMaskedLM")).logits is None


def test_import_fastroberta_does_not_import_transformers():
    code = "import sys, fastroberta; assert 'transformers' not in sys.modules; fastroberta.apply_kernels"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trainer_lowers_the_loss(tmp_path, monkeypatch):
    """A few steps of transformers.Trainer (CPU, no downloads) on a patched MLM with dropout: the kernels run,
    the loss falls, evaluation works without logits. kernels="auto" is the reference path here (no CUDA); the
    Triton path's parity is tested above, and its interpreter is too slow for dozens of steps."""
    torch.manual_seed(0)
    model = fastroberta.apply_kernels(transformers.RobertaForMaskedLM(make_config("roberta", dropout=0.1)))
    spy = spies(monkeypatch, "torch")

    class Repeats(torch.utils.data.Dataset):
        """<s> t t ... t </s> with two tokens replaced by a <mask> stand-in: the label is the repeated t."""

        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.items = []
            for _ in range(n):
                token = int(torch.randint(5, V, (1,), generator=g))
                ids = torch.full((L,), token)
                ids[0], ids[-1] = 0, 2
                labels = torch.full((L,), -100)
                pos = torch.randint(1, L - 1, (2,), generator=g)
                labels[pos] = token
                ids[pos] = 4
                self.items.append({"input_ids": ids, "attention_mask": torch.ones(L, dtype=torch.long),
                                   "labels": labels})

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                          learning_rate=1e-2, max_steps=60, logging_steps=10, report_to="none",
                                          use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Repeats(96, seed=1),
                                   eval_dataset=Repeats(16, seed=2))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    assert spy["mlm_cross_entropy"].calls >= 60 and spy["attention"].calls >= 60
    assert spy["attention"].dropout[0] == 0.1
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] < losses[0] - 0.5, (metrics, losses)


def test_hf_benchmark_smoke(tmp_path):
    """``python -m benchmarks hf`` in smoke mode: it runs, checks the patched loss against SDPA's, and writes
    its JSON and Markdown labelled as not a performance result."""
    import json

    from benchmarks import bench_hf, harness
    lines = []
    result = bench_hf.run("smoke", tmp_path, workloads=["mlm"], competitors=["hf-sdpa", "hf+fastroberta"],
                          log=lines.append)
    figures = [line for line in lines if line.startswith("  ok:")]
    assert len(figures) == 2 and all(" smoke ms, " in f and f.endswith(" smoke tok/s") for f in figures), lines
    rows = {r["competitor"]: r for r in result["results"]}
    assert rows["hf+fastroberta"]["status"] == "ok" and rows["hf+fastroberta"]["check_ok"]
    assert bench_hf.checks_passed(result)
    written = json.loads((tmp_path / harness.device_slug() / "hf.json").read_text())
    assert written["label"] == harness.SMOKE_LABEL
    assert "| hf+fastroberta |" in (tmp_path / harness.device_slug() / "hf.md").read_text()


def test_output_block_folds_only_a_plain_dense_bias(monkeypatch):
    """A SelfOutput/Output whose dense is a plain nn.Linear runs it without its bias and hands the bias to the fused
    LayerNorm (input_bias); a dense with a hook (or a wrapped/quantized layer) runs its own forward. Both give
    the unpatched block's output and gradients."""
    torch.manual_seed(0)
    model = transformers.RobertaModel(make_config("roberta"))
    block = model.encoder.layer[0].output
    plain = copy.deepcopy(block)
    fastroberta.apply_kernels(model, kernels="torch")
    h, residual = torch.randn(3, 5, 64), torch.randn(3, 5, 32)
    seen = []
    original = torch_ops.layer_norm
    monkeypatch.setattr(torch_ops, "layer_norm", lambda *a, **kw: (seen.append(kw.get("input_bias")),
                                                                    original(*a, **kw))[1])

    def run(module):
        module.zero_grad()
        out = module(h, residual)
        out.pow(2).sum().backward()
        return out, module.dense.bias.grad.clone(), module.dense.weight.grad.clone()
    want = run(plain)
    for hooked in (False, True):
        if hooked:
            block.dense.register_forward_hook(lambda *args: None)
        seen.clear()
        got = run(block)
        assert (seen[0] is None) == hooked and (hooked or seen[0] is block.dense.bias)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# transformers' contract where a caller can see it. The cases follow transformers' own model tests
# (tests/models/roberta/test_modeling_roberta.py and tests/test_modeling_common.py: test_for_masked_lm,
# test_attention_outputs, test_can_set_attention_dynamically, test_sdpa_can_dispatch_non_composite_models),
# on tiny configs shaped as its RobertaModelTester builds them (vocab 99, hidden 32, 2 layers, 4 heads of 8
# would leave our kernel out: 2 heads of 16 here, so our attention really runs).
def tester_config(**overrides):
    kwargs = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                  max_position_embeddings=512, type_vocab_size=16, initializer_range=0.02, pad_token_id=1)
    kwargs.update(overrides)
    return transformers.RobertaConfig(**kwargs)


def tester_inputs(seed=0, batch=13, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (batch, length), generator=g)
    mask = torch.randint(0, 2, (batch, length), generator=g)
    mask[:, 0] = 1
    token_types = torch.randint(0, 16, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}


@pytest.fixture
def class_mode():
    fastroberta.apply_kernels(kernels="torch")
    try:
        yield
    finally:
        fastroberta.remove_kernels()


def test_masked_lm_eval_returns_logits_with_the_loss(class_mode):
    """test_for_masked_lm: eval() with labels gives [B, L, V] logits and transformers' loss; train() keeps the
    fused labelled-rows loss and logits=None (dropout off to compare)."""
    torch.manual_seed(0)
    config = tester_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.RobertaForMaskedLM(config).eval()
    assert model.config._attn_implementation == hf_kernels.ATTN_NAME
    plain = fastroberta.remove_kernels(copy.deepcopy(model))
    inputs = tester_inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        result, expected = model(**inputs, labels=labels), plain(**inputs, labels=labels)
    assert result.logits.shape == (13, 7, 99)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(result.logits[real], expected.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-5, atol=1e-6)
    loss, logits = model(**inputs, labels=labels, return_dict=False)[:2]
    assert logits.shape == (13, 7, 99)
    model.train()
    trained = model(**inputs, labels=labels)
    assert trained.logits is None
    torch.testing.assert_close(trained.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert model(**inputs, labels=labels, return_dict=False)[0].shape == ()


def test_explicit_attention_is_kept_in_class_mode(class_mode, tmp_path):
    """test_sdpa_can_dispatch_non_composite_models / test_can_set_attention_dynamically: an implementation the
    user names (from_pretrained, _from_config, on the config) is kept; only the default becomes ours."""
    config = tester_config()
    transformers.RobertaModel(config).save_pretrained(tmp_path)
    assert transformers.RobertaModel.from_pretrained(tmp_path).config._attn_implementation == hf_kernels.ATTN_NAME
    for name in ("sdpa", "eager"):
        loaded = transformers.RobertaModel.from_pretrained(tmp_path, attn_implementation=name)
        assert loaded.config._attn_implementation == name
        built = transformers.RobertaForMaskedLM._from_config(tester_config(), attn_implementation=name)
        assert built.config._attn_implementation == name
        named = tester_config()
        named._attn_implementation = name
        assert transformers.RobertaForSequenceClassification(named).config._attn_implementation == name
    eager = transformers.RobertaModel._from_config(tester_config(), attn_implementation="eager").eval()
    inputs = tester_inputs()
    with torch.no_grad():
        before = eager(**inputs).last_hidden_state
        eager.set_attn_implementation("sdpa")
        assert eager.config._attn_implementation == "sdpa"
        after = eager(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(after[real], before[real], rtol=1e-5, atol=1e-5)


def test_explicit_attention_is_kept_in_instance_mode(monkeypatch):
    spy = spies(monkeypatch, "torch")
    for name in ("flex_attention", "eager"):
        model = transformers.RobertaModel._from_config(tester_config(), attn_implementation=name)
        fastroberta.apply_kernels(model, kernels="torch")
        assert model.config._attn_implementation == name
    with torch.no_grad():
        model.eval()(**tester_inputs())
    assert spy["attention"].calls == 0 and spy["layer_norm"].calls > 0  # the other kernels still run
    default = fastroberta.apply_kernels(transformers.RobertaModel(tester_config()), kernels="torch")
    assert default.config._attn_implementation == hf_kernels.ATTN_NAME
    fastroberta.remove_kernels(default)
    assert default.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("mode", ["class", "instance"])
def test_output_attentions_on_the_config(mode, monkeypatch):
    """test_attention_outputs sets config.output_attentions on a built model: the patched model hands those
    calls to transformers' eager attention (as for the argument), and uses its kernel again when it is off."""
    torch.manual_seed(0)
    config = tester_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    eager = transformers.RobertaModel._from_config(config, attn_implementation="eager").eval()
    patched = copy.deepcopy(eager)
    patched.set_attn_implementation("sdpa")
    if mode == "class":
        fastroberta.apply_kernels(kernels="torch")
        try:
            built = transformers.RobertaModel(tester_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        finally:
            fastroberta.remove_kernels()
        built.load_state_dict(eager.state_dict())
        patched = built.eval()
    else:
        fastroberta.apply_kernels(patched, kernels="torch")
    assert patched.config._attn_implementation == hf_kernels.ATTN_NAME
    spy = spies(monkeypatch, "torch")
    inputs = tester_inputs()
    eager.config.output_attentions = True
    patched.config.output_attentions = True
    with torch.no_grad():
        got, want = patched(**inputs), eager(**inputs)
    assert spy["attention"].calls == 0 and len(got.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        assert a.shape == (13, 2, 7, 7)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    patched.config.output_attentions = False
    with torch.no_grad():
        assert patched(**inputs).attentions is None
    assert spy["attention"].calls == 2
    copied = copy.deepcopy(patched.config)  # the config stays a transformers config: copies, pickles, Auto
    import pickle
    assert pickle.loads(pickle.dumps(copied)).output_attentions is False
    assert type(transformers.AutoModel.from_config(copied)).__name__ == "RobertaModel"
    fastroberta.remove_kernels(patched)
    assert type(patched.config) is transformers.RobertaConfig
    with pytest.raises(ValueError, match="output_attentions"):
        patched.config.output_attentions = True  # transformers' own rule is back with its own attention


def test_no_warnings_plain_transformers_would_not_print(monkeypatch):
    """The patched masked-LM reads config.return_dict, not the deprecated use_return_dict, and prints nothing
    (Python warnings, transformers' log) that the same calls on the plain model do not."""
    import logging
    import warnings

    def deprecated(self):
        raise AssertionError("use_return_dict read")

    monkeypatch.setattr(transformers.PreTrainedConfig, "use_return_dict", property(deprecated), raising=False)
    records = []

    class Recorder(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    def messages(model):
        inputs = tester_inputs()
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        records.clear()
        transformers.utils.logging.warning_once.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for train in (True, False):
                model.train(train)
                model(**inputs, labels=labels)
                model(**inputs, labels=labels, return_dict=False)
                model(**inputs)
        return {str(w.message) for w in caught} | set(records)

    handler = Recorder(level=logging.INFO)
    hf_logger = transformers.utils.logging.get_logger("transformers")
    hf_logger.addHandler(handler)
    transformers.logging.set_verbosity_info()
    try:
        plain = transformers.RobertaForMaskedLM(tester_config())
        patched = fastroberta.apply_kernels(copy.deepcopy(plain), kernels="torch")
        from_plain, from_patched = messages(plain), messages(patched)
    finally:
        transformers.logging.set_verbosity_error()
        hf_logger.removeHandler(handler)
    assert from_patched <= from_plain, from_patched - from_plain
