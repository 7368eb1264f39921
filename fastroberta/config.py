"""RobertaConfig: the model's shape and regularisation, with Hugging Face's field names, plus presets."""
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

# Labels equal to this are not targets (PyTorch's and Hugging Face's convention); one definition for the
# model, the data loader and the trainer.
IGNORE_INDEX = -100
PRESETS = ("demo", "tiny", "base", "large")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def read_json(path):
    """Parse a JSON file, turning a syntax error into a ValueError that names the file."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


@dataclass
class RobertaConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    # Task heads (Hugging Face's fields): outputs of the classification heads, their loss, their dropout
    # (None: hidden_dropout_prob) and optional label names.
    num_labels: int = 2
    problem_type: Optional[str] = None
    classifier_dropout: Optional[float] = None
    id2label: Optional[dict] = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RobertaConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.hidden_act != "gelu":
            raise ValueError(f"only hidden_act='gelu' (erf GELU, as RoBERTa) is supported, got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"RobertaConfig.{name} must be in [0, 1), got {p!r}")
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels <= 0:
            raise ValueError(f"RobertaConfig.num_labels must be a positive integer, got {self.num_labels!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be None or one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"classifier_dropout must be None or in [0, 1), got {self.classifier_dropout!r}")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if sorted(self.id2label) != list(range(self.num_labels)):
                raise ValueError(f"id2label must name the labels 0..{self.num_labels - 1}, got keys "
                                 f"{sorted(self.id2label)}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError("max_position_embeddings must exceed pad_token_id + 1 (RoBERTa's position ids start "
                             "after the padding index)")

    @property
    def head_dim(self):
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def max_seq_len(self):
        """Longest input: RoBERTa's position ids start at pad_token_id + 1, so 514 positions hold 512 tokens."""
        return self.max_position_embeddings - self.pad_token_id - 1

    # Presets -------------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides):
        """A small model for CPU runs and tests: 4 layers x 256 hidden."""
        fields = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        return cls(**{**fields, **overrides})

    @classmethod
    def demo(cls, **overrides):
        """fastroberta-train's default: small enough to learn visibly in about three minutes on two CPU cores
        (2 layers x 64 hidden; its vocabulary, sequence length, batch and steps are the trainer's ``demo``
        run defaults, fastroberta.run_defaults)."""
        fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
        return cls(**{**fields, **overrides})

    @classmethod
    def base(cls, **overrides):
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides):
        fields = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        return cls(**{**fields, **overrides})

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return getattr(cls, name)(**overrides)

    def get_text_config(self, *args, **kwargs):
        """This config: transformers.Trainer asks a model's config for its text part (to align the special token
        ids with the tokenizer it is given)."""
        return self

    # Serialisation in Hugging Face's config.json format ------------------------------------------------
    def to_dict(self):
        return dataclasses.asdict(self)

    def to_hf_dict(self, architecture="RobertaForMaskedLM"):
        d = self.to_dict()
        id2label = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        d.update(model_type="roberta", architectures=[architecture], tie_word_embeddings=True,
                 id2label={str(k): v for k, v in id2label.items()},
                 label2id={v: k for k, v in id2label.items()})
        del d["num_labels"]  # transformers derives it from id2label
        return d

    @classmethod
    def from_dict(cls, d, strict=False):
        """Build from a dict such as HF's config.json; unknown keys are ignored unless ``strict``."""
        if not isinstance(d, dict):
            raise TypeError(f"a config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if isinstance(d.get("id2label"), dict):
            d = {**d, "num_labels": len(d["id2label"])}
            if all(v == f"LABEL_{k}" for k, v in d["id2label"].items()):
                d["id2label"] = None  # the default names carry nothing
        unknown = set(d) - known - {"label2id"}
        if strict and unknown:
            raise ValueError(f"unknown RobertaConfig fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        return cls.from_dict(read_json(path))

    def save_json(self, path, architecture="RobertaForMaskedLM"):
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(architecture), f, indent=2, sort_keys=True)
