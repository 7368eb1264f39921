"""The Hugging Face drop-in: a transformers RoBERTa training step, patched by ``fastroberta.apply_kernels`` or not.

Workloads (RoBERTa-base, transformers' own classes, randomly initialised: nothing is downloaded):
    finetune   RobertaForSequenceClassification (2 labels), seq 128, batch 32; each sequence's length drawn
               uniformly from [seq/4, seq] and right-padded, as a dynamically padded fine-tuning batch is
    mlm        RobertaForMaskedLM, seq 512, batch 16, no padding (packed pretraining text), 15% of the tokens
               labelled: the patched model computes the loss on those rows only
Competitors:
    hf-eager         attn_implementation="eager"
    hf-sdpa          attn_implementation="sdpa" (transformers' default)
    hf+fastroberta   apply_kernels(model): our attention, fused dropout+residual+LayerNorm, fused MLM loss
                     (eager or SDPA before patching makes no difference: both are replaced)
A step is what ``transformers.Trainer`` does with ``fp16=True`` / ``bf16=True``: forward under ``torch.autocast``
(fp32 weights), backward (through a GradScaler for fp16), fused AdamW step, zero_grad; the model is in train
mode (dropout 0.1). Reported: median step time over the timed steps (CUDA-synchronised wall clock after warm-up
steps, so compilation and autotuning stay out), tokens/s (real tokens), peak memory
(``torch.cuda.max_memory_allocated`` over the timed steps: weights, AdamW state, activations), and a check: the
loss of one batch with dropout off, patched vs hf-sdpa (relative difference; fastroberta rows must agree
within 2e-2 in fp16/bf16).

Without CUDA it runs a smoke mode (a micro model in fp32, the Triton kernels through the interpreter), labelled
"smoke: not a performance result" and written to out/benchmarks-smoke/, never to benchmarks/results/.
"""
import gc
import statistics
import time

from benchmarks import harness  # sets TRITON_INTERPRET on CPU before any kernel module is imported

COMPETITORS = ("hf-eager", "hf-sdpa", "hf+fastroberta")
WORKLOADS = {"finetune": dict(task="seqcls", seq_len=128, batch=32, padded=True),
             "mlm": dict(task="mlm", seq_len=512, batch=16, padded=False)}
BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
            layer_norm_eps=1e-5)
SMOKE = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
             max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 2e-2}
PROFILES = {
    "smoke": dict(workloads=["finetune", "mlm"], precisions=["fp32"], warmup=0, steps=1,
                  shapes={"finetune": (16, 2), "mlm": (16, 2)}),
    "check": dict(workloads=["finetune", "mlm"], precisions=["fp16", "bf16"], warmup=3, steps=8, shapes={}),
    "full": dict(workloads=["finetune", "mlm"], precisions=["fp16", "bf16"], warmup=5, steps=20, shapes={}),
}


def _import_torch():
    import torch
    return torch


def build_model(competitor, task, cfg_kwargs, device, smoke):
    import transformers
    import fastroberta
    transformers.logging.set_verbosity_error()
    cfg = transformers.RobertaConfig(num_labels=2, **cfg_kwargs)
    cls = transformers.RobertaForMaskedLM if task == "mlm" else transformers.RobertaForSequenceClassification
    impl = "eager" if competitor == "hf-eager" else "sdpa"
    model = cls._from_config(cfg, attn_implementation=impl).to(device)
    if competitor == "hf+fastroberta":
        # Smoke mode runs the Triton kernels through the interpreter; on CUDA "auto" is Triton anyway.
        fastroberta.apply_kernels(model, kernels="triton" if smoke else "auto")
    return model


