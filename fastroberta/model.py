"""The RoBERTa masked-LM model: embeddings, post-LN encoder layers and the MLM head, in one file.

Numerically the same model as Hugging Face's ``RobertaForMaskedLM`` (``fastroberta.hf`` maps the weights);
its hot ops (fused residual/dropout LayerNorm, key-padding-mask attention, masked-LM cross-entropy) come from
either ``fastroberta.kernels`` (Triton) or ``fastroberta.kernels.reference`` (eager PyTorch), chosen by one
switch: ``kernels="auto" | "triton" | "torch"``.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastroberta import kernels as triton_ops
from fastroberta.config import RobertaConfig
from fastroberta.kernels import reference as torch_ops
from fastroberta.kernels._checks import triton_usable

KERNEL_CHOICES = ("auto", "triton", "torch")
IGNORE_INDEX = -100


def _check_kernels(value, source):
    if value not in KERNEL_CHOICES:
        raise ValueError(f"{source} must be one of {KERNEL_CHOICES}, got {value!r}")
    return value


def resolve_kernels(kernels, device):
    """The op module for ``kernels`` on ``device``: "auto" is Triton on CUDA and the reference elsewhere,
    unless the FASTROBERTA_KERNELS environment variable names a choice."""
    if kernels == "auto":
        env = os.environ.get("FASTROBERTA_KERNELS", "").strip()
        kernels = _check_kernels(env, "FASTROBERTA_KERNELS") if env else "auto"
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    if kernels == "triton":
        if not triton_usable(torch.empty(0, device=device)):
            raise ValueError(f"kernels='triton' needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
                             "before importing fastroberta, or use kernels='torch'")
        return triton_ops
    return torch_ops


@dataclass
class MaskedLMOutput:
    loss: Optional[torch.Tensor] = None         # mean CE over labelled tokens (fp32), None without labels
    logits: Optional[torch.Tensor] = None       # [B, L, V], only when no labels are given
    num_correct: Optional[torch.Tensor] = None  # labelled tokens whose argmax is the label
    num_labels: Optional[torch.Tensor] = None   # labelled tokens in the batch


class LayerNorm(nn.Module):
    """LayerNorm(dropout(x) + residual) with nn.LayerNorm's parameters; the op comes from the kernel switch."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x, ops, residual=None, dropout_p=0.0):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, dropout_p=dropout_p)


class Embeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=self.padding_idx)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=self.padding_idx)
        # RoBERTa has a single token type; its embedding is a learned constant added to every token.
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids, token_type_ids, ops, position_ids=None):
        if position_ids is None:
            # Position ids count real tokens from padding_idx + 1; pads sit at padding_idx (HF's convention).
            not_pad = input_ids.ne(self.padding_idx).long()
            position_ids = torch.cumsum(not_pad, dim=1) * not_pad + self.padding_idx
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.layer_norm(x, ops, dropout_p=self.dropout_p if self.training else 0.0)


def unpad_index(attention_mask):
    """(indices of the real tokens in the flattened [B * L] batch, int32 cu_seqlens, longest row) for the
    packed attention path. Any 0/1 mask works: a row's real tokens attend to each other, as with the mask."""
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    indices = attention_mask.reshape(-1).nonzero().squeeze(-1)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max())


