"""Masked-LM linear + softmax cross-entropy. Placeholder: dispatches to the eager reference until the
Triton kernel lands (see the cross-entropy issue)."""
from . import reference


def mlm_cross_entropy(hidden, weight, bias, labels, ignore_index=-100, return_num_correct=False):
    return reference.mlm_cross_entropy(hidden, weight, bias, labels, ignore_index=ignore_index,
                                       return_num_correct=return_num_correct)
