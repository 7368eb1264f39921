"""Read and write Hugging Face RoBERTa checkpoint folders (config.json + model.safetensors or
pytorch_model.bin) for every model class: the encoder maps HF's separate query/key/value weights onto our
fused QKV projection and HF's module names onto ours; the heads keep HF's names.

HF names the encoder ``roberta.embeddings.*`` / ``roberta.encoder.layer.N.*`` inside a task model and
``embeddings.*`` / ``encoder.*`` in a bare RobertaModel; ours are ``roberta.embeddings.*`` /
``roberta.layers.N.*`` and ``embeddings.*`` / ``layers.N.*``. Loading follows transformers: weights a
checkpoint lacks for the head are initialised, and they and the checkpoint keys this model does not use are
reported in one warning; a checkpoint that lacks encoder weights is an error.
"""
import dataclasses
import os
import warnings

import torch

from fastroberta.config import RobertaConfig, read_json

SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"

# Keys HF stores that carry no information for us when the model has no parameter of that name: a constant
# buffer, the pooler of RobertaModel checkpoints (read when the model has one: RobertaForMultipleChoice,
# RobertaModel(add_pooling_layer=True); transformers' other heads skip it too), and the decoder weight tied
# to the word embeddings.
_IGNORED = ("embeddings.position_ids", "pooler.", "lm_head.decoder.weight")

_EMBEDDINGS = {"embeddings.word_embeddings": "embeddings.word_embeddings",
               "embeddings.position_embeddings": "embeddings.position_embeddings",
               "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
               "embeddings.LayerNorm": "embeddings.layer_norm"}
_LAYER = {"attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
          "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_norm"}
_QKV = ("query", "key", "value")


def _encoder_prefix(model):
    """Where the encoder's keys start in ``model``'s state dict (and in HF's for the same class)."""
    from fastroberta.model import RobertaModel
    return "" if isinstance(model, RobertaModel) else "roberta."


def _encoder_to_hf(state, num_layers):
    """Our encoder state (keys without prefix) -> HF's names (without prefix)."""
    out = {}
    for hf, ours in _EMBEDDINGS.items():
        for suffix in (".weight", ".bias"):
            if ours + suffix in state:
                out[hf + suffix] = state[ours + suffix]
    for i in range(num_layers):
        for hf, ours in _LAYER.items():
            for suffix in (".weight", ".bias"):
                out[f"encoder.layer.{i}.{hf}{suffix}"] = state[f"layers.{i}.{ours}{suffix}"]
        for suffix in ("weight", "bias"):
            for name, part in zip(_QKV, state[f"layers.{i}.qkv.{suffix}"].chunk(3, dim=0)):
                out[f"encoder.layer.{i}.attention.self.{name}.{suffix}"] = part
    return out


def _encoder_from_hf(hf_state, num_layers):
    """HF's encoder keys (without prefix) -> (our encoder state, the HF keys used)."""
    ours, used = {}, set()
    for hf, name in _EMBEDDINGS.items():
        for suffix in (".weight", ".bias"):
            if hf + suffix in hf_state:
                ours[name + suffix] = hf_state[hf + suffix]
                used.add(hf + suffix)
    for i in range(num_layers):
        for hf, name in _LAYER.items():
            for suffix in (".weight", ".bias"):
                key = f"encoder.layer.{i}.{hf}{suffix}"
                if key in hf_state:
                    ours[f"layers.{i}.{name}{suffix}"] = hf_state[key]
                    used.add(key)
        for suffix in ("weight", "bias"):
            parts = [f"encoder.layer.{i}.attention.self.{p}.{suffix}" for p in _QKV]
            if all(p in hf_state for p in parts):
                ours[f"layers.{i}.qkv.{suffix}"] = torch.cat([hf_state[p] for p in parts], dim=0)
                used.update(parts)
    return ours, used