def packed_positions(attention_mask, cu_seqlens, padding_idx):
    """Position ids [B, L] for rows that pack several documents: each segment of ``cu_seqlens`` (cumulative
    lengths over the real tokens, flattened in row order) counts from padding_idx + 1 again; pads sit at
    padding_idx."""
    total = int(cu_seqlens[-1])
    token = torch.arange(total, device=attention_mask.device)
    segment = torch.searchsorted(cu_seqlens[1:].long(), token, right=True)
    within = token - cu_seqlens.long()[segment]
    flat = torch.full((attention_mask.numel(),), padding_idx, dtype=torch.long, device=attention_mask.device)
    flat[attention_mask.reshape(-1).nonzero().squeeze(-1)] = within + padding_idx + 1
    return flat.view_as(attention_mask)


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: LN(x + attn(x)), then LN(x + FFN(x)); one fused QKV projection."""

    def __init__(self, config):
        super().__init__()
        e = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(e, 3 * e)
        self.attn_out = nn.Linear(e, e)
        self.attn_norm = LayerNorm(e, config.layer_norm_eps)
        self.ffn_in = nn.Linear(e, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, e)
        self.ffn_norm = LayerNorm(e, config.layer_norm_eps)
        self.hidden_dropout_p = config.hidden_dropout_prob
        self.attn_dropout_p = config.attention_probs_dropout_prob

    def forward(self, x, attention_mask, ops, unpad=None):
        """``unpad`` (from ``unpad_index``) runs attention on the real tokens only, packed (varlen)."""
        b, l, e = x.shape
        heads, head_dim = self.num_heads, e // self.num_heads
        p_hidden = self.hidden_dropout_p if self.training else 0.0
        p_attn = self.attn_dropout_p if self.training else 0.0
        qkv = self.qkv(x)
        if unpad is None:
            # The fused [B, L, 3, H, D] projection as is: backward writes dQ, dK, dV into one gradient.
            ctx = ops.attention_packed(qkv.view(b, l, 3, heads, head_dim), attention_mask, dropout_p=p_attn)
            ctx = ctx.transpose(1, 2).reshape(b, l, e)
        else:
            indices, cu_seqlens, max_seqlen = unpad
            q, k, v = qkv.view(b * l, 3, heads, head_dim).index_select(0, indices).unbind(1)
            packed = ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p_attn)
            # Padded positions get the zeros that the padded form gives them.
            ctx = packed.new_zeros(b * l, heads, head_dim).index_copy(0, indices, packed).view(b, l, e)
        x = self.attn_norm(self.attn_out(ctx), ops, residual=x, dropout_p=p_hidden)
        h = self.ffn_out(F.gelu(self.ffn_in(x)))
        return self.ffn_norm(h, ops, residual=x, dropout_p=p_hidden)


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus the head's own bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def transform(self, x, ops):
        return self.layer_norm(F.gelu(self.dense(x)), ops)


class RobertaForMaskedLM(nn.Module):
    def __init__(self, config: RobertaConfig, kernels="auto"):
        super().__init__()
        if not isinstance(config, RobertaConfig):
            raise TypeError(f"config must be a RobertaConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.kernels = _check_kernels(kernels, "kernels")
        self.gradient_checkpointing = False
        # Attention on the packed real tokens (varlen) instead of the padded batch. Off until a GPU
        # measurement shows it faster: the padded kernel already skips trailing padding.
        self.unpad_attention = False
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.lm_head = MLMHead(config)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    @property
    def decoder_weight(self):
        return self.embeddings.word_embeddings.weight

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    # Checkpoint I/O lives in fastroberta.hf; these are the HF-style entry points.
    @classmethod
    def from_pretrained(cls, path, kernels="auto"):
        from fastroberta.hf import load_pretrained
        return load_pretrained(path, kernels=kernels)

    def save_pretrained(self, path):
        from fastroberta.hf import save_pretrained
        save_pretrained(self, path)

    def _validate(self, input_ids, attention_mask, labels, token_type_ids):
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_seq_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the position table: at most "
                             f"{cfg.max_seq_len} tokens (max_position_embeddings={cfg.max_position_embeddings})")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        for name, t in (("attention_mask", attention_mask), ("labels", labels), ("token_type_ids", token_type_ids)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
            if t.device != input_ids.device:
                raise ValueError(f"{name} is on {t.device} but input_ids is on {input_ids.device}")
        if labels is not None:
            if labels.dtype.is_floating_point:
                raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
            bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= cfg.vocab_size))
            if bad.any():
                raise ValueError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {cfg.vocab_size}) "
                                 f"and is not the ignore index {IGNORE_INDEX}")
        if token_type_ids is not None and token_type_ids.numel():
            if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= cfg.type_vocab_size:
                raise ValueError(f"token_type_ids must lie in [0, {cfg.type_vocab_size})")

    @staticmethod
    def _validate_cu_seqlens(cu_seqlens, attention_mask, input_ids):
        if attention_mask is None:
            raise ValueError("cu_seqlens needs the attention_mask that marks the real tokens it counts")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError("cu_seqlens must be a 1-D int32 tensor of cumulative segment lengths")
        if cu_seqlens.device != input_ids.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids is on {input_ids.device}")
        bounds = cu_seqlens.tolist()
        if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError("cu_seqlens must start at 0 and never decrease")
        real = int(attention_mask.sum())
        if bounds[-1] != real:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} but attention_mask has {real} real tokens")

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, cu_seqlens=None):
        """MLM forward. With ``labels`` (-100 = not a target) returns the mean CE over labelled tokens and runs
        the head on those rows only (no [B, L, V] tensor); without, returns ``logits`` [B, L, V].
        ``attention_mask`` [B, L] is 1/True for real tokens; None treats every token as real, as HF does.
        ``cu_seqlens`` (int32 [segments + 1], cumulative lengths over the real tokens flattened in row order, as
        the data loader's packing="varlen" gives) splits rows into documents that do not attend to each other
        and whose position ids each start afresh; attention then runs packed (varlen)."""
        self._validate(input_ids, attention_mask, labels, token_type_ids)
        ops = resolve_kernels(self.kernels, input_ids.device)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        position_ids = unpad = None
        if cu_seqlens is not None:
            self._validate_cu_seqlens(cu_seqlens, attention_mask, input_ids)
            position_ids = packed_positions(attention_mask, cu_seqlens, self.config.pad_token_id)
            indices = attention_mask.reshape(-1).nonzero().squeeze(-1)
            unpad = (indices, cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0)
        elif self.unpad_attention and attention_mask is not None:
            unpad = unpad_index(attention_mask)
        x = self.embeddings(input_ids, token_type_ids, ops, position_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attention_mask, ops, unpad, use_reentrant=False)
            else:
                x = layer(x, attention_mask, ops, unpad)

        e = self.config.hidden_size
        if labels is None:
            h = self.lm_head.transform(x, ops)
            return MaskedLMOutput(logits=F.linear(h, self.decoder_weight, self.lm_head.bias))
        labels = labels.reshape(-1)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
        h = self.lm_head.transform(x.reshape(-1, e).index_select(0, rows), ops)
        target = labels.index_select(0, rows)
        loss, num_correct = ops.mlm_cross_entropy(h, self.decoder_weight, self.lm_head.bias, target,
                                                  ignore_index=IGNORE_INDEX, return_num_correct=True)
        return MaskedLMOutput(loss=loss, num_correct=num_correct,
                              num_labels=torch.tensor(rows.numel(), device=input_ids.device))

    def flops_per_token(self, seq_len, mask_prob=0.15):
        """Training FLOPs per real token (forward + backward = 3x forward), counting matmuls only: 6 x the
        encoder's matmul parameters, 12 x layers x hidden x seq_len for the attention scores and weighted sum,
        and the MLM head (dense + tied decoder, 6 x (hidden^2 + vocab x hidden)) on the ``mask_prob`` share of
        tokens it runs on."""
        c = self.config
        per_layer = 4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size
        head = 6 * mask_prob * (c.hidden_size ** 2 + c.vocab_size * c.hidden_size)
        return 6 * c.num_hidden_layers * per_layer + 12 * c.num_hidden_layers * c.hidden_size * seq_len + head
