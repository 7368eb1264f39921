"""RoBERTa: the encoder (``RobertaModel``: embeddings + post-LN layers) and its heads, in one file.

    RobertaModel                       last hidden state [B, L, E] (and every layer's, on request)
    RobertaForMaskedLM                 encoder + MLM head (dense -> GELU -> LayerNorm -> tied decoder)
    RobertaForSequenceClassification   encoder + HF's classification head on <s>
    RobertaForTokenClassification      encoder + dropout + linear per token
    RobertaForQuestionAnswering        encoder + linear per token -> start and end logits
    RobertaForMultipleChoice           encoder on [B * C, L] + pooler -> dropout -> linear -> logits [B, C]

Numerically Hugging Face's classes of the same names (``fastroberta.hf`` maps the weights). The fused ops
(dropout + residual + LayerNorm, key-padding-mask and varlen attention, masked-LM cross-entropy) come from
``fastroberta.kernels`` (Triton) or its eager reference, chosen when a model is built: ``kernels="auto" |
"triton" | "torch"`` (``fastroberta.kernels.backend``); each module that calls them resolves the choice once,
when its forward first sees a device.

Two layouts run through the same layers. Padded: [B, L, E] with a key-padding mask. Unpadded (``cu_seqlens``,
or ``unpad=True`` on a padded batch): the real tokens are gathered once at entry into [T, E], every layer runs
on them (linear layers and LayerNorm included) with varlen attention, and the result is scattered back once
at the end — or, for the MLM loss, the labelled rows are taken from [T, E] directly.

Host syncs: ``validate=True`` (the default) checks ids, labels and cu_seqlens on the host so that a bad value
is a clear error and never a device-side assert. ``validate=False`` (the trainer, whose data loader checks
each batch on the host) skips those reads; then a padded MLM forward + backward syncs once (the labelled-row
count) and an unpadded one twice (the real-token count, then the labelled-row count), whatever the depth.

torch.compile: every model here compiles with ``fullgraph=True`` (``fastroberta.compile_model`` sets the two
Dynamo options it needs: the labelled-row and real-token selections have data-dependent sizes). While Dynamo
traces, ``validate=True`` checks shapes, dtypes and devices only: the value checks read tensors on the host and
would break the graph, so a compiled model behaves as ``validate=False`` (check the data before, as the
trainer's loader does). A varlen batch should then come with ``max_seqlen``.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastroberta.config import IGNORE_INDEX, RobertaConfig
from fastroberta.fused_linear import feed_forward_and_input, linear_and_input
from fastroberta.kernels._checks import autocast_enabled, compiling, new_dropout_seeds
from fastroberta.kernels.backend import KERNEL_CHOICES, KernelSwitch
from fastroberta.kernels.layer_norm import FusedLayerNorm
from fastroberta.outputs import (BaseModelOutput, ClassifierOutput, MaskedLMOutput, ModelOutput,
                                 MultipleChoiceOutput, QuestionAnsweringOutput)

__all__ = ["RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification",
           "RobertaForTokenClassification", "RobertaForQuestionAnswering", "RobertaForMultipleChoice",
           "EncoderLayer", "Embeddings", "MLMHead", "Pooler", "FusedLayerNorm", "ModelOutput", "BaseModelOutput",
           "MaskedLMOutput", "ClassifierOutput", "QuestionAnsweringOutput", "MultipleChoiceOutput",
           "KERNEL_CHOICES", "IGNORE_INDEX"]


# ---------------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------------
class Embeddings(nn.Module):
    """word + position + token type embeddings, then LayerNorm and dropout; ids of any shape ([B, L] or [T])."""

    def __init__(self, config, kernels="auto"):
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=self.padding_idx)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=self.padding_idx)
        # RoBERTa has a single token type; its embedding is a learned constant added to every token.
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = FusedLayerNorm(config.hidden_size, eps=config.layer_norm_eps, kernels=kernels)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, input_ids, position_ids, token_type_ids=None):
        # The LayerNorm's residual input adds the word embeddings to the rest: one [tokens, hidden] sum fewer.
        # Dropout comes after the LayerNorm, as in transformers (the fused one would drop before it).
        rest = self.position_embeddings(position_ids)
        if token_type_ids is None:
            rest = rest + self.token_type_embeddings.weight[0]
        else:
            rest = rest + self.token_type_embeddings(token_type_ids)
        x = self.layer_norm(self.word_embeddings(input_ids), residual=rest)
        return F.dropout(x, self.dropout_p, self.training)


class EncoderLayer(KernelSwitch, nn.Module):
    """Post-LN transformer layer: LN(x + attn(x)), then LN(x + FFN(x)); one fused QKV projection.

    ``forward(x, attention_mask=None)`` on a padded [B, L, E] batch (mask [B, L], 1/True = real token), or
    ``forward(x, cu_seqlens=, max_seqlen=)`` on packed [T, E] tokens (sequences never attend to each other).
    ``validate=False`` trusts cu_seqlens and max_seqlen (checked once by the caller, not per layer).
    ``dropout_seeds``: int64 [SEEDS_PER_LAYER] (a slice of a pool the encoder draws once per forward) for the
    layer's dropout kernels (attention, then the two LayerNorms), instead of one draw per call; None draws per
    call."""

    SEEDS_PER_LAYER = 3

    def __init__(self, config, kernels="auto"):
        super().__init__()
        e = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(e, 3 * e)
        self.attn_out = nn.Linear(e, e)
        self.attn_norm = FusedLayerNorm(e, eps=config.layer_norm_eps, kernels=kernels)
        self.ffn_in = nn.Linear(e, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, e)
        self.ffn_norm = FusedLayerNorm(e, eps=config.layer_norm_eps, kernels=kernels)
        self.hidden_dropout_p = config.hidden_dropout_prob
        self.attn_dropout_p = config.attention_probs_dropout_prob
        self._init_kernels(kernels)

    def forward(self, x, attention_mask=None, cu_seqlens=None, max_seqlen=None, validate=True, dropout_seeds=None):
        ops = self.ops(x.device)
        seed_attn, seed_attn_norm, seed_ffn_norm = (None,) * 3 if dropout_seeds is None else \
            (dropout_seeds[0:1], dropout_seeds[1:2], dropout_seeds[2:3])
        heads, head_dim = self.num_heads, self.head_dim
        p_hidden = self.hidden_dropout_p if self.training else 0.0
        p_attn = self.attn_dropout_p if self.training else 0.0
        # x's second consumer, the attention LayerNorm's residual, takes it from linear_and_input: its gradient
        # is then added inside the QKV dgrad GEMM (the same for the FFN's first linear below).
        qkv, x = linear_and_input(x, self.qkv.weight, self.qkv.bias)
        if cu_seqlens is None:
            b, l, e = x.shape
            # The fused [B, L, 3, H, D] projection as is: backward writes dQ, dK, dV into one gradient.
            ctx = ops.attention_packed(qkv.view(b, l, 3, heads, head_dim), attention_mask, dropout_p=p_attn,
                                       dropout_seed=seed_attn)
            ctx = ctx.transpose(1, 2).reshape(b, l, e)
        else:
            t, e = x.shape
            q, k, v = qkv.view(t, 3, heads, head_dim).unbind(1)
            ctx = ops.attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p_attn,
                                       validate=validate, dropout_seed=seed_attn).reshape(t, e)
        # attn_out's and ffn_out's biases are added inside the LayerNorm that follows (input_bias, before its
        # dropout, as dropout(dense(h)) does): the LayerNorm's backward kernel sums their gradients, so no pass
        # over a [tokens, hidden] gradient computes them.
        x = self.attn_norm(F.linear(ctx, self.attn_out.weight), residual=x, dropout_p=p_hidden,
                           input_bias=self.attn_out.bias, dropout_seed=seed_attn_norm)
        # The FFN as one op: on the Triton path GELU and its derivative run in the GEMMs' epilogues.
        h, x = feed_forward_and_input(x, self.ffn_in.weight, self.ffn_in.bias, self.ffn_out.weight, None,
                                      ops.linear_gelu, ops.dgrad_gelu_bias_grad)
        return self.ffn_norm(h, residual=x, dropout_p=p_hidden, input_bias=self.ffn_out.bias,
                             dropout_seed=seed_ffn_norm)


class MLMHead(KernelSwitch, nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (the tied word embeddings, passed in) + the head's own bias.

    ``forward(hidden, decoder_weight)`` gives logits; ``loss(hidden, decoder_weight, labels)`` the mean CE
    over rows whose label is not IGNORE_INDEX, running the head on those rows only."""

    def __init__(self, config, kernels="auto"):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = FusedLayerNorm(config.hidden_size, eps=config.layer_norm_eps, kernels=kernels)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self._init_kernels(kernels)

    def transform(self, x):
        return self.layer_norm(F.gelu(self.dense(x)))

    def forward(self, hidden, decoder_weight):
        return F.linear(self.transform(hidden), decoder_weight, self.bias)

    def loss(self, hidden, decoder_weight, labels, validate=True):
        """(loss, num_correct, num_labels) for hidden [N, E] and labels [N]. Selecting the labelled rows is
        one device-to-host sync; ``validate`` also checks the label range (another)."""
        labelled = labels != IGNORE_INDEX
        if validate and not compiling():
            _check_labels(labels, decoder_weight.shape[0])
        rows = labelled.nonzero().squeeze(-1)
        h = self.transform(hidden.index_select(0, rows))
        bias = self.bias
        if autocast_enabled(h.device):  # the decoder in the autocast dtype, as F.linear would run
            dtype = torch.get_autocast_dtype(h.device.type)
            h, decoder_weight, bias = h.to(dtype), decoder_weight.to(dtype), bias.to(dtype)
        loss, num_correct = self.ops(hidden.device).mlm_cross_entropy(
            h, decoder_weight, bias, labels.index_select(0, rows), ignore_index=IGNORE_INDEX,
            return_num_correct=True, validate=False, labelled_rows_only=True)
        return loss, num_correct, labelled.sum()


