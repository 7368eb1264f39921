"""What the models return: dataclasses that also behave like transformers' ``ModelOutput``.

    out.loss, out.logits               attribute access (every field, None included)
    out["loss"], "loss" in out         key access over the fields that are not None (KeyError for the others)
    out[0], out[1:], out.to_tuple()    integer indexing and slicing over those fields, in declaration order
    out.keys(), out.values(), out.items(), dict(out), len(out), iter(out) (the keys)

``loss`` is declared first, so ``out[0]`` is the loss when labels were given and the first output otherwise,
as in transformers; code written against its heads (``transformers.Trainer``'s ``outputs[0]`` and
``outputs[1:]``, ``loss, logits = model(..., return_dict=False)``) reads ours the same way. The classes stay
plain dataclasses, not dict subclasses (torch.compile traces them as it traces any dataclass) and import
nothing of transformers.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["ModelOutput", "BaseModelOutput", "MaskedLMOutput", "ClassifierOutput", "QuestionAnsweringOutput",
           "MultipleChoiceOutput"]


class ModelOutput:
    """The mapping and tuple views shared by the output dataclasses below."""

    def items(self):
        pairs = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return [(name, value) for name, value in pairs if value is not None]

    def keys(self):
        return [name for name, _ in self.items()]

    def values(self):
        return [value for _, value in self.items()]

    def to_tuple(self):
        return tuple(self.values())

    def get(self, key, default=None):
        return dict(self.items()).get(key, default)

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setitem__(self, key, value):
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.items())


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None       # [B, L, E]; zeros at padding when unpadded
    pooler_output: Optional[torch.Tensor] = None           # [B, E], only from a model built with the pooler
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # embeddings + each layer, [B, L, E] each


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None         # mean CE over labelled tokens (fp32), None without labels
    logits: Optional[torch.Tensor] = None       # [B, L, V], only when no labels are given
    num_correct: Optional[torch.Tensor] = None  # labelled tokens whose argmax is the label
    num_labels: Optional[torch.Tensor] = None   # labelled tokens in the batch (a device tensor)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class ClassifierOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None       # [B, num_labels] (sequence) or [B, L, num_labels] (token)
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class QuestionAnsweringOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None          # (start CE + end CE) / 2, None without positions
    start_logits: Optional[torch.Tensor] = None  # [B, L]; padding positions hold the dtype's lowest value
    end_logits: Optional[torch.Tensor] = None    # [B, L]
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class MultipleChoiceOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None       # [B, num_choices]
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None  # of the [B * num_choices, L] flattened batch
