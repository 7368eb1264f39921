"""End-to-end training step: one DeepSpeed ZeRO-2 engine on one device, fastroberta against HF transformers.

Tasks:
    mlm        pretraining: RobertaForMaskedLM on packed text (no padding), 15% of the tokens labelled, at the
               profile's sequence lengths (base/large, 128 and 512)
    finetune   fine-tuning: RobertaForSequenceClassification (2 labels), seq 128, batch 32 (the GLUE shape);
               each sequence's length drawn uniformly from [seq/4, seq] and right-padded, as a dynamically
               padded fine-tuning batch is (``bench_hf.make_batch``, the same batches as the drop-in benchmark)
    qa         question answering: RobertaForQuestionAnswering, seq 384, batch 32 (the SQuAD shape of
               ``fastroberta-finetune --task squad``); padded batches as finetune's, a start and an end position
               (start <= end) inside each row's real tokens, HF's loss on both
Competitors (same config, same synthetic batch, same optimizer, same DeepSpeed settings):
    fastroberta-triton   fastroberta's model class for the task, kernels="triton"
    fastroberta-torch    the same, kernels="torch"   (the eager reference ops)
    hf-eager             transformers' class of the same name, attn_implementation="eager"
    hf-sdpa              transformers' class of the same name, attn_implementation="sdpa"
    hf-sdpa-compile      torch.compile of hf-sdpa (full profile or --competitors; compiling costs minutes)
    fastroberta-triton-compile   fastroberta-triton compiled inside the engine, as ``fastroberta-train --compile``
                         (``compile_engine``, fullgraph: the kernels are custom ops, Inductor fuses the rest);
                         last in the check profile, so it runs when the stage has time left for its compile

A step is forward + ``engine.backward`` + ``engine.step`` (ZeRO-2, fp16 with dynamic loss scaling or bf16,
gradient clipping 1.0, torch AdamW, fused on CUDA: DeepSpeed's fused Adam would first JIT-build a CUDA
extension, which costs minutes of the GPU check and is the same for every competitor). Batches are synthetic:
random token ids, no padding (RoBERTa packs FULL-SENTENCES), 15% of the tokens labelled. Reported:
    tokens/s        real tokens per second over the timed steps (after warm-up steps)
    MFU             tokens/s x fastroberta's flops_per_token(seq_len) (the trainer's formula: 6 x matmul
                    parameters + attention, + the MLM head on the labelled share for mlm; for finetune and qa the
                    encoder's, per real token at the padded length) / the device's dense fp16/bf16 peak
    peak mem        torch.cuda.max_memory_allocated over the timed steps (weights, ZeRO state, activations)
    max micro-batch the largest micro-batch that runs two full steps at seq 512: doubling, then bisection to
                    within 1/16 (or 8 sequences), each out-of-memory answered by rebuilding the engine; bounded
                    in time, so a search cut short reports a lower bound
Each (configuration, competitor) runs in its own subprocess on CUDA, so one crash or leak cannot spoil the
next; smoke mode (CPU, a micro model in fp32, through the Triton interpreter) runs them in-process.
"""
import argparse
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

COMPETITORS = ("fastroberta-triton", "fastroberta-torch", "hf-eager", "hf-sdpa", "hf-sdpa-compile",
               "fastroberta-triton-compile")
TASKS = ("mlm", "finetune", "qa")
# Extra seconds a compiled competitor's worker gets for its compile (Inductor, forward + backward graphs).
COMPILE_S = {"smoke": 0, "check": 90, "full": 600}
TOKENS_PER_STEP = {"base": 16384, "large": 8192, "micro": 64}
# The fine-tuning steps: (seq_len, micro-batch), and the smoke mode's.
FINETUNE_SHAPE, FINETUNE_SMOKE_SHAPE = (128, 32), (32, 4)
QA_SHAPE, QA_SMOKE_SHAPE = (384, 32), (48, 4)
FINETUNE_LABELS = 2
MODEL_CLASSES = {"mlm": "RobertaForMaskedLM", "finetune": "RobertaForSequenceClassification",
                 "qa": "RobertaForQuestionAnswering"}