class ClassificationHead(nn.Module):
    """Hugging Face's RobertaClassificationHead: dropout -> dense -> tanh -> dropout -> out_proj on <s>."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None
                                  else config.hidden_dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, features):
        x = self.dropout(features[:, 0, :])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class Pooler(nn.Module):
    """Hugging Face's RobertaPooler: dense -> tanh on the first token (<s>)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


def _check_labels(labels, vocab_size):
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise ValueError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {vocab_size}) "
                         f"and is not the ignore index {IGNORE_INDEX}")


def _returned(output, return_dict):
    """The output dataclass, or (``return_dict=False``, transformers' habit) its tuple of the fields set."""
    return output if return_dict is None or return_dict else output.to_tuple()


def _check_same_shape(input_ids, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device} but input_ids is on {input_ids.device}")


# ---------------------------------------------------------------------------------------------------------
# Shared by every model: construction, initialisation, checkpoint I/O
# ---------------------------------------------------------------------------------------------------------
class _PreTrained(KernelSwitch, nn.Module):
    def _setup(self, config, kernels):
        if not isinstance(config, RobertaConfig):
            raise TypeError(f"config must be a RobertaConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self._init_kernels(kernels)

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
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # What transformers.Trainer and accelerate read from a model besides forward: the input it counts tokens
    # and FLOPs by, the checkpointing switches, and the keys a saved state may leave out (none: the decoder
    # shares the word embeddings' tensor, so every key is saved).
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_save = None

    def num_parameters(self, only_trainable=False, exclude_embeddings=False):
        """Parameter count (transformers' signature); ``exclude_embeddings`` leaves out the embedding tables."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1,
                                        offload=False):
        """Recompute each encoder layer in backward (transformers' switch, which Trainer calls for
        ``gradient_checkpointing=True``). Only non-reentrant checkpointing of every layer, kept on the device."""
        extra = dict(activation_checkpointing_kwargs or {})
        if extra.pop("use_reentrant", False) or extra or every_n_layers != 1 or offload:
            raise ValueError("fastroberta checkpoints every encoder layer, non-reentrant, on the device: "
                             f"got kwargs={activation_checkpointing_kwargs!r}, every_n_layers={every_n_layers!r}, "
                             f"offload={offload!r}")
        self.gradient_checkpointing = True

    def activation_checkpointing_disable(self):
        self.gradient_checkpointing = False

    @property
    def is_activation_checkpointing(self):
        return self.gradient_checkpointing

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """transformers' older name for ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self):
        return self.gradient_checkpointing

    # Checkpoint I/O lives in fastroberta.hf; these are the HF-style entry points.
    @classmethod
    def from_pretrained(cls, path, kernels="auto", output_loading_info=False, **config_overrides):
        """Load a Hugging Face RoBERTa folder (config.json + model.safetensors or pytorch_model.bin). Weights
        the checkpoint lacks for this head are initialised and, like keys it holds that this model does not
        use, reported in a warning. ``config_overrides`` (e.g. num_labels=3) replace config.json fields;
        ``add_pooling_layer=True`` (RobertaModel only) builds and reads the pooler."""
        from fastroberta.hf import load_pretrained
        return load_pretrained(cls, path, kernels=kernels, output_loading_info=output_loading_info,
                               **config_overrides)

    def save_pretrained(self, path):
        """Write a folder that transformers' class of the same name loads with from_pretrained."""
        from fastroberta.hf import save_pretrained
        save_pretrained(self, path)


class _WithEncoder(_PreTrained):
    """A head on ``self.roberta``; switches that belong to the encoder are forwarded to it."""

    @property
    def gradient_checkpointing(self):
        return self.roberta.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value):
        self.roberta.gradient_checkpointing = bool(value)

    @property
    def unpad(self):
        return self.roberta.unpad

    @unpad.setter
    def unpad(self, value):
        self.roberta.unpad = bool(value)

    def _padded_output(self, enc, output_hidden_states):
        states = enc.all_hidden_states() if output_hidden_states else None
        return enc.padded(enc.hidden), states


