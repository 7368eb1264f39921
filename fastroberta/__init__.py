"""fastroberta: RoBERTa masked-LM pretraining with Triton kernels under DeepSpeed."""
from fastroberta.config import RobertaConfig
from fastroberta.model import MaskedLMOutput, RobertaForMaskedLM

__version__ = "0.1.0"
__all__ = ["RobertaConfig", "RobertaForMaskedLM", "MaskedLMOutput", "__version__"]
