"""The tiny model folder the fine-tuning tests start from: random MLM weights of a 2-layer, 32-wide RoBERTa and a
400-entry BPE tokenizer trained on the test's own texts, saved as ``<root>/hf`` (what ``--model <root>`` reads)."""
import torch

from fastroberta.config import RobertaConfig
from fastroberta.data.tokenizer import save_tokenizer, special_ids, train_tokenizer
from fastroberta.model import RobertaForMaskedLM


def tiny_model(root, texts):
    """Write the folder under ``root`` (created if missing) and return ``root``."""
    tok = train_tokenizer(texts, 400)
    sp = special_ids(tok)
    cfg = RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=66, pad_token_id=sp["pad"],
                        bos_token_id=sp["bos"], eos_token_id=sp["eos"])
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg, kernels="torch").save_pretrained(str(root / "hf"))
    save_tokenizer(tok, str(root / "hf"))
    return root