# ---------------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------------
class _Encoded:
    """The encoder's result before it is laid out for a head: ``hidden`` [B, L, E] padded, or [T, E] with
    ``indices`` (the real tokens' places in the flattened [B * L] batch)."""

    def __init__(self, hidden, states, indices, shape):
        self.hidden, self.states, self.indices, self.shape = hidden, states, indices, shape

    def padded(self, h):
        if self.indices is None:
            return h
        b, l = self.shape
        return h.new_zeros(b * l, h.shape[-1]).index_copy(0, self.indices, h).view(b, l, h.shape[-1])

    def flat(self, per_token):
        """``per_token`` [B, L] as the rows of ``hidden`` (flattened, gathered at the real tokens if unpadded)."""
        flat = per_token.reshape(-1)
        return flat if self.indices is None else flat.index_select(0, self.indices)

    def all_hidden_states(self):
        return tuple(self.padded(h) for h in self.states)


class RobertaModel(_PreTrained):
    """Embeddings + post-LN encoder layers; returns the last hidden state and, with ``add_pooling_layer=True``,
    Hugging Face's pooler output (dense -> tanh on each row's first token, weights ``pooler.dense.*``).

    The pooler is off by default, unlike transformers' RobertaModel: a model built here keeps the state dict it
    always had, and the heads that do not use the pooler (all but RobertaForMultipleChoice) build it without one,
    as transformers does. ``RobertaModel.from_pretrained(path, add_pooling_layer=True)`` reads a checkpoint's
    pooler; without it the pooler weights are skipped silently.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, cu_seqlens=None, max_seqlen=None,
    unpad=None, output_hidden_states=False, validate=True)``; see ``encode`` for the arguments."""

    def __init__(self, config: RobertaConfig, kernels="auto", init_weights=True, add_pooling_layer=False):
        super().__init__()
        self._setup(config, kernels)
        self.gradient_checkpointing = False
        # Run padded batches unpadded (gather once, varlen attention, scatter once). Off by default until a
        # GPU measurement shows it faster: the padded attention kernel already skips trailing padding.
        self.unpad = False
        self.embeddings = Embeddings(config, kernels)
        self.layers = nn.ModuleList(EncoderLayer(config, kernels) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(config) if add_pooling_layer else None
        if init_weights:  # a head model initialises the whole model at once, after building its head
            self.apply(self._init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, cu_seqlens=None, max_seqlen=None,
                unpad=None, output_hidden_states=False, validate=True, return_dict=None):
        enc = self.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, unpad,
                          output_hidden_states, validate)
        states = enc.all_hidden_states() if output_hidden_states else None
        hidden = enc.padded(enc.hidden)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        out = BaseModelOutput(last_hidden_state=hidden, pooler_output=pooled, hidden_states=states)
        return _returned(out, return_dict)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, cu_seqlens=None, max_seqlen=None,
               unpad=None, output_hidden_states=False, validate=True, labels=None):
        """Run the encoder; returns an ``_Encoded`` (the heads take rows from it without re-padding).

        ``attention_mask`` [B, L] is 1/True for real tokens; None treats every token as real, as HF does.
        ``cu_seqlens`` (int32 [segments + 1], cumulative lengths over the real tokens flattened in row order,
        as the data loader's packing="varlen" gives) splits rows into documents that do not attend to each
        other and whose position ids each start afresh; ``max_seqlen`` (int) bounds the longest segment and is
        trusted (computed, with one sync, when not given). ``unpad`` (default ``self.unpad``) runs a padded
        batch unpadded. ``labels`` are only checked here (shape, and range when ``validate``)."""
        cfg = self.config
        validate = validate and not compiling()  # host reads would break a torch.compile graph
        self._check_inputs(input_ids, attention_mask, token_type_ids, labels, validate)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        if unpad is None:
            unpad = self.unpad
        b, l = input_ids.shape
        indices = None
        if cu_seqlens is not None:
            max_seqlen = self._check_cu_seqlens(cu_seqlens, max_seqlen, attention_mask, input_ids, validate)
            indices = attention_mask.reshape(-1).nonzero().squeeze(-1)  # the real-token count: one sync
            # Position ids restart in each segment: a token's place in its segment, counted from pad + 1.
            token = torch.arange(indices.numel(), device=input_ids.device, dtype=torch.int32)
            segment = torch.searchsorted(cu_seqlens[1:], token, right=True)
            position_ids = (token - cu_seqlens[segment]).long() + cfg.pad_token_id + 1
        else:
            # Position ids count real tokens from padding_idx + 1; pads sit at padding_idx (HF's convention).
            not_pad = input_ids.ne(cfg.pad_token_id).long()
            position_ids = torch.cumsum(not_pad, dim=1) * not_pad + cfg.pad_token_id
            if unpad and attention_mask is not None:
                indices = attention_mask.reshape(-1).nonzero().squeeze(-1)
                lengths = attention_mask.sum(dim=1, dtype=torch.int32)
                cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
                max_seqlen = l  # a bound on every row's real tokens that costs no sync
                position_ids = position_ids.reshape(-1).index_select(0, indices)
        if indices is not None:
            input_ids = input_ids.reshape(-1).index_select(0, indices)
            if token_type_ids is not None:
                token_type_ids = token_type_ids.reshape(-1).index_select(0, indices)
            attention_mask = None
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        states = [x] if output_hidden_states else None
        ops = self.ops(x.device)
        if attention_mask is not None:  # what the kernels read of it, worked out once for all the layers
            attention_mask = ops.prepare_mask(attention_mask)
        # The dropout kernels' seeds, all drawn in one launch (the eager path draws its own masks).
        dropping = self.training and max(cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) > 0.0
        layer_seeds = [None] * len(self.layers)
        if dropping and ops.name == "triton":
            n, k = len(self.layers), EncoderLayer.SEEDS_PER_LAYER
            layer_seeds = new_dropout_seeds(n * k, x.device).view(n, k).unbind(0)  # views: no launch each
        for layer, seeds in zip(self.layers, layer_seeds):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attention_mask, cu_seqlens, max_seqlen, False, seeds, use_reentrant=False)
            else:
                x = layer(x, attention_mask, cu_seqlens, max_seqlen, validate=False, dropout_seeds=seeds)
            if output_hidden_states:
                states.append(x)
        return _Encoded(x, states, indices, (b, l))

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, labels, validate):
        """Shape, dtype and device checks always (no sync); value checks (ids, labels) when ``validate``."""
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
        _check_same_shape(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
            if labels.device != input_ids.device:
                raise ValueError(f"labels is on {labels.device} but input_ids is on {input_ids.device}")
        if not validate:
            return
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        if token_type_ids is not None and token_type_ids.numel():
            if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= cfg.type_vocab_size:
                raise ValueError(f"token_type_ids must lie in [0, {cfg.type_vocab_size})")

    @staticmethod
    def _check_cu_seqlens(cu_seqlens, max_seqlen, attention_mask, input_ids, validate):
        """max_seqlen as an int; with ``validate``, cu_seqlens read once on the host and checked."""
        if attention_mask is None:
            raise ValueError("cu_seqlens needs the attention_mask that marks the real tokens it counts")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
            raise TypeError("cu_seqlens must be a 1-D int32 tensor of cumulative segment lengths")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least two entries (0 and the token count)")
        if cu_seqlens.device != input_ids.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but input_ids is on {input_ids.device}")
        if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
            raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
        if not validate:
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            return max_seqlen
        bounds = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(bounds, bounds[1:])]
        if bounds[0] != 0 or min(lengths) < 0:
            raise ValueError("cu_seqlens must start at 0 and never decrease")
        real = int(attention_mask.sum())
        if bounds[-1] != real:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]} but attention_mask has {real} real tokens")
        if max_seqlen is None:
            max_seqlen = max(lengths)
        elif max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest segment ({max(lengths)})")
        return max_seqlen

    def flops_per_token(self, seq_len):
        """Training FLOPs per real token of the encoder (forward + backward = 3x forward), matmuls only."""
        c = self.config
        per_layer = 4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size
        return 6 * c.num_hidden_layers * per_layer + 12 * c.num_hidden_layers * c.hidden_size * seq_len