SMOKE_MODEL = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=128, max_position_embeddings=66)

PROFILES = {
    # models, seq_lens, precisions, competitors, max-batch competitors, warmup steps, timed steps, search s
    "smoke": dict(models=["micro"], seq_lens=[32], precisions=["fp32"], tasks=["mlm", "finetune", "qa"],
                  competitors=["fastroberta-triton", "fastroberta-torch", "hf-eager", "hf-sdpa"],
                  finetune_competitors=["fastroberta-triton", "fastroberta-torch", "hf-eager", "hf-sdpa"],
                  max_batch=[], warmup=1, steps=1, search_s=0, worker_s=300),
    # The GPU check's order puts what its targets compare first, in case the time budget runs out; the
    # fine-tuning steps (classification, then question answering) come after the pretraining one, and the
    # compiled pretraining step ("last") after all of them.
    "check": dict(models=["base"], seq_lens=[512], precisions=["fp16"], tasks=["mlm", "finetune", "qa"],
                  competitors=["fastroberta-triton", "hf-eager", "hf-sdpa", "fastroberta-torch"],
                  finetune_competitors=["fastroberta-triton", "hf-eager", "hf-sdpa"],
                  last=[("mlm", "fastroberta-triton-compile")],
                  max_batch=["fastroberta-triton", "hf-eager"], warmup=3, steps=8, search_s=20, worker_s=75),
    "full": dict(models=["base", "large"], seq_lens=[128, 512], precisions=["fp16", "bf16"], tasks=list(TASKS),
                 competitors=list(COMPETITORS), finetune_competitors=list(COMPETITORS),
                 max_batch=list(COMPETITORS), warmup=5, steps=20, search_s=90, worker_s=600),
}


# ------------------------------------------------------------------------------------------------ the worker
def _setup_distributed():
    """A process group of one, as the deepspeed launcher would have made (no launcher here)."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    import deepspeed
    import logging
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return deepspeed


def model_config(model, task="mlm"):
    from fastroberta import RobertaConfig
    cfg = RobertaConfig(**SMOKE_MODEL) if model == "micro" else RobertaConfig.preset(model)
    if task == "finetune":
        cfg.num_labels = FINETUNE_LABELS
    elif task == "qa":
        cfg.num_labels = 2  # start and end logits, as transformers' QA config has it
    return cfg


def _model_class(task, library):
    """fastroberta's or transformers' class for the task (both libraries use the same names)."""
    import importlib
    module = importlib.import_module(library)
    return getattr(module, MODEL_CLASSES[task])


def flops_per_token(cfg, seq_len, task="mlm"):
    """The trainer's model-FLOPs formula, taken from the model itself (built on the meta device)."""
    import torch
    with torch.device("meta"):
        model = _model_class(task, "fastroberta")(cfg, kernels="torch")
        return float(model.flops_per_token(seq_len) if task == "mlm" else model.roberta.flops_per_token(seq_len))


def build_model(competitor, cfg, device, task="mlm"):
    import torch
    if competitor.startswith("fastroberta"):
        with torch.device(device):
            # "fastroberta-triton-compile": the Triton model, compiled in build_engine
            return _model_class(task, "fastroberta")(cfg, kernels=competitor.split("-")[1])
    import transformers
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.RobertaConfig(**cfg.to_dict())
    impl = "eager" if competitor == "hf-eager" else "sdpa"
    # Built on the CPU and moved: transformers has its own ideas about default devices during init.
    model = _model_class(task, "transformers")._from_config(hf_cfg, attn_implementation=impl).to(device)
    if competitor == "hf-sdpa-compile":
        model = torch.compile(model)
    return model