def to_hf_state_dict(model):
    """``model``'s state dict under the names transformers' class of the same name uses (ties left implicit,
    as HF saves them)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    prefix = _encoder_prefix(model)
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
               and k[len(prefix):].startswith(("embeddings.", "layers."))}
    out = {prefix + k: v for k, v in _encoder_to_hf(encoder, model.config.num_hidden_layers).items()}
    for k, v in state.items():  # the head: HF's names already
        if not (k.startswith(prefix) and k[len(prefix):].startswith(("embeddings.", "layers."))):
            out[k] = v
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(model, hf_state):
    """HF state dict (of any RoBERTa class) -> (our state dict for ``model``, missing keys, unexpected keys).

    ``missing`` are our parameter names the checkpoint does not provide; ``unexpected`` the checkpoint's keys
    this model does not use. Raises ValueError when encoder weights are missing."""
    # The encoder's HF keys, with "roberta." stripped (bare RobertaModel checkpoints have no prefix).
    encoder_hf = {}
    for k, v in hf_state.items():
        bare = k[len("roberta."):] if k.startswith("roberta.") else k
        if bare.startswith(("embeddings.", "encoder.")):
            encoder_hf[bare] = v
    encoder, used_bare = _encoder_from_hf(encoder_hf, model.config.num_hidden_layers)
    prefix = _encoder_prefix(model)
    ours = {prefix + k: v for k, v in encoder.items()}
    used = {k for k in hf_state if (k[len("roberta."):] if k.startswith("roberta.") else k) in used_bare}

    expected = model.state_dict()
    for k, v in hf_state.items():  # head weights keep HF's names
        if k in used:
            continue
        if k in expected and not k.startswith(prefix + "embeddings.") and not k.startswith(prefix + "layers."):
            ours[k] = v
            used.add(k)
    if "lm_head.bias" in expected and "lm_head.bias" not in ours and "lm_head.decoder.bias" in hf_state:
        ours["lm_head.bias"] = hf_state["lm_head.decoder.bias"]  # older checkpoints keep only the tied copy
        used.add("lm_head.decoder.bias")
    if "lm_head.bias" in ours:
        used.add("lm_head.decoder.bias")  # the tied copy of the bias just read
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(k for k in hf_state if k not in used and not _ignored(k))
    missing_encoder = [k for k in missing if k.startswith((prefix + "embeddings.", prefix + "layers."))]
    if missing_encoder:
        raise ValueError(f"the checkpoint lacks encoder weights for: {missing_encoder[:10]}"
                         + (f" (and {len(missing_encoder) - 10} more)" if len(missing_encoder) > 10 else ""))
    return ours, missing, unexpected


def _ignored(key):
    bare = key[len("roberta."):] if key.startswith("roberta.") else key
    return bare.startswith(_IGNORED)


def read_config(path):
    """RobertaConfig from a HF checkpoint folder's config.json; rejects non-RoBERTa models."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        hint = ""
        if os.path.isfile(os.path.join(path, SAFETENSORS_NAME)):  # transformers.Trainer.save_model's folder
            hint = (" (a folder written by transformers.Trainer holds only the state dict: load it with "
                    "model.load_state_dict(safetensors.torch.load_file(...)), or write one with save_pretrained)")
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint folder {path}{hint}")
    d = read_json(cfg_path)
    if not isinstance(d, dict) or d.get("model_type") != "roberta":
        got = d.get("model_type") if isinstance(d, dict) else None
        raise ValueError(f"{cfg_path} describes model_type={got!r}, not a RoBERTa model ('roberta')")
    pos = d.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"{cfg_path}: position_embedding_type={pos!r} is not supported (only 'absolute')")
    return RobertaConfig.from_dict(d)


def load_state(path):
    st, bin_ = os.path.join(path, SAFETENSORS_NAME), os.path.join(path, TORCH_NAME)
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    if os.path.isfile(bin_):
        return torch.load(bin_, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {TORCH_NAME} in checkpoint folder {path}")


def load_pretrained(cls, path, kernels="auto", output_loading_info=False, **config_overrides):
    """A ``cls`` (any fastroberta RoBERTa model class) built from a HF folder; see the module docstring."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    config = read_config(path)
    model_args = {}
    if "add_pooling_layer" in config_overrides:  # a constructor argument, not a config field (as in transformers)
        from fastroberta.model import RobertaModel
        if cls is not RobertaModel:
            raise ValueError(f"add_pooling_layer applies to RobertaModel only, not {cls.__name__}")
        model_args["add_pooling_layer"] = bool(config_overrides.pop("add_pooling_layer"))
    if config_overrides:
        if "num_labels" in config_overrides and config_overrides["num_labels"] != config.num_labels:
            config_overrides.setdefault("id2label", None)
        known = {f.name for f in dataclasses.fields(RobertaConfig)}
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise ValueError(f"unknown RobertaConfig fields: {unknown}")
        config = dataclasses.replace(config, **config_overrides)
    model = cls(config, kernels=kernels, **model_args)
    state, missing, unexpected = from_hf_state_dict(model, load_state(path))
    model.load_state_dict(state, strict=False)  # what is missing keeps the fresh initialisation
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"newly initialised (train them before use): {missing}")
        if unexpected:
            parts.append(f"not used by {cls.__name__}: {unexpected}")
        warnings.warn(f"loading {cls.__name__} from {path}: " + "; ".join(parts), stacklevel=3)
    if output_loading_info:
        return model, {"missing_keys": missing, "unexpected_keys": unexpected}
    return model


def save_pretrained(model, path):
    """Write config.json + model.safetensors that transformers' class of the same name loads.
    Files are written under temporary names and renamed, so a crash never leaves a half-written folder."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    state = {k: v.cpu() for k, v in to_hf_state_dict(model).items()}
    tmp_st = os.path.join(path, SAFETENSORS_NAME + ".tmp")
    save_file(state, tmp_st, metadata={"format": "pt"})
    tmp_cfg = os.path.join(path, CONFIG_NAME + ".tmp")
    model.config.save_json(tmp_cfg, architecture=type(model).__name__)
    os.replace(tmp_st, os.path.join(path, SAFETENSORS_NAME))
    os.replace(tmp_cfg, os.path.join(path, CONFIG_NAME))
