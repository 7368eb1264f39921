"""The training core both commands share (fastroberta/training/): flags defined once, neither CLI importing the
other, fastroberta-finetune's --optimizer, the shared step's sums."""
import argparse
import ast
import json
import pathlib

import pytest
import torch

from fastroberta import finetune as ft
from fastroberta import train as tr
from fastroberta.training.cli import add_shared_flags
from fastroberta.training.errors import ConfigError
from fastroberta.training.step import optimizer_step

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastroberta"


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_neither_command_imports_the_other():
    assert not {"fastroberta.train"} & imported_modules(PACKAGE / "finetune.py")
    assert not {"fastroberta.finetune"} & imported_modules(PACKAGE / "train.py")
    for path in (PACKAGE / "training").glob("*.py"):
        assert not {"fastroberta.train", "fastroberta.finetune"} & imported_modules(path), path.name


def test_shared_flags_mean_the_same_in_both_commands():
    shared = [a for a in add_shared_flags(argparse.ArgumentParser())._actions if a.option_strings and a.dest != "help"]
    parsers = {"train": tr.build_parser(), "finetune": ft.build_parser()}
    for action in shared:
        for name, parser in parsers.items():
            mine = [a for a in parser._actions if a.dest == action.dest]
            assert len(mine) == 1, (name, action.dest)
            assert mine[0].option_strings == action.option_strings, (name, action.dest)
            assert mine[0].choices == action.choices and mine[0].type == action.type, (name, action.dest)
    # a command may keep its own default for a shared flag
    assert parsers["train"].parse_args([]).weight_decay == 0.01
    assert parsers["finetune"].parse_args([]).weight_decay == 0.1


def finetune_settings(tmp_path, *flags):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")   # resolve_settings only checks that it exists
    args = ft.build_parser().parse_args(["--model", "demo", "--tokenizer", str(tokenizer), "--precision", "fp32",
                                         "--output", str(tmp_path / "run"), *flags])
    return ft.resolve_settings(args)


def test_finetune_takes_the_trainers_optimizer_choice(tmp_path):
    auto = finetune_settings(tmp_path)
    assert auto.optimizer == ("deepspeed_adam" if torch.cuda.is_available() else "torch_adamw")
    s = finetune_settings(tmp_path, "--optimizer", "torch_adamw")
    assert s.optimizer == "torch_adamw" and s.ds_config["optimizer"]["params"]["torch_adam"] is True
    s = finetune_settings(tmp_path, "--optimizer", "deepspeed_adam")
    assert not s.ds_config["optimizer"]["params"].get("torch_adam", False)
    with pytest.raises(SystemExit):
        ft.build_parser().parse_args(["--optimizer", "sgd"])
    with pytest.raises(ConfigError, match="--offload-optimizer needs ZeRO"):
        finetune_settings(tmp_path, "--offload-optimizer")


class _Out:
    def __init__(self, loss, correct):
        self.loss, self.num_correct, self.num_labels = loss, correct, torch.tensor(4.0)


class _Engine:
    """Just enough of a DeepSpeed engine for one step: losses in order, the calls recorded."""
    skipped_steps = 0
    module = torch.nn.Linear(1, 1)

    def __init__(self, losses):
        self.losses, self.calls = list(losses), []

    def __call__(self, **inputs):
        return _Out(torch.tensor(self.losses.pop(0)), torch.tensor(1.0))

    def backward(self, loss):
        self.calls.append("backward")

    def step(self):
        self.calls.append("step")

    def get_lr(self):
        return [0.1]


def test_optimizer_step_sums_its_micro_batches(monkeypatch):
    import torch.distributed as dist
    monkeypatch.setattr(dist, "all_reduce", lambda t: t)   # a world of one
    s = argparse.Namespace(grad_accum_steps=2, world_size=1, precision="bf16", zero_stage=0)
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    engine = _Engine([1.0, 3.0])
    result = optimizer_step(engine, iter([batch, batch]), s, torch.device("cpu"), lambda b, d: dict(b),
                            extra_sums=lambda out: (out.num_correct, out.num_labels), stop_requested=True)
    assert engine.calls == ["backward", "step", "backward", "step"]
    assert result.loss == 2.0 and result.tokens == 30 and result.samples == 6
    assert result.extra == [2.0, 8.0] and result.stop_requested and not result.skipped


def test_resume_reads_untyped_flags_from_run_json_and_names_typed_changes(tmp_path):
    """parse_command_line with --resume: flags not typed come from run.json; a typed flag that changes the run
    becomes a warning line (said before DeepSpeed starts), one outside the run does not; nothing is restored
    without --resume."""
    from fastroberta.training.cli import parse_command_line, typed_flags
    out = tmp_path / "run"
    out.mkdir()
    saved = vars(tr.build_parser().parse_args(["--precision", "fp32", "--steps", "40", "--lr", "1e-3"]))
    (out / "run.json").write_text(json.dumps({"args": {**saved, "stop_at_step": 20, "adam_betas": [0.9, 0.95]}}))
    parser = tr.build_parser()
    assert typed_flags(parser, ["--resume", "--output", str(out), "--steps", "8"]) == {"resume", "output", "steps"}
    args = parse_command_line(parser, ["--resume", "--output", str(out)], lambda a: None)
    assert (args.precision, args.steps, args.lr, args.stop_at_step) == ("fp32", 40, 1e-3, None)
    assert args.adam_betas == (0.9, 0.95) and args.changed_on_resume == []
    args = parse_command_line(parser, ["--resume", "--output", str(out), "--steps", "80", "--save-every", "5"],
                              lambda a: None)
    assert args.steps == 80 and args.precision == "fp32"
    assert [line for _, line in args.changed_on_resume] == [
        "--resume with --steps 80 (the run had 40): the run will not match an uninterrupted one"]
    assert parse_command_line(parser, ["--output", str(out)], lambda a: None).precision == "auto"
    (out / "run.json").write_text("{")
    with pytest.raises(ConfigError, match="run.json cannot be read"):
        parse_command_line(parser, ["--resume", "--output", str(out)], lambda a: None)
