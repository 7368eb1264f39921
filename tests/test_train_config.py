"""Trainer configuration without starting DeepSpeed: the generated/merged DeepSpeed config, the LR schedule,
parameter groups, metrics helpers, and every configuration error the CLI must catch before any work."""
import json
import math
import os

import pytest
import torch

from fastroberta import RobertaConfig, RobertaForMaskedLM
from fastroberta import train as tr
from fastroberta.training.optimizer import param_groups
from fastroberta.training.precision import cpu_has_native_bf16
from fastroberta.training.schedule import warmup_linear_decay
from fastroberta.training.ds_config import (ConfigError, build_config, format_conflict, load_user_config, merge_configs,
                                   resolve_batch, resolve_precision, zero_stage_of)
from fastroberta.training.metrics import MetricsLog, Throughput, peak_tflops, perplexity, read_metrics


# --- DeepSpeed config ----------------------------------------------------------------------------------------
def _generated(**kw):
    args = dict(micro_batch_size=4, grad_accum_steps=2, world_size=2, precision="bf16", zero_stage=2,
                clip_grad=1.0, optimizer={"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01,
                                          "torch_adam": True})
    args.update(kw)
    return build_config(**args)


def test_generated_config_follows_the_flags():
    cfg = _generated()
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                                                            "weight_decay": 0.01, "torch_adam": True}}
    fp16 = _generated(precision="fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    assert "bf16" not in _generated(precision="fp32") and "fp16" not in _generated(precision="fp32")
    off = _generated(offload_optimizer=True)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert off["zero_force_ds_cpu_optimizer"] is False  # torch AdamW under offload must be allowed explicitly
    client = _generated(optimizer=None)
    assert "optimizer" not in client and client["zero_allow_untested_optimizer"] is True


def test_merge_reports_every_changed_value_with_both_values():
    gen = _generated()
    user = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_clipping": 1.0,
            "optimizer": {"params": {"lr": 5e-4}}, "new_key": 7}
    merged, conflicts = merge_configs(gen, user)
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert merged["optimizer"]["params"]["lr"] == 5e-4 and merged["optimizer"]["params"]["eps"] == 1e-6
    assert merged["new_key"] == 7
    # An equal value (gradient_clipping) and a new key are not conflicts.
    assert sorted(conflicts) == [("optimizer.params.lr", 1e-3, 5e-4), ("zero_optimization.stage", 2, 3)]
    assert gen["zero_optimization"] == {"stage": 2}, "the generated config must not be modified"
    msg = format_conflict("zero_optimization.stage", 2, 3)
    assert "zero_optimization.stage" in msg and "3" in msg and "2" in msg


@pytest.mark.parametrize("user, expected", [
    ({}, (4, 2, 16)),
    ({"train_batch_size": 32}, (4, 4, 32)),
    ({"train_micro_batch_size_per_gpu": 2}, (2, 4, 16)),
    ({"gradient_accumulation_steps": 1}, (8, 1, 16)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, (8, 2, 32)),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 3}, (8, 3, 48)),
])
def test_batch_keys_from_the_user_win_and_stay_consistent(user, expected):
    merged, _ = merge_configs(_generated(), user)
    assert resolve_batch(merged, user, micro_batch_size=4, global_batch_size=16, world_size=2) == expected
    mb, ga, tb = expected
    assert (merged["train_micro_batch_size_per_gpu"], merged["gradient_accumulation_steps"],
            merged["train_batch_size"]) == (mb, ga, tb)


@pytest.mark.parametrize("user", [{"train_batch_size": 30}, {"train_batch_size": 16, "gradient_accumulation_steps": 3,
                                                             "train_micro_batch_size_per_gpu": 4},
                                  {"train_micro_batch_size_per_gpu": 0}])
def test_inconsistent_user_batch_is_an_error(user):
    merged, _ = merge_configs(_generated(), user)
    with pytest.raises(ConfigError, match="batch|divisible|positive"):
        resolve_batch(merged, user, micro_batch_size=4, global_batch_size=16, world_size=2)