# ---------------------------------------------------------------------------------------------------------
# The heads
# ---------------------------------------------------------------------------------------------------------
class RobertaForMaskedLM(_WithEncoder):
    def __init__(self, config: RobertaConfig, kernels="auto"):
        super().__init__()
        self._setup(config, kernels)
        self.roberta = RobertaModel(config, kernels, init_weights=False)
        self.lm_head = MLMHead(config, kernels)
        self.apply(self._init_weights)

    @property
    def decoder_weight(self):
        return self.roberta.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, cu_seqlens=None,
                max_seqlen=None, unpad=None, output_hidden_states=False, validate=True, return_dict=None):
        """MLM forward. With ``labels`` (-100 = not a target) returns the mean CE over labelled tokens and runs
        the head on those rows only (no [B, L, V] tensor); without, returns ``logits`` [B, L, V].
        The other arguments are ``RobertaModel.encode``'s."""
        validate = validate and not compiling()  # see the module docstring
        if labels is not None:
            _check_same_shape(input_ids, labels=labels)
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
            unpadded = cu_seqlens is not None or (self.unpad if unpad is None else unpad)
            if validate:
                _check_labels(labels, self.config.vocab_size)
                if unpadded and attention_mask is not None:
                    on_padding = (labels != IGNORE_INDEX) & ~attention_mask.bool()
                    if on_padding.any():
                        raise ValueError("a label sits on a padding position (attention_mask 0); an unpadded "
                                         f"run drops padding, so labels there must be {IGNORE_INDEX}")
        enc = self.roberta.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, unpad,
                                  output_hidden_states, validate, labels)
        states = enc.all_hidden_states() if output_hidden_states else None
        if labels is None:
            return _returned(MaskedLMOutput(logits=enc.padded(self.lm_head(enc.hidden, self.decoder_weight)),
                                            hidden_states=states), return_dict)
        hidden = enc.hidden.reshape(-1, enc.hidden.shape[-1])
        loss, num_correct, num_labels = self.lm_head.loss(hidden, self.decoder_weight, enc.flat(labels),
                                                          validate=False)
        return _returned(MaskedLMOutput(loss=loss, num_correct=num_correct, num_labels=num_labels,
                                        hidden_states=states), return_dict)

    def flops_per_token(self, seq_len, mask_prob=0.15):
        """Training FLOPs per real token (forward + backward = 3x forward), counting matmuls only: 6 x the
        encoder's matmul parameters, 12 x layers x hidden x seq_len for the attention scores and weighted sum,
        and the MLM head (dense + tied decoder, 6 x (hidden^2 + vocab x hidden)) on the ``mask_prob`` share of
        tokens it runs on."""
        c = self.config
        head = 6 * mask_prob * (c.hidden_size ** 2 + c.vocab_size * c.hidden_size)
        return self.roberta.flops_per_token(seq_len) + head