def ds_config(micro_batch, precision):
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False,
                              "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8)},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                       "min_loss_scale": 1}
    elif precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def build_engine(competitor, cfg, micro_batch, precision, device, task="mlm"):
    import torch
    deepspeed = _setup_distributed()
    model = build_model(competitor, cfg, device, task)
    model.train()
    kwargs = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    if device.type == "cuda":
        kwargs["fused"] = True
    optimizer = torch.optim.AdamW(model.parameters(), **kwargs)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(micro_batch, precision))
    if competitor.startswith("fastroberta") and competitor.endswith("-compile"):
        from fastroberta.training.engine import compile_engine
        compile_engine(engine)  # what fastroberta-train --compile does
    return engine


def destroy_engine(engine):
    import torch
    if engine is not None and hasattr(engine, "destroy"):
        with contextlib.suppress(Exception):
            engine.destroy()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synthetic_batch(batch, seq_len, vocab_size, device, label_fraction=0.15, seed=0):
    """Random ids framed by <s> ... </s>, no padding, ``label_fraction`` of the inner tokens labelled."""
    import torch
    from fastroberta.config import IGNORE_INDEX
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    chosen = torch.rand(batch, seq_len, generator=g) < label_fraction
    chosen[:, 0] = chosen[:, -1] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    mask = torch.ones_like(ids)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def task_batch(task, batch, seq_len, vocab_size, device):
    """The synthetic batch of a task: packed MLM text, or a padded fine-tuning batch (bench_hf's); question
    answering's replaces the class labels by start and end positions inside each row's real tokens."""
    if task == "mlm":
        return synthetic_batch(batch, seq_len, vocab_size, device)
    from benchmarks.bench_hf import make_batch
    out = make_batch("seqcls", batch, seq_len, vocab_size, padded=True, device=device)
    if task == "qa":
        import torch
        del out["labels"]
        g = torch.Generator().manual_seed(1)
        lengths = out["attention_mask"].sum(dim=1).cpu()
        start = (torch.rand(batch, generator=g) * (lengths - 2)).long() + 1  # past <s>, before </s>
        end = torch.minimum(start + torch.randint(0, 30, (batch,), generator=g), lengths - 2)
        out["start_positions"], out["end_positions"] = start.to(device), end.to(device)
    return out


def train_step(engine, batch):
    module = getattr(engine, "module", engine)
    # As the trainers do: the batch is known good, so fastroberta skips its host reads of ids and labels.
    extra = {"validate": False} if type(module).__module__.startswith("fastroberta") else {}
    loss = engine(**batch, **extra).loss
    engine.backward(loss)
    engine.step()
    return loss


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def is_oom(exc):
    import torch
    text = str(exc)
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text \
        or "CUBLAS_STATUS_ALLOC_FAILED" in text


