"""The command line both commands share: the flags that mean the same thing in fastroberta-train and
fastroberta-finetune (defined here once), their checks, the help layout and the one way a run talks to its user."""
import argparse
import sys

from fastroberta.kernels.backend import KERNEL_CHOICES
from fastroberta.training.checkpoints import LATEST
from fastroberta.training.errors import ConfigError
from fastroberta.training.optimizer import OPTIMIZERS
from fastroberta.training.precision import PRECISIONS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already explains it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


SHARED_HELP = {
    "kernels": "auto: Triton on CUDA, the PyTorch reference on CPU",
    "compile": "torch.compile the model (one graph, fullgraph=True) inside the DeepSpeed engine",
    "global_batch_size": "samples per optimizer step over all processes; accumulation is derived (default: "
                         "micro-batch size x world size)",
    "stop_at_step": "checkpoint and exit after this step, the schedule still spanning the whole run (for "
                    "time-sliced jobs)",
    "lr": "peak learning rate",
    "optimizer": "auto: DeepSpeed's fused Adam on CUDA, torch AdamW on CPU; torch_adamw needs no compiler on "
                 "CUDA (DeepSpeed's fused Adam JIT-builds with nvcc at the first start)",
    "weight_decay": "AdamW decay (not on biases/LayerNorm)",
    "output": "run folder",
    "save_every": "checkpoint every N steps (and at the end)",
    "keep_last": "checkpoints kept (0 = all)",
    "eval_every": "evaluate every N steps (and at the end; 0 = end)",
    "seed": "model init, dropout, data order and masks",
}


def add_shared_flags(parser, defaults=None, helps=None):
    """Add the flags every DeepSpeed job of fastroberta takes to ``parser``, in groups after the command's own.
    ``defaults`` and ``helps`` (by dest) give a command its own default or wording for a shared flag."""
    helps = {**SHARED_HELP, **(helps or {})}
    g = parser.add_argument_group("kernels and compilation")
    g.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES, help=helps["kernels"])
    g.add_argument("--compile", action="store_true", help=helps["compile"])
    g = parser.add_argument_group("schedule")
    g.add_argument("--global-batch-size", type=int, default=None, help=helps["global_batch_size"])
    g.add_argument("--stop-at-step", type=int, default=None, help=helps["stop_at_step"])
    g.add_argument("--lr", type=float, default=None, help=helps["lr"])
    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="auto", choices=OPTIMIZERS, help=helps["optimizer"])
    g.add_argument("--weight-decay", type=float, default=0.01, help=helps["weight_decay"])
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.98), metavar=("BETA1", "BETA2"),
                   help="AdamW betas (default: 0.9 0.98, RoBERTa's)")
    g.add_argument("--adam-eps", type=float, default=1e-6, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    g = parser.add_argument_group("DeepSpeed")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: fp16 with dynamic loss scaling on CUDA; on CPU bf16 when the CPU has native "
                        "bf16 (AVX512-BF16/AMX), else fp32")
    g.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                   help="ZeRO: 1 partitions optimizer state, 2 also gradients, 3 also parameters")
    g.add_argument("--offload-optimizer", action="store_true", help="ZeRO-Offload of optimizer state to CPU")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON merged over the generated config (its values win; conflicts reported)")
    g.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # DeepSpeed's own flag: accepted
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    g = parser.add_argument_group("output")
    g.add_argument("--output", default=None, help=helps["output"])
    g.add_argument("--resume", nargs="?", const=LATEST, default=None, metavar="PATH",
                   help="continue from the latest checkpoint in --output, or from PATH (a checkpoints folder "
                        "or one global_step<N> folder)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output that holds a run; the earlier run is removed only once the "
                        "new one is ready to start (configuration checked, data prepared)")
    g.add_argument("--save-every", type=int, default=1000, help=helps["save_every"])
    g.add_argument("--keep-last", type=int, default=3, help=helps["keep_last"])
    g.add_argument("--eval-every", type=int, default=100, help=helps["eval_every"])
    g.add_argument("--log-every", type=int, default=None,
                   help="write metrics every N steps (default: 10, or steps/10 for short runs)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress display (a bar on a terminal, otherwise a plain line every 15 s)")
    g.add_argument("--seed", type=int, default=0, help=helps["seed"])
    g.add_argument("--dist-timeout", type=float, default=600, metavar="SECONDS",
                   help="with several processes: how long a collective waits for a lost one, and the bound within "
                        "which the others stop, naming the lost rank and the checkpoint to resume from (default: 600)")
    g.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop (exit 1) after this many consecutive non-finite losses, in any precision; under "
                        "fp16 also after this many steps skipped at the minimum loss scale (0 = never)")
    g.add_argument("--debug", action="store_true",
                   help="print the traceback of an error too (also: FASTROBERTA_DEBUG=1)")
    if defaults:
        parser.set_defaults(**defaults)
    return parser


_UNSET = object()


def typed_flags(parser, argv):
    """The dests of the flags the user actually typed in ``argv`` (a flag typed with its default value counts):
    argparse fills a default only where the namespace has no value yet, so a namespace pre-filled with a marker
    keeps it for every flag not given."""
    marked = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    parsed, _ = parser.parse_known_args(argv, namespace=marked)
    return {dest for dest, value in vars(parsed).items() if value is not _UNSET}


def parse_command_line(parser, argv, default_output):
    """``parser.parse_args(argv)``; with --resume, the settings not typed come from the run folder's run.json
    (``default_output(args)`` names the folder when --output is not given; training/settings.py,
    restore_run_args). Sets ``args.changed_on_resume``: lines naming typed flags that change the run."""
    args = parser.parse_args(argv)
    args.changed_on_resume = []
    if args.resume is not None:
        from fastroberta.training.settings import restore_run_args
        restore_run_args(args, typed_flags(parser, argv), args.output or default_output(args))
    return args


def check_positive(name, value, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def check_shared_flags(args):
    """ConfigError for a shared flag's value that cannot work."""
    for name in ("global_batch_size", "stop_at_step", "log_every"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("save_every", "keep_last", "eval_every", "weight_decay", "clip_grad", "max_nonfinite"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name), allow_zero=True)
    if not args.dist_timeout > 0:
        raise ConfigError(f"--dist-timeout must be positive (seconds), got {args.dist_timeout}")
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")


def say(s, msg, bar=None):
    """A line for the user on stderr, from rank 0 only; through the progress bar when one is showing."""
    if s.rank != 0:
        return
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def announce_start(s):
    """The line said before DeepSpeed starts (importing it and starting its process group take seconds, on a
    first CPU start with several processes a minute more), and the CPU preparations of training/host.py."""
    if s.on_cuda:
        fused = "; the first start JIT-builds DeepSpeed's fused Adam with nvcc once" \
            if getattr(s, "optimizer", None) == "deepspeed_adam" else ""
        say(s, f"starting DeepSpeed (CUDA, NCCL, world {s.world_size}){fused}")
        return
    from fastroberta.training import host
    say(s, f"starting DeepSpeed (CPU, gloo, world {s.world_size}): {host.cpu_start_note(s.world_size)}")
    host.skip_unused_shm_op(s.world_size)