class RobertaForSequenceClassification(_WithEncoder):
    """Encoder + Hugging Face's classification head on <s>; ``config.num_labels`` outputs. The loss follows
    ``config.problem_type`` or, when None, HF's rule: regression for num_labels == 1, single-label
    classification for integer labels, multi-label classification (BCE with logits) otherwise."""

    def __init__(self, config: RobertaConfig, kernels="auto"):
        super().__init__()
        self._setup(config, kernels)
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, kernels, init_weights=False)
        self.classifier = ClassificationHead(config)
        self.apply(self._init_weights)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, cu_seqlens=None,
                max_seqlen=None, unpad=None, output_hidden_states=False, validate=True, return_dict=None):
        validate = validate and not compiling()  # see the module docstring
        if cu_seqlens is not None:
            raise ValueError("sequence classification takes one sequence per row: cu_seqlens is not supported")
        enc = self.roberta.encode(input_ids, attention_mask, token_type_ids, None, None, unpad,
                                  output_hidden_states, validate)
        hidden, states = self._padded_output(enc, output_hidden_states)
        logits = self.classifier(hidden)
        loss = None if labels is None else self._loss(logits, labels, validate)
        return _returned(ClassifierOutput(loss=loss, logits=logits, hidden_states=states), return_dict)

    def problem_type_for(self, labels):
        if self.config.problem_type is not None:
            return self.config.problem_type
        if self.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    def _loss(self, logits, labels, validate):
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.device != logits.device:
            raise ValueError(f"labels is on {labels.device} but the model's outputs are on {logits.device}")
        problem = self.problem_type_for(labels)
        n = self.num_labels
        if problem == "regression":
            if n == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if problem == "single_label_classification":
            if labels.dtype.is_floating_point:
                raise TypeError(f"single-label classification needs integer labels, got dtype {labels.dtype}")
            if labels.numel() != logits.shape[0]:
                raise ValueError(f"labels has {labels.numel()} entries but the batch has {logits.shape[0]} rows")
            if validate:
                _check_class_ids(labels, n)
            return F.cross_entropy(logits.view(-1, n), labels.view(-1))
        if labels.shape != logits.shape:
            raise ValueError(f"multi-label classification needs labels of shape {tuple(logits.shape)}, "
                             f"got {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class RobertaForTokenClassification(_WithEncoder):
    """Encoder + dropout + a linear layer per token (Hugging Face's head); CE over labels != -100."""

    def __init__(self, config: RobertaConfig, kernels="auto"):
        super().__init__()
        self._setup(config, kernels)
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, kernels, init_weights=False)
        self.dropout = nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None
                                  else config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(self._init_weights)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, cu_seqlens=None,
                max_seqlen=None, unpad=None, output_hidden_states=False, validate=True, return_dict=None):
        validate = validate and not compiling()  # see the module docstring
        if labels is not None:
            _check_same_shape(input_ids, labels=labels)
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
            if validate:
                _check_class_ids(labels, self.num_labels, allow_ignore=True)
        enc = self.roberta.encode(input_ids, attention_mask, token_type_ids, cu_seqlens, max_seqlen, unpad,
                                  output_hidden_states, validate)
        hidden, states = self._padded_output(enc, output_hidden_states)
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        return _returned(ClassifierOutput(loss=loss, logits=logits, hidden_states=states), return_dict)



