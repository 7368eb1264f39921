"""fastroberta: RoBERTa masked-LM pretraining with Triton kernels under DeepSpeed."""
from fastroberta.compile import compile_model
from fastroberta.config import RobertaConfig
from fastroberta.model import (BaseModelOutput, ClassifierOutput, MaskedLMOutput, MultipleChoiceOutput,
                               QuestionAnsweringOutput, RobertaForMaskedLM, RobertaForMultipleChoice,
                               RobertaForQuestionAnswering, RobertaForSequenceClassification,
                               RobertaForTokenClassification, RobertaModel)

__version__ = "0.1.0"
__all__ = ["RobertaConfig", "RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
           "RobertaForTokenClassification", "RobertaForQuestionAnswering", "RobertaForMultipleChoice",
           "BaseModelOutput", "MaskedLMOutput", "ClassifierOutput", "QuestionAnsweringOutput", "MultipleChoiceOutput",
           "compile_model", "apply_kernels", "remove_kernels", "kernels_applied", "__version__"]

# The Hugging Face drop-in imports transformers (an optional extra): loaded on first use only.
_HF_KERNELS = ("apply_kernels", "remove_kernels", "kernels_applied")


def __getattr__(name):
    if name in _HF_KERNELS:
        from fastroberta import hf_kernels
        return getattr(hf_kernels, name)
    raise AttributeError(f"module 'fastroberta' has no attribute {name!r}")
