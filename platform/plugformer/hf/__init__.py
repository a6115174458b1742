"""Hugging Face interop: ``plugformer import-hf`` and ``plugformer export-hf``.

GPT-2 (``GPT2LMHeadModel``) and Llama (``LlamaForCausalLM``) checkpoints convert to a
plugformer run directory whose components express the architecture exactly (logits equal
within float32 rounding), and back to ``config.json`` + ``model.safetensors`` that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. ``transformers`` itself is not
needed for either direction (only ``safetensors``); it is imported nowhere here.

- :mod:`plugformer.hf.gpt2`, :mod:`plugformer.hf.llama`: per architecture, the plugformer
  overrides of an HF config, the weight mapping both ways, and the HF config of a run;
- :mod:`plugformer.hf.convert`: reading and writing directories, the two commands.
"""

from plugformer.hf.convert import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
