"""fastroberta-train's defaults that depend on the model preset: vocabulary, sequence length, batch, steps.

The ``demo`` preset (the default when neither --model nor --config is given) is a whole first run: on two CPU
cores it trains for about three minutes on the bundled corpus and ends clearly below the unigram baseline (see
README's training section). Its settings were chosen by measurement, not taken from RoBERTa. A small MLM model first
learns only token frequencies and that a visible token at a labelled position is often itself (the 10% kept
tokens): together worth about 0.1 x unigram entropy - 0.14 nats, 0.45 on this corpus. Using the context comes
after a plateau that more *steps* end sooner than a wider model or a bigger batch: a 2 x 128 model stayed on it
for 2,000 steps, a 2 x 64 model at a higher rate with 32-token sequences left it within about 2,500 steps. 8,000 steps then take
it well past the plateau (held-out loss 4.15 against a 5.86 baseline, fill-mask answers that are words and differ
between sentences; 5,000 steps ended at 5.0-5.1 with '\n' as every top-1 answer in bf16). The other presets keep the
trainer's general defaults (RoBERTa-like: a 8,192-entry vocabulary for a corpus-trained tokenizer, 128 tokens,
16 sequences per process, a 200-step smoke run unless --steps says otherwise).
"""

GENERAL = {"vocab_size": 8192, "seq_len": 128, "micro_batch_size": 16, "steps": 200}
BY_PRESET = {
    "demo": {"vocab_size": 1024, "seq_len": 32, "micro_batch_size": 32, "steps": 8000},
}
DEFAULT_PRESET = "demo"


def defaults_for(preset):
    """The run defaults of ``preset`` (None: a --config model, which gets the general ones)."""
    return {**GENERAL, **BY_PRESET.get(preset, {})}


def apply_run_defaults(args):
    """Fill the flags the user left unset (None) from the preset's defaults; returns the preset name used."""
    preset = args.model if args.model is not None else (DEFAULT_PRESET if args.config is None else None)
    for name, value in defaults_for(preset).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return preset


def help_for(name):
    """'demo: X; otherwise Y' for a flag's help text."""
    special = ", ".join(f"{preset} {values[name]}" for preset, values in BY_PRESET.items() if name in values)
    return f"default: {special}; otherwise {GENERAL[name]}" if special else f"default: {GENERAL[name]}"
