"""Llama (``LlamaForCausalLM``, Touvron et al. 2023) ↔ plugformer.

Llama is plugformer's full attention without biases (grouped-query with ``n_kv_heads``, an
explicit ``head_dim``), rotary positions in Hugging Face's half-split layout (with linear or
llama3 scaling), pre-RMSNorm blocks and a SwiGLU feed-forward network without biases.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from plugformer.hf._common import check_run_option, plugformer_node, require, unsupported

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
_BLOCK = "stacks.decoder.blocks.{i}."
_SCALINGS = ("default", "linear", "llama3")


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings in transformers 5's ``rope_parameters`` form, also from the older
    ``rope_theta`` + ``rope_scaling`` keys."""
    params = dict(config.get("rope_parameters") or {})
    if not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def overrides(config: dict[str, Any]) -> list[str]:
    """The plugformer overrides that build this Llama exactly (vocabulary and data aside)."""
    require(config, "hidden_act", "silu", "Llama", default="silu")
    require(config, "pretraining_tp", 1, "Llama", default=1)
    require(config, "attention_dropout", (0.0, 0), "Llama", default=0.0)  # plugformer's dropout also acts on residuals
    rope = rope_parameters(config)
    if rope["rope_type"] not in _SCALINGS:
        raise unsupported(
            f"Llama config.json has rotary scaling rope_type={rope['rope_type']!r}.",
            expected=f"rope_type in {list(_SCALINGS)}",
            fix="convert a model with default, linear or llama3 rotary scaling (dynamic, yarn and longrope are not expressed)",
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise unsupported(
            f"Llama config.json has partial_rotary_factor={rope['partial_rotary_factor']}.",
            expected="partial_rotary_factor 1.0", fix="convert a model that rotates every head dimension",
        )
    d_model, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    attention_bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    found = [
        "model/attention=full", "model/position=rope", "model/norm=rmsnorm", "model/ffn=glu", "model/block=standard",
        "objective=causal_lm",
        f"model.d_model={d_model}", f"model.n_layers={int(config['num_hidden_layers'])}", f"model.n_heads={heads}",
        f"model.n_kv_heads={int(config.get('num_key_value_heads') or heads)}",
        f"model.head_dim={int(config.get('head_dim') or d_model // heads)}",
        "model.dropout=0.0",
        f"model.tie_embeddings={str(bool(config.get('tie_word_embeddings', False))).lower()}",
        f"model.attention.bias={str(attention_bias).lower()}",
        f"model.position.base={float(rope['rope_theta'])}", "model.position.layout=half",
        f"model.norm.eps={float(config.get('rms_norm_eps', 1e-6))}", "model.norm.scale=true",
        "model.ffn.activation=swish", f"model.ffn.hidden={int(config['intermediate_size'])}", f"model.ffn.bias={str(mlp_bias).lower()}",
        "model.block.placement=pre",
    ]
    if rope["rope_type"] != "default":
        found += [f"model.position.scaling={rope['rope_type']}", f"model.position.scaling_factor={float(rope['factor'])}"]
    if rope["rope_type"] == "llama3":
        found += [
            f"model.position.low_freq_factor={float(rope['low_freq_factor'])}",
            f"model.position.high_freq_factor={float(rope['high_freq_factor'])}",
            f"model.position.original_max_length={int(rope['original_max_position_embeddings'])}",
        ]
    return found


def to_plugformer(hf: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """Plugformer state dict (the model's names) from a Llama state dict."""
    out = {
        "token_embedding.weight": hf["model.embed_tokens.weight"],
        "stacks.decoder.final_norm.weight": hf["model.norm.weight"],
    }
    out["objective.head.weight"] = hf.get("lm_head.weight", out["token_embedding.weight"])
    for i in range(int(config["num_hidden_layers"])):
        h, b = f"model.layers.{i}.", _BLOCK.format(i=i)
        out |= {
            b + "norms.attention.weight": hf[h + "input_layernorm.weight"],
            b + "norms.ffn.weight": hf[h + "post_attention_layernorm.weight"],
            b + "attention.query.weight": hf[h + "self_attn.q_proj.weight"],
            b + "attention.key_value.weight": torch.cat([hf[h + "self_attn.k_proj.weight"], hf[h + "self_attn.v_proj.weight"]]),
            b + "attention.out.weight": hf[h + "self_attn.o_proj.weight"],
            b + "ffn.gate_and_value.weight": torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]),
            b + "ffn.down.weight": hf[h + "mlp.down_proj.weight"],
        }
        if config.get("attention_bias"):
            out |= {
                b + "attention.query.bias": hf[h + "self_attn.q_proj.bias"],
                b + "attention.key_value.bias": torch.cat([hf[h + "self_attn.k_proj.bias"], hf[h + "self_attn.v_proj.bias"]]),
                b + "attention.out.bias": hf[h + "self_attn.o_proj.bias"],
            }
        if config.get("mlp_bias"):
            out |= {
                b + "ffn.gate_and_value.bias": torch.cat([hf[h + "mlp.gate_proj.bias"], hf[h + "mlp.up_proj.bias"]]),
                b + "ffn.down.bias": hf[h + "mlp.down_proj.bias"],
            }
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_plugformer(state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """A LlamaForCausalLM state dict from a plugformer model's."""
    out = {"model.embed_tokens.weight": state["token_embedding.weight"], "model.norm.weight": state["stacks.decoder.final_norm.weight"]}
    if not cfg.model.tie_embeddings:
        out["lm_head.weight"] = state["objective.head.weight"]
    for i in range(int(cfg.model.n_layers)):
        h, b = f"model.layers.{i}.", _BLOCK.format(i=i)
        k, v = state[b + "attention.key_value.weight"].chunk(2)
        gate, up = state[b + "ffn.gate_and_value.weight"].chunk(2)
        out |= {
            h + "input_layernorm.weight": state[b + "norms.attention.weight"],
            h + "post_attention_layernorm.weight": state[b + "norms.ffn.weight"],
            h + "self_attn.q_proj.weight": state[b + "attention.query.weight"], h + "self_attn.k_proj.weight": k,
            h + "self_attn.v_proj.weight": v, h + "self_attn.o_proj.weight": state[b + "attention.out.weight"],
            h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up, h + "mlp.down_proj.weight": state[b + "ffn.down.weight"],
        }
        if b + "attention.query.bias" in state:
            k_bias, v_bias = state[b + "attention.key_value.bias"].chunk(2)
            out |= {
                h + "self_attn.q_proj.bias": state[b + "attention.query.bias"], h + "self_attn.k_proj.bias": k_bias,
                h + "self_attn.v_proj.bias": v_bias, h + "self_attn.o_proj.bias": state[b + "attention.out.bias"],
            }
        if b + "ffn.down.bias" in state:
            gate_bias, up_bias = state[b + "ffn.gate_and_value.bias"].chunk(2)
            out |= {h + "mlp.gate_proj.bias": gate_bias, h + "mlp.up_proj.bias": up_bias, h + "mlp.down_proj.bias": state[b + "ffn.down.bias"]}
    return {name: tensor.contiguous() for name, tensor in out.items()}


def hf_config(cfg: Any, state: dict[str, Tensor], max_length: int) -> dict[str, Any]:
    """Llama's config.json for a plugformer run, after checking the run expresses Llama."""
    for path, allowed in (
        ("model.position.layout", "half"), ("model.position.fraction", 1.0), ("model.ffn.activation", "swish"),
        ("model.norm.scale", True), ("model.block.placement", "pre"), ("model.dropout", 0.0),
    ):
        check_run_option(cfg, path, allowed, "Llama")
    d_model, heads = int(cfg.model.d_model), int(cfg.model.n_heads)
    scaling = plugformer_node(cfg, "model.position.scaling")
    rope: dict[str, Any] = {"rope_type": "default" if scaling == "none" else scaling, "rope_theta": float(cfg.model.position.base)}
    if scaling != "none":
        rope["factor"] = float(cfg.model.position.scaling_factor)
    if scaling == "llama3":
        rope |= {
            "low_freq_factor": float(cfg.model.position.low_freq_factor), "high_freq_factor": float(cfg.model.position.high_freq_factor),
            "original_max_position_embeddings": int(cfg.model.position.original_max_length),
        }
    hidden = state["stacks.decoder.blocks.0.ffn.down.weight"].shape[1]
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": state["token_embedding.weight"].shape[0], "hidden_size": d_model,
        "intermediate_size": int(hidden), "num_hidden_layers": int(cfg.model.n_layers), "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.model.get("n_kv_heads") or heads), "head_dim": int(cfg.model.get("head_dim") or d_model // heads),
        "hidden_act": "silu", "max_position_embeddings": int(max_length), "rms_norm_eps": float(cfg.model.norm.eps),
        "tie_word_embeddings": bool(cfg.model.tie_embeddings), "rope_parameters": rope,
        "attention_bias": bool(plugformer_node(cfg, "model.attention.bias")), "attention_dropout": 0.0,
        "mlp_bias": bool(plugformer_node(cfg, "model.ffn.bias")),
    }