def search_max_batch(competitor, cfg, seq_len, precision, device, start, budget_s, engine=None, task="mlm"):
    """Largest micro-batch that runs two steps (the second one holds the optimizer state too). ``start`` is
    known to fit. Doubling, then bisection until the first failure is within 1/16 of the last fit; past 16
    only multiples of 8 are probed, so the answer is exact to 8 sequences or 1/16, whichever is larger."""
    deadline = time.monotonic() + budget_s
    lo, hi, probes, stopped = start, None, [], "converged"
    mb = 2 * start
    while True:
        if time.monotonic() > deadline:
            stopped = "time budget"
            break
        t0 = time.monotonic()
        ok, batch = True, None
        try:
            if engine is None:
                engine = build_engine(competitor, cfg, mb, precision, device, task)
            batch = task_batch(task, mb, seq_len, cfg.vocab_size, device)
            for _ in range(2):
                train_step(engine, batch)
            _sync()
        except Exception as e:
            if not is_oom(e):
                raise
            ok = False
        # Out here the exception and its traceback (which pins the activations) are gone, so the memory frees.
        batch = None
        if not ok:
            # An OOM inside backward leaves ZeRO's gradient buckets half reduced: start from a fresh engine.
            destroy_engine(engine)
            engine = None
        probes.append({"micro_batch": mb, "fits": ok, "seconds": round(time.monotonic() - t0, 1)})
        if ok:
            lo = mb
        else:
            hi = mb
        if hi is None:
            mb = 2 * lo
            continue
        if hi - lo <= max(1, lo // 16):
            break
        mb = (lo + hi) // 2
        if mb > 16:
            mb = mb // 8 * 8
        if mb <= lo:
            break
    destroy_engine(engine)
    return {"max_micro_batch": lo, "first_failure": hi, "stopped": stopped, "probes": probes,
            "exact": stopped == "converged"}


def measure(spec):
    """One (task, model, seq_len, precision, competitor): warm-up, timed steps, optional max-batch search."""
    import torch
    dev = harness.device()
    task = spec.get("task", "mlm")
    cfg = model_config(spec["model"], task)
    seq, mb = spec["seq_len"], spec["micro_batch"]
    rec = {**spec, "status": "ok"}
    t_start = time.monotonic()
    torch.manual_seed(0)
    engine = build_engine(spec["competitor"], cfg, mb, spec["precision"], dev, task)
    batch = task_batch(task, mb, seq, cfg.vocab_size, dev)
    real_tokens = int(batch["attention_mask"].sum())
    losses = [float(train_step(engine, batch).detach()) for _ in range(spec["warmup"])]
    _sync()
    skipped_before = getattr(engine, "skipped_steps", 0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = train_step(engine, batch)
    _sync()
    elapsed = time.perf_counter() - start
    losses.append(float(loss.detach()))
    fpt = flops_per_token(cfg, seq, task)
    peak = harness.peak_tflops()
    tokens_per_s = real_tokens * spec["steps"] / elapsed
    rec.update({
        "real_tokens_per_step": real_tokens, "step_ms": 1e3 * elapsed / spec["steps"],
        "tokens_per_s": tokens_per_s, "flops_per_token": fpt, "model_tflops": tokens_per_s * fpt / 1e12,
        "mfu": tokens_per_s * fpt / (peak * 1e12) if peak and spec["precision"] != "fp32" else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "skipped_steps": getattr(engine, "skipped_steps", 0) - skipped_before,
        "loss_first": losses[0], "loss_last": losses[-1],
        "parameters": sum(p.numel() for p in engine.module.parameters()),
    })
    del batch
    if spec.get("search_s"):
        rec["max_batch_search"] = search_max_batch(spec["competitor"], cfg, seq, spec["precision"], dev, mb,
                                                   spec["search_s"], engine=engine, task=task)
        rec["max_micro_batch"] = rec["max_batch_search"]["max_micro_batch"]
    else:
        destroy_engine(engine)
    rec["seconds"] = round(time.monotonic() - t_start, 1)
    return rec


def _worker_main(spec_path, result_path):
    spec = json.loads(Path(spec_path).read_text())
    try:
        rec = measure(spec)
    except BaseException as e:  # report the failure to the parent instead of a bare exit status
        rec = {**spec, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        if harness.device().type == "cuda" and is_oom(e):
            rec["status"] = "out of memory at the timed micro-batch"
    Path(result_path).write_text(json.dumps(rec))
    return 0


# ----------------------------------------------------------------------------------------- the orchestrator
def micro_batch_for(model, seq_len):
    return max(1, TOKENS_PER_STEP[model] // seq_len)


def _run_isolated(spec, timeout_s, log):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(harness.REPO), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "benchmarks.bench_e2e", "--worker", str(spec_path), "--result",
               str(result_path)]
        try:
            proc = subprocess.run(cmd, cwd=harness.REPO, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**spec, "status": f"error: timed out after {timeout_s:.0f} s"}
        if result_path.exists():
            return json.loads(result_path.read_text())
        return {**spec, "status": f"error: worker exited with status {proc.returncode} and no result"}


def _split(value, default, cast=str):
    if value is None:
        return list(default)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return [cast(v) for v in value]


def cases(prof, tasks, models, seq_lens, precisions, competitors):
    """(task, model, seq_len, micro_batch, precision, competitor) in the order they run: each task's grid in turn.
    Each fine-tuning step has one shape (finetune: seq 128, batch 32, smoke seq 32, batch 4; qa: seq 384, batch
    32, smoke seq 48, batch 4) and runs the profile's ``finetune_competitors``; ``competitors``, when given,
    replaces every task's list (and the profile's ``last`` cases, which run after every grid)."""
    out = []
    for task in tasks:
        if task == "mlm":
            shapes = [(seq, None) for seq in seq_lens]
            comps = competitors or prof["competitors"]
        else:
            smoke_shape, shape = (FINETUNE_SMOKE_SHAPE, FINETUNE_SHAPE) if task == "finetune" else \
                (QA_SMOKE_SHAPE, QA_SHAPE)
            shapes = [smoke_shape if "micro" in models else shape]
            comps = competitors or prof["finetune_competitors"]
        for model in models:
            for seq, mb in shapes:
                for precision in precisions:
                    for comp in comps:
                        out.append((task, model, seq, mb or micro_batch_for(model, seq), precision, comp))
    if not competitors:  # the profile's cases that run after every task's grid (the check's compiled step)
        for task, comp in prof.get("last", []):
            if task == "mlm" and task in tasks:
                out += [(task, model, seq, micro_batch_for(model, seq), precision, comp)
                        for model in models for seq in seq_lens for precision in precisions]
    return out


def run(profile, out_root, models=None, seq_lens=None, precisions=None, competitors=None, max_batch=None,
        steps=None, time_budget=None, isolate=None, log=print, tasks=None):
    """Run the profile's grid (flags narrow or widen it); write e2e.json/.md/.png; return the result dict.
    ``isolate``: one subprocess per measurement (default: on CUDA)."""
    prof = PROFILES[profile]
    smoke = profile == "smoke"
    isolate = not smoke if isolate is None else isolate
    models = _split(models, prof["models"])
    seq_lens = _split(seq_lens, prof["seq_lens"], int)
    precisions = _split(precisions, prof["precisions"])
    comps = _split(competitors, []) if competitors else None
    tasks = _split(tasks, prof["tasks"])
    unknown = [c for c in comps or [] if c not in COMPETITORS]
    if unknown:
        raise SystemExit(f"unknown e2e competitor(s) {unknown}; choose from {list(COMPETITORS)}")
    if [t for t in tasks if t not in TASKS]:
        raise SystemExit(f"unknown e2e task(s) {[t for t in tasks if t not in TASKS]}; choose from {list(TASKS)}")
    if max_batch in ("all", "none"):
        searched = list(COMPETITORS) if max_batch == "all" else []
    else:
        searched = _split(max_batch, prof["max_batch"])
    env = harness.environment(smoke)
    out_dir = harness.results_dir(out_root, env)
    deadline = time.monotonic() + time_budget if time_budget else None
    result = {"bench": "e2e", "title": "Training step: DeepSpeed ZeRO-2 on one device", "profile": profile,
              "environment": env, "label": env["label"], "results": [], "complete": False}
    started = time.monotonic()
    rate, ms = ("smoke tok/s", "smoke ms") if smoke else ("tok/s", "ms")
    if smoke:
        log(f"[e2e] figures below are {rate} / {ms}: CPU wall time of a micro model ({harness.SMOKE_LABEL})")
    for task, model, seq, mb, precision, comp in cases(prof, tasks, models, seq_lens, precisions, comps):
        spec = {"task": task, "model": model, "seq_len": seq, "precision": precision, "competitor": comp,
                "micro_batch": mb, "warmup": prof["warmup"], "steps": steps or prof["steps"],
                "search_s": prof["search_s"] if comp in searched and seq == 512 and task == "mlm" else 0}
        remaining = deadline - time.monotonic() if deadline else None
        if remaining is not None and remaining < 15:
            rec = {**spec, "status": "skipped: time budget"}
        else:
            log(f"[e2e] {task} {model} seq {seq} {precision} {comp} micro-batch {mb}")
            if not isolate:
                try:
                    rec = measure(spec)
                except Exception as e:
                    rec = {**spec, "status": f"error: {type(e).__name__}: {str(e)[:300]}"}
            else:
                limit = prof["worker_s"] + spec["search_s"]
                if comp.endswith("-compile"):
                    limit += COMPILE_S[profile]
                if remaining is not None:
                    limit = min(limit, remaining - 5)
                rec = _run_isolated(spec, limit, log)
        log(f"  {rec['status']}" + (f": {rec['tokens_per_s']:.0f} {rate}, step {rec['step_ms']:.1f} {ms}"
                                     if rec.get("tokens_per_s") else ""))
        result["results"].append(rec)
        result["elapsed_s"] = round(time.monotonic() - started, 1)
        write_result(result, out_dir, plot=False)
    result["complete"] = all(not r["status"].startswith("skipped") for r in result["results"])
    write_result(result, out_dir, plot=True)
    log(summary_line(result["results"], rate))
    return result


def summary_line(results, rate):
    """``e2e: pretraining (MLM): <competitor> <rate>, ...; fine-tuning (classification): ...``: the same
    competitor names run in each task, so each group is named."""
    groups = {}
    for r in results:
        groups.setdefault(r.get("task", "mlm"), []).append(
            f"{r['competitor']} {r['tokens_per_s']:.0f} {rate}" if r.get("tokens_per_s")
            else f"{r['competitor']} {r['status'][:40]}")
    names = {"mlm": "pretraining (MLM)", "finetune": "fine-tuning (classification)",
             "qa": "fine-tuning (question answering)"}
    return "e2e: " + "; ".join(f"{names.get(task, task)}: {', '.join(items)}" for task, items in groups.items())


# ------------------------------------------------------------------------------------------------- writers
def _config_key(r):
    return (r.get("task", "mlm"), r["model"], r["seq_len"], r["precision"])


PLOT_TAGS = {"finetune": "FT ", "qa": "QA "}
TASK_TITLES = {"mlm": "pretraining (masked LM, packed text)",
               "finetune": f"fine-tuning (sequence classification, {FINETUNE_LABELS} labels, padded batches)",
               "qa": "fine-tuning (question answering, start and end positions, padded batches)"}


def e2e_markdown(result):
    env = result["environment"]
    lines = ["# " + result["title"], ""]
    if env["smoke"]:
        lines += [f"**{harness.SMOKE_LABEL}** — a micro model on {env['device']}; the numbers only show that "
                  "the harness runs.", ""]
    lines += [harness.env_line(env), "",
              "tokens/s counts real tokens; MFU = tokens/s x model FLOPs per token / dense 16-bit peak "
              f"({harness.fmt(env.get('peak_tflops_16bit'), 1)} TFLOP/s); peak mem = max allocated during the "
              "timed steps; max micro-batch = largest that runs two steps (≥: search cut short).", ""]
    configs = []
    for r in result["results"]:
        if _config_key(r) not in configs:
            configs.append(_config_key(r))
    for key in configs:
        rows_in = [r for r in result["results"] if _config_key(r) == key]
        base = {r["competitor"]: r.get("tokens_per_s") for r in rows_in}
        rows = []
        for r in rows_in:
            tps = r.get("tokens_per_s")

            def ratio(other):
                return harness.fmt(tps / base[other], 2) + "x" if tps and base.get(other) else "-"
            search = r.get("max_batch_search")
            if search:
                maxb = ("" if search["exact"] else "≥ ") + str(search["max_micro_batch"])
            else:
                maxb = "-"
            rows.append([r["competitor"], r["micro_batch"], harness.fmt(r.get("step_ms"), 1),
                         harness.fmt(tps, 0), ratio("hf-eager"), ratio("hf-sdpa"),
                         harness.fmt(100 * r["mfu"], 1) + "%" if r.get("mfu") else "-",
                         harness.fmt(r.get("peak_mem_gb"), 2), maxb, r.get("skipped_steps", "-"), r["status"]])
        lines += [f"## {TASK_TITLES[key[0]]}: {key[1]}, seq {key[2]}, micro-batch {rows_in[0]['micro_batch']}, "
                  f"{key[3]}", ""]
        lines += [harness.markdown_table(["competitor", "micro-batch", "step ms", "tokens/s", "vs hf-eager",
                                          "vs hf-sdpa", "MFU", "peak mem GB", "max micro-batch",
                                          "skipped steps", "status"], rows), ""]
    return "\n".join(lines)


def plot_e2e(result, path):
    plt = harness._pyplot()
    if plt is None or result["environment"]["smoke"]:
        return None
    rows = [r for r in result["results"] if r.get("tokens_per_s")]
    if not rows:
        return None
    configs = []
    for r in rows:
        if _config_key(r) not in configs:
            configs.append(_config_key(r))
    comps = [c for c in COMPETITORS if any(r["competitor"] == c for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(configs) * len(comps) / 3), 4))
    width = 0.8 / len(comps)
    for i, comp in enumerate(comps):
        ys = []
        for key in configs:
            match = [r["tokens_per_s"] for r in rows if _config_key(r) == key and r["competitor"] == comp]
            ys.append(match[0] / 1e3 if match else 0)
        ax.bar([x + i * width for x in range(len(configs))], ys, width, label=comp)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(configs))])
    ax.set_xticklabels([f"{PLOT_TAGS.get(t, '')}{m} L{s} {p}" for t, m, s, p in configs],
                       rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("thousand tokens / s")
    ax.set_title(f"Training step, DeepSpeed ZeRO-2 — {result['environment']['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_result(result, out_dir, plot=True):
    out_dir = Path(out_dir)
    harness.write_json(result, out_dir / "e2e.json")
    (out_dir / "e2e.md").write_text(e2e_markdown(result))
    if plot:
        plot_e2e(result, out_dir / "e2e.png")


# -------------------------------------------------------------------------------------------- pytest face
def _pytest_tests():
    try:
        import pytest
    except ImportError:
        return None
    from benchmarks.pytest_support import profile
    prof = PROFILES[profile()]
    grid = cases(prof, prof["tasks"], prof["models"], prof["seq_lens"], prof["precisions"], None)

    @pytest.mark.parametrize("task,model,seq_len,mb,precision,competitor", grid,
                             ids=[f"{t}-{m}-L{s}-{p}-{c}" for t, m, s, _, p, c in grid])
    def test_e2e_step(benchmark, task, model, seq_len, mb, precision, competitor):
        """pytest-benchmark: one ZeRO-2 training step (forward, backward, optimizer step)."""
        dev = harness.device()
        cfg = model_config(model, task)
        engine = build_engine(competitor, cfg, mb, precision, dev, task)
        batch = task_batch(task, mb, seq_len, cfg.vocab_size, dev)
        try:
            for _ in range(prof["warmup"]):
                train_step(engine, batch)

            def step():
                train_step(engine, batch)
                _sync()
            benchmark.extra_info.update({"task": task, "model": model, "seq_len": seq_len, "precision": precision,
                                         "competitor": competitor, "micro_batch": mb,
                                         "real_tokens_per_step": int(batch["attention_mask"].sum()),
                                         "label": harness.environment(profile() == "smoke")["label"]})
            if profile() == "smoke":
                benchmark.group = "SMOKE, CPU wall times, not performance: e2e step"
            benchmark.pedantic(step, rounds=max(1, prof["steps"]), warmup_rounds=0, iterations=1)
        finally:
            destroy_engine(engine)
    return test_e2e_step


test_e2e_step = _pytest_tests()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="e2e worker (used by benchmarks.bench_e2e.run)")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    sys.exit(_worker_main(args.worker, args.result))