class RobertaForQuestionAnswering(_WithEncoder):
    """Encoder + a linear layer per token giving start and end logits (Hugging Face's ``qa_outputs``, so
    ``config.num_labels`` must be 2).

    The loss is HF's: ``start_positions`` and ``end_positions`` ([B] or [B, 1]) are clamped to [0, L], a position
    at L (any position past the sequence) is ignored, and the loss is the mean of the start and end
    cross-entropies. One difference: padding positions (``attention_mask`` 0) get the dtype's lowest logit, so an
    answer is never predicted there and neither the loss nor its gradients depend on padding (transformers keeps
    them in the softmax with whatever its encoder computes there); on rows without padding the two agree."""

    def __init__(self, config: RobertaConfig, kernels="auto"):
        super().__init__()
        self._setup(config, kernels)
        if config.num_labels != 2:
            raise ValueError("RobertaForQuestionAnswering needs config.num_labels == 2 (start and end logits), "
                             f"got {config.num_labels}")
        self.num_labels = 2
        self.roberta = RobertaModel(config, kernels, init_weights=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.apply(self._init_weights)

    def forward(self, input_ids, attention_mask=None, start_positions=None, end_positions=None,
                token_type_ids=None, cu_seqlens=None, max_seqlen=None, unpad=None, output_hidden_states=False,
                validate=True, return_dict=None):
        validate = validate and not compiling()  # see the module docstring
        if cu_seqlens is not None:
            raise ValueError("question answering takes one sequence per row: cu_seqlens is not supported")
        if (start_positions is None) != (end_positions is None):
            raise ValueError("start_positions and end_positions come together: the loss needs both")
        enc = self.roberta.encode(input_ids, attention_mask, token_type_ids, None, None, unpad,
                                  output_hidden_states, validate)
        hidden, states = self._padded_output(enc, output_hidden_states)
        logits = self.qa_outputs(hidden)
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask.bool()[..., None], torch.finfo(logits.dtype).min)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None:
            seq_len = input_ids.shape[1]
            start = self._positions(start_positions, "start_positions", input_ids, attention_mask, validate)
            end = self._positions(end_positions, "end_positions", input_ids, attention_mask, validate)
            # HF's rule: a position past the sequence (the answer was cut off) is clamped to L and ignored.
            loss = (F.cross_entropy(start_logits, start, ignore_index=seq_len)
                    + F.cross_entropy(end_logits, end, ignore_index=seq_len)) / 2
        return _returned(QuestionAnsweringOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                                 hidden_states=states), return_dict)

    @staticmethod
    def _positions(positions, name, input_ids, attention_mask, validate):
        """``positions`` as [B], clamped to [0, L]; with ``validate``, none may sit on padding."""
        b, seq_len = input_ids.shape
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(positions).__name__}")
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token positions, got dtype {positions.dtype}")
        if positions.shape not in ((b,), (b, 1)):
            raise ValueError(f"{name} must be [batch] (one position per row), got shape {tuple(positions.shape)} "
                             f"for a batch of {b}")
        if positions.device != input_ids.device:
            raise ValueError(f"{name} is on {positions.device} but input_ids is on {input_ids.device}")
        positions = positions.reshape(b).long().clamp(0, seq_len)
        if validate and attention_mask is not None and seq_len:
            inside = positions < seq_len
            real = attention_mask.bool().gather(1, positions.clamp(max=seq_len - 1)[:, None]).squeeze(1)
            bad = (inside & ~real).nonzero().squeeze(-1)
            if bad.numel():
                row = int(bad[0])
                raise ValueError(f"{name}[{row}] = {int(positions[row])} is a padding position (attention_mask 0); "
                                 f"a position must be a real token, or >= the sequence length ({seq_len}) to be "
                                 "ignored")
        return positions


