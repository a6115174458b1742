"""GPT-2 (``GPT2LMHeadModel``, Radford et al. 2019) ↔ plugformer.

GPT-2 is plugformer's full attention with biases, learned positions, pre-LayerNorm blocks and
an MLP with the tanh GELU and no dropout on its hidden activations; Conv1D weights are the
transposes of ``nn.Linear`` weights, and ``c_attn`` holds query, key and value side by side.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from plugformer.hf._common import check_run_option, plugformer_node, require, unsupported

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_BLOCK = "stacks.decoder.blocks.{i}."


def overrides(config: dict[str, Any]) -> list[str]:
    """The plugformer overrides that build this GPT-2 exactly (vocabulary and data aside)."""
    for key, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        require(config, key, value, "GPT-2", default=value)
    activation = config.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise unsupported(
            f"GPT-2 config.json has activation_function={activation!r}.",
            expected=f"one of {sorted(_ACTIVATIONS)}",
            fix="convert a model with one of these activations",
        )
    drops = {key: float(config.get(key, 0.1)) for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) > 1:
        raise unsupported(
            f"GPT-2 config.json has different dropout rates {drops}; plugformer has one model.dropout.",
            expected="resid_pdrop = embd_pdrop = attn_pdrop",
            fix="set the three rates equal in config.json (they do not change the weights)",
        )
    d_model = int(config["n_embd"])
    return [
        "model/attention=full", "model/position=learned", "model/norm=layernorm", "model/ffn=mlp", "model/block=standard",
        "objective=causal_lm",
        f"model.d_model={d_model}", f"model.n_layers={int(config['n_layer'])}", f"model.n_heads={int(config['n_head'])}",
        f"model.dropout={drops['resid_pdrop']}", f"model.tie_embeddings={str(bool(config.get('tie_word_embeddings', True))).lower()}",
        "model.attention.bias=true", f"model.position.max_length={int(config['n_positions'])}",
        f"model.norm.eps={float(config.get('layer_norm_epsilon', 1e-5))}", "model.norm.bias=true",
        f"model.ffn.hidden={int(config.get('n_inner') or 4 * d_model)}", f"model.ffn.activation={_ACTIVATIONS[activation]}",
        "model.ffn.bias=true", "model.ffn.hidden_dropout=false", "model.block.placement=pre",
    ]


def to_plugformer(hf: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """Plugformer state dict (the model's names) from a GPT-2 state dict."""
    d_model = int(config["n_embd"])
    prefix = "transformer." if "transformer.wte.weight" in hf else ""
    out = {
        "token_embedding.weight": hf[f"{prefix}wte.weight"],
        "stacks.decoder.position.table.weight": hf[f"{prefix}wpe.weight"],
        "stacks.decoder.final_norm.weight": hf[f"{prefix}ln_f.weight"],
        "stacks.decoder.final_norm.bias": hf[f"{prefix}ln_f.bias"],
    }
    out["objective.head.weight"] = hf.get("lm_head.weight", out["token_embedding.weight"])
    for i in range(int(config["n_layer"])):
        h, b = f"{prefix}h.{i}.", _BLOCK.format(i=i)
        attn_w, attn_b = hf[h + "attn.c_attn.weight"].t(), hf[h + "attn.c_attn.bias"]
        out |= {
            b + "norms.attention.weight": hf[h + "ln_1.weight"], b + "norms.attention.bias": hf[h + "ln_1.bias"],
            b + "attention.query.weight": attn_w[:d_model], b + "attention.query.bias": attn_b[:d_model],
            b + "attention.key_value.weight": attn_w[d_model:], b + "attention.key_value.bias": attn_b[d_model:],
            b + "attention.out.weight": hf[h + "attn.c_proj.weight"].t(), b + "attention.out.bias": hf[h + "attn.c_proj.bias"],
            b + "norms.ffn.weight": hf[h + "ln_2.weight"], b + "norms.ffn.bias": hf[h + "ln_2.bias"],
            b + "ffn.up.weight": hf[h + "mlp.c_fc.weight"].t(), b + "ffn.up.bias": hf[h + "mlp.c_fc.bias"],
            b + "ffn.down.weight": hf[h + "mlp.c_proj.weight"].t(), b + "ffn.down.bias": hf[h + "mlp.c_proj.bias"],
        }
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_plugformer(state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """A GPT2LMHeadModel state dict from a plugformer model's."""
    out = {
        "transformer.wte.weight": state["token_embedding.weight"],
        "transformer.wpe.weight": state["stacks.decoder.position.table.weight"],
        "transformer.ln_f.weight": state["stacks.decoder.final_norm.weight"],
        "transformer.ln_f.bias": state["stacks.decoder.final_norm.bias"],
    }
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = state["objective.head.weight"]
    for i in range(int(cfg.model.n_layers)):
        h, b = f"transformer.h.{i}.", _BLOCK.format(i=i)
        out |= {
            h + "ln_1.weight": state[b + "norms.attention.weight"], h + "ln_1.bias": state[b + "norms.attention.bias"],
            h + "attn.c_attn.weight": _cat(state[b + "attention.query.weight"], state[b + "attention.key_value.weight"]).t(),
            h + "attn.c_attn.bias": _cat(state[b + "attention.query.bias"], state[b + "attention.key_value.bias"]),
            h + "attn.c_proj.weight": state[b + "attention.out.weight"].t(), h + "attn.c_proj.bias": state[b + "attention.out.bias"],
            h + "ln_2.weight": state[b + "norms.ffn.weight"], h + "ln_2.bias": state[b + "norms.ffn.bias"],
            h + "mlp.c_fc.weight": state[b + "ffn.up.weight"].t(), h + "mlp.c_fc.bias": state[b + "ffn.up.bias"],
            h + "mlp.c_proj.weight": state[b + "ffn.down.weight"].t(), h + "mlp.c_proj.bias": state[b + "ffn.down.bias"],
        }
    return {name: tensor.contiguous() for name, tensor in out.items()}


def hf_config(cfg: Any, state: dict[str, Tensor], max_length: int) -> dict[str, Any]:
    """GPT-2's config.json for a plugformer run, after checking the run expresses GPT-2."""
    for path, allowed in (
        ("model.attention.bias", True), ("model.norm.bias", True), ("model.ffn.bias", True),
        ("model.ffn.activation", ("gelu_tanh", "gelu", "relu")), ("model.block.placement", "pre"), ("model.head_dim", (None,)),
        ("model.n_kv_heads", (None, int(cfg.model.n_heads))),
    ):
        check_run_option(cfg, path, allowed, "GPT-2")
    if float(cfg.model.dropout) > 0 and plugformer_node(cfg, "model.ffn.hidden_dropout"):
        raise unsupported(
            "The run drops out the MLP's hidden activations (model.ffn.hidden_dropout=true, model.dropout > 0); GPT-2 does not.",
            expected="model.ffn.hidden_dropout=false, or model.dropout=0",
            fix="train GPT-2-compatible runs with model.ffn.hidden_dropout=false",
        )
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[plugformer_node(cfg, "model.ffn.activation")]
    dropout = float(cfg.model.dropout)
    d_model = int(cfg.model.d_model)
    hidden = state["stacks.decoder.blocks.0.ffn.up.weight"].shape[0]
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": state["token_embedding.weight"].shape[0],
        "n_positions": state["stacks.decoder.position.table.weight"].shape[0], "n_embd": d_model, "n_layer": int(cfg.model.n_layers),
        "n_head": int(cfg.model.n_heads), "n_inner": int(hidden), "activation_function": activation,
        "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
        "layer_norm_epsilon": float(cfg.model.norm.eps), "tie_word_embeddings": bool(cfg.model.tie_embeddings),
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    }


def _cat(*tensors: Tensor) -> Tensor:
    import torch

    return torch.cat(tensors, dim=0)
