"""The pretraining loader: masked-LM micro-batches of one split for one data-parallel rank, resumable.

Order and masks are pure functions of (seed, epoch, sample index): the epoch's sample order is a permutation
drawn from (seed, epoch); optimizer step s takes samples order[s*G : (s+1)*G] (G = global batch), and micro-batch
k of rank r the slice [(k*W + r)*m, (k*W + r + 1)*m) of those (m = micro batch, W = world size). The masks hash
(seed, epoch, sample index, position) (``masking.py``), so a sample gets the same mask whatever the world size,
micro-batch split or restart. With ``drop_last`` (default) the last incomplete global batch of an epoch is dropped
(a different remainder each epoch, as the order is reshuffled); an epoch with fewer samples than one global
batch, or ``drop_last=False``, completes its last step by wrapping around to the start of the epoch's order.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastroberta.config import IGNORE_INDEX
from fastroberta.data.masking import sample_keys, mask_tokens
from fastroberta.data.packing import Packer, checked_int
from fastroberta.data.prepared import PreparedDataset


def check_batch(batch, vocab_size):
    """Raise ValueError when a batch holds a token id or label outside the vocabulary, or cu_seqlens that do
    not count its real tokens: checked here on the host, so the model need not read them on the device."""
    ids, labels, mask = batch["input_ids"].numpy(), batch["labels"].numpy(), batch["attention_mask"].numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"a batch holds token ids outside the vocabulary [0, {vocab_size}): "
                         f"[{ids.min()}, {ids.max()}]; the shards do not match the tokenizer")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size) | (mask == 0))
    if bad.any():
        raise ValueError(f"a batch holds a label outside the vocabulary [0, {vocab_size}) or on padding")
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"].numpy()
        if cu.size < 2 or cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] != mask.sum():
            raise ValueError("a batch's cu_seqlens do not count its real tokens (0 first, non-decreasing, "
                             "ending at the number of real tokens)")



class MLMDataLoader:
    """Masked-LM micro-batches of one split for one data-parallel rank, in order; see the module docstring for
    the packing modes, the sample order and the masks.

    Yields dicts of CPU tensors: input_ids, attention_mask (1 = real token), labels (IGNORE_INDEX where not
    masked), all int64 [micro_batch_size, seq_len] padded with the pad id; for packing="varlen" also cu_seqlens
    (int32 [segments + 1], cumulative segment lengths over the batch's real tokens flattened in row order).
    Every batch is checked on the host (``check_batch``) so that the model can skip its own device-side checks
    (``validate=False``). While the consumer works on one batch, a background thread prepares the next (and pins
    it when ``pin_memory``, default: CUDA is available), so a non_blocking copy to the GPU is truly
    asynchronous; the position a checkpoint records still counts only the batches handed out.

    infinite=True cycles epochs forever. infinite=False makes one pass over the current epoch; the next pass
    repeats it (same order, same masks: evaluations stay comparable) until ``set_epoch`` moves on.
    state_dict()/load_state_dict() resume at exactly the next micro-batch; a state saved at an optimizer-step
    boundary also loads into a loader with another world size or micro-batch size but the same global batch.
    """

    def __init__(self, prepared, split="train", seq_len=128, micro_batch_size=8, global_batch_size=None, rank=0,
                 world_size=1, seed=0, packing="full", mask_prob=0.15, infinite=True, drop_last=True,
                 replace_prob=0.8, random_prob=0.1, pin_memory=None):
        if not isinstance(prepared, PreparedDataset):
            raise TypeError(f"prepared must be a PreparedDataset (from prepare_dataset), got {type(prepared)}")
        self.prepared, self.split = prepared, split
        self.seq_len = checked_int(seq_len, "seq_len", 3)
        self.micro_batch_size = checked_int(micro_batch_size, "micro_batch_size", 1)
        self.world_size = checked_int(world_size, "world_size", 1)
        self.rank = checked_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        per_step = self.micro_batch_size * self.world_size
        if global_batch_size is None:
            global_batch_size = per_step
        self.global_batch_size = checked_int(global_batch_size, "global_batch_size", 1)
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {global_batch_size} must be divisible by micro_batch_size * "
                             f"world_size = {per_step}")
        self.grad_accum_steps = self.global_batch_size // per_step
        self.seed = int(seed)
        for name, p in (("mask_prob", mask_prob), ("replace_prob", replace_prob), ("random_prob", random_prob)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        if replace_prob + random_prob > 1:
            raise ValueError(f"replace_prob + random_prob must not exceed 1, got {replace_prob + random_prob}")
        self.mask_prob, self.replace_prob, self.random_prob = float(mask_prob), float(replace_prob), float(random_prob)
        self.packing, self.infinite, self.drop_last = packing, bool(infinite), bool(drop_last)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)

        if prepared.num_documents(split) == 0:
            raise ValueError(f"the {split!r} split of {prepared.path} is empty"
                             + (" (the corpus has a single document, or val_fraction=0)" if split == "val" else ""))
        content = prepared.num_tokens(split) - prepared.num_documents(split)
        if split == "train" and content < self.seq_len - 2:
            raise ValueError(f"the train split holds {content} tokens, fewer than one sample of seq_len={seq_len} "
                             f"({seq_len - 2} tokens between <s> and </s>); use a larger corpus or a smaller seq_len")
        self.packer = Packer(prepared, split, self.seq_len, packing)
        self.num_samples = self.packer.num_samples
        ids = prepared.special_ids
        self.pad_id, self.mask_id = ids["pad"], ids["mask"]
        self.maskable = np.ones(prepared.vocab_size, bool)
        self.maskable[sorted(set(ids.values()))] = False
        self.random_ids = np.flatnonzero(self.maskable)
        if self.num_samples < self.global_batch_size or not self.drop_last:
            self.steps_per_epoch = -(-self.num_samples // self.global_batch_size)
        else:
            self.steps_per_epoch = self.num_samples // self.global_batch_size
        self.micro_batches_per_epoch = self.steps_per_epoch * self.grad_accum_steps
        self.epoch = 0
        self._position = 0      # micro-batches of the current epoch already yielded
        self._order_cache = (None, None)

    def __len__(self):
        """Micro-batches per epoch (per pass for infinite=False)."""
        return self.micro_batches_per_epoch

    def set_epoch(self, epoch):
        self.epoch = checked_int(epoch, "epoch", 0)
        self._position = 0

    def order(self, epoch):
        """The sample order of ``epoch``: a permutation drawn from (seed, epoch)."""
        if self._order_cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed & (2**63 - 1), epoch,
                                                                               0x0DE7])))
            self._order_cache = (epoch, rng.permutation(self.num_samples))
        return self._order_cache[1]

    def samples_of(self, epoch, position):
        """Sample indices of this rank's micro-batch ``position`` (step * grad_accum + k) of ``epoch``."""
        step, k = divmod(position, self.grad_accum_steps)
        m = self.micro_batch_size
        first = step * self.global_batch_size + (k * self.world_size + self.rank) * m
        return self.order(epoch)[np.arange(first, first + m) % self.num_samples]

    def collate(self, epoch, samples):
        """The batch of ``samples`` masked as in ``epoch``."""
        ids = np.full((len(samples), self.seq_len), self.pad_id, np.int64)
        lengths, segments = self.packer.fill(samples, ids)
        labels = mask_tokens(ids, sample_keys(self.seed, epoch, samples), self.maskable, self.random_ids,
                             self.mask_id, self.mask_prob, self.replace_prob, self.random_prob)
        attention = (np.arange(self.seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attention),
                 "labels": torch.from_numpy(labels)}
        if segments is not None:
            cu = np.zeros(len(segments) + 1, np.int32)
            np.cumsum(segments, out=cu[1:])
            batch["cu_seqlens"] = torch.from_numpy(cu)
        check_batch(batch, self.prepared.vocab_size)
        return batch

    def _prepared_batch(self, epoch, samples):
        batch = self.collate(epoch, samples)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def _after(self, epoch, position):
        """(epoch, position) of the micro-batch that follows, or None at the end of a finite pass."""
        if position + 1 < self.micro_batches_per_epoch:
            return epoch, position + 1
        return (epoch + 1, 0) if self.infinite else None

    def __iter__(self):
        ahead = None  # ((epoch, position), future) of the batch prepared while the last one was in use
        with ThreadPoolExecutor(1, thread_name_prefix="mlm-batches") as pool:
            try:
                while True:
                    if self._position >= self.micro_batches_per_epoch:
                        self._position = 0
                        if not self.infinite:
                            return
                        self.epoch += 1
                    epoch, position = self.epoch, self._position
                    if ahead is not None and ahead[0] == (epoch, position):
                        batch = ahead[1].result()
                    else:  # the first batch, or the position moved (set_epoch, load_state_dict)
                        batch = self._prepared_batch(epoch, self.samples_of(epoch, position))
                    self._position = position + 1
                    following = self._after(epoch, position)
                    ahead = None
                    if following is not None:
                        # Sample indices here, on the consumer's thread (the order cache is not shared).
                        ahead = (following, pool.submit(self._prepared_batch, following[0],
                                                        self.samples_of(*following)))
                    yield batch
            finally:
                if ahead is not None:
                    ahead[1].cancel()


    def _identity(self):
        return {"split": self.split, "seed": self.seed, "packing": self.packing, "seq_len": self.seq_len,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "mask_prob": self.mask_prob, "replace_prob": self.replace_prob, "random_prob": self.random_prob,
                "drop_last": self.drop_last}

    def state_dict(self):
        step, micro = divmod(self._position, self.grad_accum_steps)
        return {"epoch": self.epoch, "step": step, "micro": micro, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, **self._identity()}

    def load_state_dict(self, state):
        for key, value in self._identity().items():
            if key in state and state[key] != value:
                raise ValueError(f"cannot resume: the saved loader has {key}={state[key]!r}, this one {value!r}")
        same_split = (state.get("world_size") == self.world_size
                      and state.get("micro_batch_size") == self.micro_batch_size)
        if state["micro"] and not same_split:
            raise ValueError("cannot resume mid-step (after micro-batch "
                             f"{state['micro']} of the step) with another world_size or micro_batch_size")
        if not 0 <= state["step"] <= self.steps_per_epoch:
            raise ValueError(f"saved step {state['step']} is outside the epoch's {self.steps_per_epoch} steps")
        self.epoch = int(state["epoch"])
        self._position = int(state["step"]) * self.grad_accum_steps + int(state["micro"])
