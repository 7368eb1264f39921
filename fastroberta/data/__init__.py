"""RoBERTa's pretraining data, one step per module:

    documents.py   a corpus (text, .jsonl, folders, gzip, hf: datasets) -> documents
    tokenizer.py   byte-level BPE: train, save, load
    encoding.py    encoding documents fast: DocumentEncoder (one core), encode_documents (worker processes)
    shards.py      documents -> uint16/uint32 token shards with a validation split (the format on disk)
    cache.py       the cache of trained tokenizers and shard folders (locked, built atomically)
    prepared.py    prepare_dataset: corpus -> PreparedDataset (memory-mapped splits and the tokenizer)
    packing.py     the token stream -> samples of seq_len positions (full / doc / varlen)
    masking.py     dynamic masking keyed by (seed, epoch, sample, position)
    loader.py      MLMDataLoader: resumable, rank-sharded micro-batches, checked on the host (check_batch)

The pipeline's entry points are re-exported here: ``fastroberta.data`` is its API.
"""
from fastroberta.config import IGNORE_INDEX
from fastroberta.data.documents import default_corpus_path
from fastroberta.data.loader import MLMDataLoader, check_batch
from fastroberta.data.masking import mask_tokens
from fastroberta.data.packing import PACKING_MODES, Packer
from fastroberta.data.prepared import PreparedDataset, prepare_dataset
from fastroberta.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

__all__ = ["default_corpus_path", "prepare_dataset", "PreparedDataset", "MLMDataLoader", "IGNORE_INDEX",
           "check_batch", "PACKING_MODES", "Packer", "mask_tokens", "load_tokenizer", "save_tokenizer",
           "train_tokenizer"]