def test_precision_from_the_user_json_wins():
    gen = _generated(precision="fp16")
    user = {"bf16": {"enabled": True}}
    merged, _ = merge_configs(gen, user)
    assert resolve_precision(merged, user, "fp16") == "bf16" and merged["fp16"]["enabled"] is False
    merged, _ = merge_configs(_generated(precision="bf16"), {})
    assert resolve_precision(merged, {}, "bf16") == "bf16"
    merged, _ = merge_configs(_generated(precision="fp32"), {})
    assert resolve_precision(merged, {}, "fp32") == "fp32"
    both = {"fp16": {"enabled": True}, "bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match="both fp16 and bf16"):
        resolve_precision(merge_configs(gen, both)[0], both, "fp16")
    with pytest.raises(ConfigError, match="stage"):
        zero_stage_of({"zero_optimization": {"stage": 4}})


def test_user_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_user_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{\"zero_optimization\": {")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_user_config(str(bad))
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_user_config(str(arr))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"gradient_clipping": 0.5}))
    assert load_user_config(str(good)) == {"gradient_clipping": 0.5}


# --- schedule, parameter groups, learning-rate rule -------------------------------------------------------------
def test_warmup_then_linear_decay_to_zero():
    f = warmup_linear_decay(4, 20)
    values = [f(s) for s in range(22)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[19] == pytest.approx(1 / 16) and values[20] == 0.0 and values[21] == 0.0
    assert all(a >= b for a, b in zip(values[3:], values[4:])), "must decay monotonically after warmup"
    g = warmup_linear_decay(0, 10)
    assert g(0) == 1.0 and g(5) == 0.5


def test_weight_decay_skips_biases_and_layer_norms():
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32), kernels="torch")
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "roberta.embeddings.word_embeddings.weight" in decayed and "roberta.layers.0.qkv.weight" in decayed
    assert not any("norm" in n or n.endswith("bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _settings(argv):
    return tr.resolve_settings(tr.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv, lr", [
    ([], 4e-3),                                                        # demo (the default) at its batch 32
    (["--model", "tiny"], 2e-3 * math.sqrt(16 / 64)),                  # tiny at its default batch 16
    (["--model", "tiny", "--global-batch-size", "64"], 2e-3),
    (["--model", "base", "--global-batch-size", "8192"], 6e-4),
    (["--model", "base", "--global-batch-size", "256"], 6e-4 * math.sqrt(256 / 8192)),
    (["--model", "large", "--global-batch-size", "16384"], 4e-4),       # never above the reference
    (["--lr", "3e-4"], 3e-4),
])
def test_default_peak_lr_rule(argv, lr, tmp_path):
    s = _settings(argv + ["--output", str(tmp_path / "o")])
    assert s.lr == pytest.approx(lr)


def test_defaults_follow_the_paper(tmp_path):
    s = _settings(["--output", str(tmp_path / "o"), "--steps", "1000"])
    assert s.warmup_steps == 50  # 5% of the steps
    opt = s.ds_config["optimizer"]["params"]
    assert opt["betas"] == [0.9, 0.98] and opt["eps"] == 1e-6 and opt["weight_decay"] == 0.01
    assert opt["torch_adam"] is True  # CPU: torch AdamW
    assert s.precision in ("bf16", "fp32") and s.zero_stage == 0 and s.ds_config["gradient_clipping"] == 1.0
    assert s.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert _settings(["--output", str(tmp_path / "o"), "--steps", "10"]).warmup_steps == 1


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_each_kind_of_cpu(tmp_path, monkeypatch, native_bf16, expected):
    """Both CPU paths, whatever this machine is: auto picks bf16 only where the CPU computes it natively."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only rule")
    monkeypatch.setattr("fastroberta.training.precision.cpu_has_native_bf16", lambda: native_bf16)
    s = _settings(["--output", str(tmp_path / "o")])
    assert s.precision == expected
    assert ("bf16" in s.ds_config and s.ds_config["bf16"]["enabled"]) == (expected == "bf16")


def test_cpu_flag_detection(tmp_path, monkeypatch):
    import builtins
    real_open = builtins.open
    for text, expected in (("flags : fpu avx512f avx512_bf16 amx_tile", True), ("flags : fpu avx2", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(text)
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p,
                                                                           *a, **k))
        assert cpu_has_native_bf16() is expected


# --- configuration errors: caught by main() before any work, exit status 2 ------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--micro-batch-size", "3", "--global-batch-size", "8"], "not divisible by --micro-batch-size 3"),
    (["--seq-len", "513"], "exceeds the position table: at most 512"),
    (["--precision", "fp16"], "use --precision bf16"),
    (["--model", "huge"], "unknown model preset 'huge'"),
    (["--deepspeed_config", "/nonexistent/ds.json"], "cannot be read"),
    (["--model", "base", "--config", "x.json"], "either --model or --config"),
    (["--resume", "/nonexistent/ckpt"], "is neither a checkpoints folder"),
    (["--offload-optimizer"], "needs ZeRO"),
    (["--optimizer", "apex_adam"], "apex"),
    (["--steps", "0"], "--steps must be positive"),
])
def test_config_errors_stop_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert tr.main(argv + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "error:" in err
    assert not out.exists(), "nothing may be written for a configuration error"


def test_malformed_deepspeed_config_is_a_config_error(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    assert tr.main(["--deepspeed_config", str(bad), "--output", str(tmp_path / "run")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_triton_kernels_on_cpu_need_the_interpreter(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the check only applies without CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tr.main(["--kernels", "triton", "--output", str(tmp_path / "run")]) == 2
    assert "--kernels triton needs a CUDA GPU" in capsys.readouterr().err


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    from fastroberta.training.manifest import write_manifest
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "global_step5").mkdir(parents=True)
    (ckpt / "global_step5" / "model.pt").write_bytes(b"weights")
    write_manifest(str(ckpt / "global_step5"))
    (ckpt / "latest").write_text("global_step5")
    assert tr.main(["--output", str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    s = _settings(["--output", str(tmp_path / "run"), "--resume"])
    assert s.resume_from == (str(ckpt), "global_step5")
    s = _settings(["--output", str(tmp_path / "other"), "--resume", str(ckpt / "global_step5")])
    assert s.resume_from == (str(ckpt), "global_step5")
    # A save interrupted between renaming its temporary folder and moving the pointer.
    (ckpt / "latest").write_text("global_step5.tmp")
    assert _settings(["--output", str(tmp_path / "run"), "--resume"]).resume_from == (str(ckpt), "global_step5")
    # A pointer to a checkpoint that is not there: the newest intact one, with a warning.
    (ckpt / "latest").write_text("global_step9")
    s = _settings(["--output", str(tmp_path / "run"), "--resume"])
    assert s.resume_from == (str(ckpt), "global_step5")
    assert any("global_step9 is damaged: it does not exist" in w and "global_step5" in w for w in s.warnings)
    assert tr.main(["--output", str(tmp_path / "run"), "--resume", "--overwrite"]) == 2
    assert "either --resume or --overwrite" in capsys.readouterr().err


# --- metrics ------------------------------------------------------------------------------------------------------
def test_throughput_counts_real_tokens_and_mfu(monkeypatch):
    meter = Throughput(flops_per_token=1e9, peak_tflops_per_device=100.0, world_size=2)
    clock = iter([0.0, 2.0])
    monkeypatch.setattr("fastroberta.training.metrics._clock", lambda: next(clock))
    meter.resume()
    meter.add(tokens=4000, samples=10)
    rates = meter.read()
    assert rates["tokens_per_s"] == 2000 and rates["samples_per_s"] == 5
    assert rates["tflops"] == pytest.approx(2.0) and rates["mfu"] == pytest.approx(2.0 / 200.0)
    assert Throughput(1e9, None, 1).read()["mfu"] is None


def test_peak_tflops_table_and_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTROBERTA_PEAK_TFLOPS", raising=False)
    assert peak_tflops(cpu, "bf16") is None  # MFU is null on CPU
    assert peak_tflops(cpu, "bf16", override=1.5) == 1.5
    monkeypatch.setenv("FASTROBERTA_PEAK_TFLOPS", "2.5")
    assert peak_tflops(cpu, "fp32") == 2.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("FASTROBERTA_PEAK_TFLOPS")
    assert peak_tflops(torch.device("cuda", 0), "fp16") == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    assert peak_tflops(torch.device("cuda", 0), "bf16") == 125.0  # not mistaken for an A100
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert peak_tflops(torch.device("cuda", 0), "bf16") is None
    assert perplexity(math.log(100.0)) == pytest.approx(100.0) and perplexity(1e4) == float("inf")


def test_metrics_log_truncates_repeated_steps_on_resume(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step, "mfu": None})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a crash mid-line
    log = MetricsLog(path, resume_step=3)
    log.log({"step": 4, "loss": 0.0, "grad_norm": float("inf")})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    assert read_metrics(path)[-1] == {"step": 4, "loss": 0.0, "grad_norm": None}  # strict JSON: no Infinity
    with open(path) as f:
        json.loads(f.read().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_tensorboard_flag(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert tr.main(["--tensorboard", "--output", str(tmp_path / "run")]) == 2
        assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
        return
    log = MetricsLog(str(tmp_path / "m.jsonl"), tensorboard_dir=str(tmp_path / "tb"))
    log.log({"step": 1, "loss": 2.0, "mfu": None})
    log.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_learning_rate_follows_the_batch_and_optimizer_of_a_user_json(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_batch_size": 64}))
    s = _settings(["--model", "tiny", "--output", str(tmp_path / "o"), "--deepspeed_config", str(cfg)])
    assert s.global_batch_size == 64 and s.grad_accum_steps == 4
    assert s.lr == pytest.approx(2e-3) and s.ds_config["optimizer"]["params"]["lr"] == pytest.approx(2e-3)
    cfg.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    s = _settings(["--output", str(tmp_path / "o"), "--deepspeed_config", str(cfg)])
    assert s.lr == 1e-4 and any("optimizer.params.lr" in w for w in s.warnings)


def test_run_defaults_follow_the_preset(tmp_path):
    """No arguments: the demo preset with its own vocabulary, length, batch and steps; tiny keeps the general
    defaults; flags the user gives always win."""
    from fastroberta.run_defaults import BY_PRESET, GENERAL
    args = tr.build_parser().parse_args(["--output", str(tmp_path / "o")])
    s = tr.resolve_settings(args)
    demo = BY_PRESET["demo"]
    assert s.model_name == "demo" and s.config.hidden_size == 64 and s.config.num_hidden_layers == 2
    assert (args.vocab_size, args.seq_len, args.micro_batch_size, args.steps) == \
        (demo["vocab_size"], demo["seq_len"], demo["micro_batch_size"], demo["steps"])
    args = tr.build_parser().parse_args(["--model", "tiny", "--output", str(tmp_path / "o")])
    s = tr.resolve_settings(args)
    assert s.config.hidden_size == 256 and s.config.num_hidden_layers == 4
    assert (args.vocab_size, args.seq_len, args.micro_batch_size, args.steps) == \
        (GENERAL["vocab_size"], GENERAL["seq_len"], GENERAL["micro_batch_size"], GENERAL["steps"])
    args = tr.build_parser().parse_args(["--seq-len", "48", "--steps", "7", "--output", str(tmp_path / "o")])
    tr.resolve_settings(args)
    assert args.seq_len == 48 and args.steps == 7 and args.vocab_size == demo["vocab_size"]


def test_help_names_every_data_form(capsys):
    with pytest.raises(SystemExit):
        tr.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for form in (".jsonl", '"text"', ".gz", "folder", "hf:NAME[:CONFIG][:SPLIT]", "text file"):
        assert form in text, form
