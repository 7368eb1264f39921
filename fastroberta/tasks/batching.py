"""Examples as model inputs: RoBERTa's single / pair format with truncation, batches padded to their longest
row (rounded up), the resumable training loader and the evaluation batches of each rank."""
import numpy as np
import torch

from fastroberta.tasks.errors import DataError


def truncate_pair(a, b, budget):
    """Longest-first: drop tokens from the end of the longer of ``a`` / ``b`` until both fit ``budget``."""
    la, lb = len(a), len(b)
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return a[:la], b[:lb]


def tokenize(split, tokenizer, max_seq_len, special):
    """Lists of ids in RoBERTa's format: ``<s> A </s>`` or ``<s> A </s></s> B </s>``, truncated to
    ``max_seq_len`` (pairs longest-first)."""
    bos, eos = special["bos"], special["eos"]
    columns = list(zip(*split.texts))
    encoded = [[e.ids for e in tokenizer.encode_batch(list(col), add_special_tokens=False)] for col in columns]
    out = []
    if len(encoded) == 1:
        for a in encoded[0]:
            out.append([bos] + a[:max_seq_len - 2] + [eos])
    else:
        for a, b in zip(*encoded):
            a, b = truncate_pair(a, b, max_seq_len - 4)
            out.append([bos] + a + [eos, eos] + b + [eos])
    return out


def padded_length(longest, multiple=1, limit=None):
    """The batch length for a longest row of ``longest`` tokens: rounded up to a multiple of ``multiple``, but
    never past ``limit`` (the run's --max-seq-len) unless the row itself is longer."""
    length = -(-longest // multiple) * multiple
    if limit is not None:
        length = min(length, max(limit, longest))
    return length


def collate(ids_list, pad_id, labels=None, multiple=1, limit=None):
    """Right-pad to the longest row of the batch (dynamic padding), rounded up to a multiple of ``multiple``
    tokens (at most ``limit``): fewer distinct shapes for torch.compile and the kernels' autotuner, and
    tensor-core friendly sizes on a GPU. Padding never changes a real token's output."""
    length = padded_length(max(len(x) for x in ids_list), multiple, limit)
    input_ids = torch.full((len(ids_list), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), length), dtype=torch.long)
    for i, x in enumerate(ids_list):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels)
    return batch


class TaskLoader:
    """Training batches: each epoch a seeded shuffle of the examples (optionally grouped by length: chunks of
    50 global batches sorted by length, then the batches shuffled), cut into global batches (the last partial
    one dropped), each split into micro-batches per rank. Its position (epoch, step in epoch) is its state."""

    def __init__(self, ids, labels, pad_id, micro_batch_size, global_batch_size, rank=0, world_size=1, seed=0,
                 group_by_length=False, pad_multiple=1, pad_limit=None, collate_fn=None):
        self.ids, self.labels, self.pad_id = ids, labels, pad_id
        self.collate = collate_fn or collate  # a task family's batches ([B, C, L] choices, token labels ...)
        self.pad_multiple, self.pad_limit = pad_multiple, pad_limit
        self.micro, self.global_batch = micro_batch_size, global_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.group_by_length = group_by_length
        self.steps_per_epoch = len(ids) // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split holds {len(ids)} examples, fewer than one global batch "
                            f"({global_batch_size}); lower --global-batch-size")
        self.epoch, self.position = 0, 0

    def order(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.ids))
        if self.group_by_length:
            lengths = np.array([len(x) for x in self.ids])
            chunk = 50 * self.global_batch
            order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                    for c in np.array_split(order, range(chunk, len(order), chunk))])
            n = self.steps_per_epoch * self.global_batch
            batches = order[:n].reshape(self.steps_per_epoch, self.global_batch)
            order = batches[rng.permutation(self.steps_per_epoch)].reshape(-1)
        return order[:self.steps_per_epoch * self.global_batch]

    def __iter__(self):
        while True:
            order = self.order(self.epoch)
            while self.position < self.steps_per_epoch:
                batch = order[self.position * self.global_batch:(self.position + 1) * self.global_batch]
                self.position += 1
                per_micro = self.micro * self.world_size
                for m in range(self.global_batch // per_micro):
                    part = batch[m * per_micro + self.rank * self.micro:m * per_micro + (self.rank + 1) * self.micro]
                    yield self.collate([self.ids[i] for i in part], self.pad_id, self.labels[part],
                                  self.pad_multiple, self.pad_limit)
            self.epoch += 1
            self.position = 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.ids)}

    def load_state_dict(self, state):
        if state["size"] != len(self.ids):
            raise DataError(f"the checkpoint was trained on {state['size']} examples, this training split has "
                            f"{len(self.ids)}")
        self.epoch, self.position = state["epoch"], state["position"]


def eval_batches(ids, batch_size, pad_id, rank=0, world_size=1, pad_multiple=1, pad_limit=None, collate_fn=None):
    """(example indices, batch) for this rank's share of an evaluation split; every rank yields the same
    number of batches (a rank short of examples repeats its last ones, flagged by index -1)."""
    collate_fn = collate_fn or collate
    per_rank = -(-len(ids) // world_size)
    mine = list(range(rank, len(ids), world_size))
    for s in range(-(-per_rank // batch_size)):
        idx = mine[s * batch_size:(s + 1) * batch_size]
        if not idx:
            yield [-1], collate_fn([ids[0]], pad_id, None, pad_multiple, pad_limit)
        else:
            yield idx, collate_fn([ids[i] for i in idx], pad_id, None, pad_multiple, pad_limit)
