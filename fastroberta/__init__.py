"""fastroberta: RoBERTa masked-LM pretraining with Triton kernels under DeepSpeed."""
from fastroberta.config import RobertaConfig
from fastroberta.model import (BaseModelOutput, ClassifierOutput, MaskedLMOutput, RobertaForMaskedLM,
                               RobertaForSequenceClassification, RobertaForTokenClassification, RobertaModel)

__version__ = "0.1.0"
__all__ = ["RobertaConfig", "RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
           "RobertaForTokenClassification", "BaseModelOutput", "MaskedLMOutput", "ClassifierOutput",
           "__version__"]