class RobertaForMultipleChoice(_WithEncoder):
    """Hugging Face's multiple-choice head: ``input_ids`` [B, C, L] (and the mask and token types alike) run as
    [B * C, L]; each choice's pooler output (dense -> tanh on <s>) -> dropout -> linear -> one score, giving
    ``logits`` [B, C]; the loss is the cross-entropy over the choices (``labels`` [B], -100 ignored)."""

    def __init__(self, config: RobertaConfig, kernels="auto"):
        super().__init__()
        self._setup(config, kernels)
        self.roberta = RobertaModel(config, kernels, init_weights=False, add_pooling_layer=True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)  # HF's choice here, not classifier_dropout
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.apply(self._init_weights)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, cu_seqlens=None,
                max_seqlen=None, unpad=None, output_hidden_states=False, validate=True, return_dict=None):
        validate = validate and not compiling()  # see the module docstring
        if cu_seqlens is not None:
            raise ValueError("multiple choice takes one sequence per row: cu_seqlens is not supported")
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 3:
            raise ValueError(f"input_ids must be [batch, num_choices, seq_len], got shape {tuple(input_ids.shape)}")
        _check_same_shape(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        b, num_choices, seq_len = input_ids.shape

        def flat(t):
            return None if t is None else t.reshape(b * num_choices, seq_len)
        enc = self.roberta.encode(flat(input_ids), flat(attention_mask), flat(token_type_ids), None, None, unpad,
                                  output_hidden_states, validate)
        hidden, states = self._padded_output(enc, output_hidden_states)
        logits = self.classifier(self.dropout(self.roberta.pooler(hidden))).view(b, num_choices)
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"labels must be integer choice indices, got dtype {labels.dtype}")
            if labels.numel() != b:
                raise ValueError(f"labels has {labels.numel()} entries but the batch has {b} questions")
            if labels.device != input_ids.device:
                raise ValueError(f"labels is on {labels.device} but input_ids is on {input_ids.device}")
            if validate:
                _check_class_ids(labels, num_choices, allow_ignore=True)
            loss = F.cross_entropy(logits, labels.reshape(b), ignore_index=IGNORE_INDEX)
        return _returned(MultipleChoiceOutput(loss=loss, logits=logits, hidden_states=states), return_dict)


def _check_class_ids(labels, num_labels, allow_ignore=False):
    bad = (labels < 0) | (labels >= num_labels)
    if allow_ignore:
        bad &= labels != IGNORE_INDEX
    if bad.any():
        extra = f" and is not the ignore index {IGNORE_INDEX}" if allow_ignore else ""
        raise ValueError(f"label {int(labels[bad][0])} is outside the classes [0, {num_labels}){extra}")