def make_batch(task, batch, seq_len, vocab_size, padded, device, seed=0):
    torch = _import_torch()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=g)
    if padded:
        lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), generator=g)
    else:
        lengths = torch.full((batch,), seq_len)
    positions = torch.arange(seq_len)
    mask = (positions[None, :] < lengths[:, None]).long()
    ids[:, 0] = 0
    ids[torch.arange(batch), lengths - 1] = 2
    ids[mask == 0] = 1
    if task == "mlm":
        chosen = (torch.rand(batch, seq_len, generator=g) < 0.15) & (mask == 1)
        chosen[:, 0] = False
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    else:
        labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class Step:
    """One Trainer-like optimisation step under autocast (fp16: with a GradScaler)."""

    def __init__(self, model, precision, device):
        torch = _import_torch()
        self.model, self.device = model, device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        kwargs = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **kwargs)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def loss(self, batch):
        torch = _import_torch()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(**batch).loss

    def __call__(self, batch):
        loss = self.loss(batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _sync():
    torch = _import_torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(competitor, workload, precision, prof, smoke, log=print):
    torch = _import_torch()
    dev = harness.device()
    spec = WORKLOADS[workload]
    seq_len, batch_size = prof["shapes"].get(workload, (spec["seq_len"], spec["batch"]))
    cfg = SMOKE if smoke else BASE
    rec = {"workload": workload, "task": spec["task"], "competitor": competitor, "precision": precision,
           "seq_len": seq_len, "batch": batch_size, "padded": spec["padded"], "status": "ok"}
    torch.manual_seed(0)
    model = build_model(competitor, spec["task"], cfg, dev, smoke)
    batch = make_batch(spec["task"], batch_size, seq_len, cfg["vocab_size"], spec["padded"], dev)
    rec["real_tokens_per_step"] = int(batch["attention_mask"].sum())
    step = Step(model, precision, dev)

    model.eval()  # the check: one loss with dropout off, before any update (same seed -> same weights)
    with torch.no_grad():
        rec["check_loss"] = float(step.loss(batch))
    model.train()

    for _ in range(prof["warmup"]):
        step(batch)
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(prof["steps"]):
        t0 = time.perf_counter()
        loss = step(batch)
        _sync()
        times.append(time.perf_counter() - t0)
    rec.update({"step_ms": 1e3 * statistics.median(times), "loss_last": float(loss),
                "tokens_per_s": rec["real_tokens_per_step"] / statistics.median(times),
                "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None})
    del model, step, batch
    gc.collect()
    harness.free_memory()
    return rec


def _is_oom(exc):
    torch = _import_torch()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc)


def run(profile, out_root, workloads=None, precisions=None, competitors=None, time_budget=None, log=print):
    """Run the profile's grid; write hf.json / hf.md under OUT_ROOT/<device>/; return the result dict."""
    prof = PROFILES[profile]
    smoke = profile == "smoke"
    workloads = workloads or prof["workloads"]
    precisions = precisions or prof["precisions"]
    competitors = competitors or list(COMPETITORS)
    for name, values, allowed in (("workload", workloads, WORKLOADS), ("precision", precisions, CHECK_TOLERANCE),
                                  ("competitor", competitors, COMPETITORS)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise SystemExit(f"unknown hf {name}(s) {unknown}; choose from {list(allowed)}")
    env = harness.environment(smoke)
    out_dir = harness.results_dir(out_root, env)
    deadline = time.monotonic() + time_budget if time_budget else None
    result = {"bench": "hf", "title": "Hugging Face transformers RoBERTa-base training step, apply_kernels vs not",
              "profile": profile, "environment": env, "label": env["label"], "results": [], "complete": False}
    rate, ms = ("smoke tok/s", "smoke ms") if smoke else ("tokens/s", "ms")  # as the README promises
    if smoke:
        log(f"[hf] figures below are {rate} / {ms}: CPU wall time of a micro model ({harness.SMOKE_LABEL})")
    for precision in precisions:  # the first precision's two workloads first, in case the budget runs out
        for workload in workloads:
            for competitor in competitors:
                if deadline is not None and time.monotonic() > deadline - 10:
                    rec = {"workload": workload, "competitor": competitor, "precision": precision,
                           "status": "skipped: time budget"}
                else:
                    log(f"[hf] {workload} {precision} {competitor}")
                    try:
                        rec = measure(competitor, workload, precision, prof, smoke, log)
                    except Exception as e:  # one failing row must not cost the others
                        status = "out of memory" if _is_oom(e) else \
                            f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                        rec = {"workload": workload, "competitor": competitor, "precision": precision,
                               "status": status}
                        gc.collect()
                        harness.free_memory()
                result["results"].append(rec)
                log(f"  {rec['status']}" + (f": step {rec['step_ms']:.1f} {ms}, {rec['tokens_per_s']:.0f} {rate}"
                                            if rec.get("step_ms") else ""))
            _add_checks(result, workload, precision)
            write_result(result, out_dir)
    result["complete"] = all(not r["status"].startswith("skipped") for r in result["results"])
    write_result(result, out_dir)
    log(hf_markdown(result))
    return result


def _add_checks(result, workload, precision):
    """Relative difference of each row's dropout-off loss from hf-sdpa's on the same batch and weights."""
    rows = [r for r in result["results"] if r["workload"] == workload and r["precision"] == precision]
    base = next((r.get("check_loss") for r in rows if r["competitor"] == "hf-sdpa"), None)
    for r in rows:
        if base is None or r.get("check_loss") is None:
            continue
        r["check_rel_diff"] = abs(r["check_loss"] - base) / max(abs(base), 1e-12)
        r["check_ok"] = r["check_rel_diff"] <= CHECK_TOLERANCE[precision]


def checks_passed(result):
    rows = [r for r in result["results"] if r["competitor"] == "hf+fastroberta"]
    return all(r["status"] == "ok" and r.get("check_ok", True) for r in rows
               if not r["status"].startswith("skipped"))


def hf_markdown(result):
    env = result["environment"]
    lines = ["# " + result["title"], ""]
    if env["smoke"]:
        lines += [f"**{harness.SMOKE_LABEL}** — a micro model on {env['device']}, the kernels through Triton's "
                  "interpreter; the numbers only show that the harness runs.", ""]
    lines += [harness.env_line(env), "",
              "step = forward + backward + AdamW (fp16/bf16: under autocast), train mode, dropout 0.1, median of "
              "the timed steps; tokens/s counts real tokens; peak mem = max allocated over the timed steps; check = "
              "|loss - hf-sdpa loss| / hf-sdpa loss with dropout off, same weights and batch.", ""]
    keys = []
    for r in result["results"]:
        if (r["workload"], r["precision"]) not in keys:
            keys.append((r["workload"], r["precision"]))
    for workload, precision in keys:
        rows_in = [r for r in result["results"] if r["workload"] == workload and r["precision"] == precision]
        ms = {r["competitor"]: r.get("step_ms") for r in rows_in}
        rows = []
        for r in rows_in:
            def speedup(other):
                return harness.fmt(ms[other] / r["step_ms"], 2) + "x" if r.get("step_ms") and ms.get(other) else "-"
            rows.append([r["competitor"], harness.fmt(r.get("step_ms"), 1), harness.fmt(r.get("tokens_per_s"), 0),
                         speedup("hf-eager"), speedup("hf-sdpa"), harness.fmt(r.get("peak_mem_gb"), 2),
                         harness.fmt(r.get("check_rel_diff"), 4), r["status"]])
        first = rows_in[0]
        shape = f"seq {first.get('seq_len', '-')}, batch {first.get('batch', '-')}" + \
            (", dynamically padded" if first.get("padded") else "")
        lines += [f"## {workload} ({shape}), {precision}", ""]
        lines += [harness.markdown_table(["competitor", "step ms", "tokens/s", "speed-up vs hf-eager",
                                          "speed-up vs hf-sdpa", "peak mem GB", "check", "status"], rows), ""]
    return "\n".join(lines)


def write_result(result, out_dir):
    from pathlib import Path
    out_dir = Path(out_dir)
    harness.write_json(result, out_dir / "hf.json")
    (out_dir / "hf.md").write_text(hf_markdown(result))
