"""Draw a run folder's loss curve, ``<run>/loss.png``, from its ``metrics.jsonl``: at the end of every run of
fastroberta-train and fastroberta-finetune, and afterwards for any run folder (one that ended without matplotlib,
or one still running):

    python -m fastroberta.plot runs/fastroberta-demo        # or: fastroberta-plot runs/fastroberta-demo

Without matplotlib nothing is drawn and the run's last line says how to get it.
"""
import argparse
import json
import os
import sys

from fastroberta.run_report import plot_losses

PROG = "fastroberta-plot"
INSTALL_HINT = "pip install matplotlib"


def matplotlib_missing():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def _unigram(output):
    """The held-out unigram baseline a pretraining run logged (fine-tuning runs have none)."""
    try:
        with open(os.path.join(output, "metrics.jsonl")) as f:
            for line in f:
                value = json.loads(line).get("unigram_baseline") if line.strip() else None
                if value is not None:
                    return value
    except (OSError, ValueError):
        pass
    return None


def draw_run(output, say, unigram=None):
    """Draw ``output``/loss.png and say where it is, or say why it was not drawn and how to draw it. Returns the
    path or None."""
    metrics = os.path.join(output, "metrics.jsonl")
    if not os.path.isfile(metrics):
        return None
    if matplotlib_missing():
        say(f"loss.png not drawn: matplotlib is not installed ({INSTALL_HINT}, then python -m fastroberta.plot "
            f"{output})")
        return None
    png = plot_losses(metrics, os.path.join(output, "loss.png"), unigram if unigram is not None else
                      _unigram(output))
    if png:
        say(f"loss curve: {png}")
    return png


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="draw <run>/loss.png from <run>/metrics.jsonl")
    p.add_argument("run", help="a run folder of fastroberta-train or fastroberta-finetune")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.run, "metrics.jsonl")):
        print(f"{PROG}: error: {args.run} holds no metrics.jsonl (not a run folder, or a run that logged nothing "
              "yet)", file=sys.stderr)
        return 2
    if matplotlib_missing():
        print(f"{PROG}: error: drawing needs matplotlib: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if draw_run(args.run, lambda msg: print(msg)) is None:
        print(f"{PROG}: error: {args.run}/metrics.jsonl holds no loss to draw", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
