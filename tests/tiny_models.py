"""What the fine-tuning tests share: the tiny model folder they start from (random MLM weights of a 2-layer,
32-wide RoBERTa and a 400-entry BPE tokenizer trained on the test's own texts, saved as ``<root>/hf``, what
``--model <root>`` reads), the JSONL splits, and the exact-resume check."""
import torch

from fastroberta.config import RobertaConfig
from fastroberta.data.tokenizer import save_tokenizer, special_ids, train_tokenizer
from fastroberta.model import RobertaForMaskedLM
from fastroberta.tasks import write_jsonl
from fastroberta.training.metrics import read_metrics


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


def write_splits(folder, rows):
    """``rows`` ({split: records}) as ``<folder>/<split>.jsonl``; returns ``folder``."""
    folder.mkdir()
    for name, split in rows.items():
        write_jsonl(split, str(folder / f"{name}.jsonl"))
    return folder


def check_exact_resume(tmp_path, argv, stop, model_class, keys):
    """One run, and one stopped at step ``stop`` and resumed (``argv(output, *flags)`` gives a fastroberta-finetune
    command line): their metrics rows agree on ``keys`` and the exported weights are bit-identical. Returns the
    stopped run's summary and the uninterrupted run's metrics records."""
    from fastroberta import finetune as ft
    ft.finetune(argv(tmp_path / "full"))
    first = ft.finetune(argv(tmp_path / "cut", "--stop-at-step", str(stop)))
    ft.finetune(argv(tmp_path / "cut", "--resume"))
    full = read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
    cut = read_metrics(str(tmp_path / "cut" / "metrics.jsonl"))
    assert [[r.get(k) for k in keys] for r in cut] == [[r.get(k) for k in keys] for r in full]
    a = model_class.from_pretrained(str(tmp_path / "full" / "hf"), kernels="torch").state_dict()
    b = model_class.from_pretrained(str(tmp_path / "cut" / "hf"), kernels="torch").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    return first, full
