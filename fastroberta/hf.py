"""Read and write Hugging Face RoBERTa checkpoint folders (config.json + model.safetensors or
pytorch_model.bin), mapping HF's separate query/key/value weights onto our fused QKV projection."""
import os

import torch

from fastroberta.config import RobertaConfig, read_json

SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"

# Keys HF stores that carry no information for us: a constant buffer, the (unused) pooler of
# RobertaModel checkpoints, and the copies of weights tied to others.
_IGNORED_PREFIXES = ("roberta.pooler.", "roberta.embeddings.position_ids", "lm_head.decoder.")


def _layer_map(i):
    hf, ours = f"roberta.encoder.layer.{i}.", f"layers.{i}."
    return {
        hf + "attention.output.dense": ours + "attn_out",
        hf + "attention.output.LayerNorm": ours + "attn_norm",
        hf + "intermediate.dense": ours + "ffn_in",
        hf + "output.dense": ours + "ffn_out",
        hf + "output.LayerNorm": ours + "ffn_norm",
    }


def _module_map(config):
    m = {
        "roberta.embeddings.word_embeddings": "embeddings.word_embeddings",
        "roberta.embeddings.position_embeddings": "embeddings.position_embeddings",
        "roberta.embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
        "roberta.embeddings.LayerNorm": "embeddings.layer_norm",
        "lm_head.dense": "lm_head.dense",
        "lm_head.layer_norm": "lm_head.layer_norm",
    }
    for i in range(config.num_hidden_layers):
        m.update(_layer_map(i))
    return m


def to_hf_state_dict(model):
    """Our state dict under HF's names (ties left implicit, as HF saves them)."""
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {}
    for hf, name in _module_map(model.config).items():
        for suffix in (".weight", ".bias"):
            if name + suffix in ours:
                out[hf + suffix] = ours[name + suffix]
    for i in range(model.config.num_hidden_layers):
        prefix = f"roberta.encoder.layer.{i}.attention.self."
        for suffix in ("weight", "bias"):
            q, k, v = ours[f"layers.{i}.qkv.{suffix}"].chunk(3, dim=0)
            out[prefix + "query." + suffix], out[prefix + "key." + suffix], out[prefix + "value." + suffix] = q, k, v
    out["lm_head.bias"] = ours["lm_head.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(config, hf_state):
    """HF's RobertaForMaskedLM state dict -> ours. Raises ValueError listing missing or unexpected keys."""
    # Checkpoints of RobertaModel (no MLM head) name keys without the "roberta." prefix.
    if not any(k.startswith("roberta.") for k in hf_state):
        hf_state = {("roberta." + k if not k.startswith("lm_head.") else k): v for k, v in hf_state.items()}
    used, ours = set(), {}
    for hf, name in _module_map(config).items():
        for suffix in (".weight", ".bias"):
            if hf + suffix in hf_state:
                ours[name + suffix] = hf_state[hf + suffix]
                used.add(hf + suffix)
    for i in range(config.num_hidden_layers):
        prefix = f"roberta.encoder.layer.{i}.attention.self."
        for suffix in ("weight", "bias"):
            parts = [prefix + p + "." + suffix for p in ("query", "key", "value")]
            if all(p in hf_state for p in parts):
                ours[f"layers.{i}.qkv.{suffix}"] = torch.cat([hf_state[p] for p in parts], dim=0)
                used.update(parts)
    if "lm_head.bias" in hf_state:
        ours["lm_head.bias"] = hf_state["lm_head.bias"]
        used.add("lm_head.bias")
    elif "lm_head.decoder.bias" in hf_state:
        ours["lm_head.bias"] = hf_state["lm_head.decoder.bias"]
    unexpected = [k for k in hf_state if k not in used and not k.startswith(_IGNORED_PREFIXES)]
    if unexpected:
        raise ValueError(f"checkpoint has keys that are not part of RobertaForMaskedLM: {sorted(unexpected)[:10]}")
    return ours


def read_config(path):
    """RobertaConfig from a HF checkpoint folder's config.json; rejects non-RoBERTa models."""
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint folder {path}")
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


def load_pretrained(path, kernels="auto"):
    from fastroberta.model import RobertaForMaskedLM
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    config = read_config(path)
    state = from_hf_state_dict(config, load_state(path))
    model = RobertaForMaskedLM(config, kernels=kernels)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {missing[:10]}")
    model.load_state_dict(state, strict=True)
    return model


def save_pretrained(model, path):
    """Write config.json + model.safetensors that transformers.RobertaForMaskedLM.from_pretrained loads.
    Files are written under temporary names and renamed, so a crash never leaves a half-written folder."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    state = {k: v.cpu() for k, v in to_hf_state_dict(model).items()}
    tmp_st = os.path.join(path, SAFETENSORS_NAME + ".tmp")
    save_file(state, tmp_st, metadata={"format": "pt"})
    tmp_cfg = os.path.join(path, CONFIG_NAME + ".tmp")
    model.config.save_json(tmp_cfg)
    os.replace(tmp_st, os.path.join(path, SAFETENSORS_NAME))
    os.replace(tmp_cfg, os.path.join(path, CONFIG_NAME))
