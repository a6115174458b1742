"""The ``share`` technique (Lan et al. 2020, "ALBERT: A Lite BERT"): cross-layer parameter
sharing (all sublayers, attention only, or feed-forward only) and factorized embeddings
(a V×E table and an E→d_model projection, E < d_model; a tied head goes through the same
factorization). See :mod:`sharing` and :mod:`factorized` for the mechanics.

A technique rather than model options: it rewrites a model the builder assembled as usual
(DESIGN.md lists sharing under ``model_built``), so it applies to any composition of
components without a core change, and is re-applied whenever the run's model is built again
(resume, ``eval``, ``generate``, ``load_run``) before the checkpoint is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from plugformer import Component, ConfigError, TechniqueContext, bounds, hookimpl
from plugformer_plugins.technique.factorized import factorize_embeddings
from plugformer_plugins.technique.sharing import MODES, share_layers, unique_parameter_count


@dataclass
class ShareConfig:
    """``layers``: none, all, attention or ffn: which sublayers every layer of a stack shares
    (with the first layer holding the same kind of module). ``embedding_size``: E of a
    factorized token embedding (null: the ordinary V×d_model table); less than d_model."""

    layers: str = "all"
    embedding_size: int | None = field(default=None, metadata=bounds(ge=1))


class Share:
    """The ``share`` technique. Its summary: ``share/layers``, ``share/embedding_size``,
    ``share/params_unshared`` (the model as built), ``share/params`` (after sharing and
    factorization, each shared Parameter once), ``share/params_saved`` and
    ``share/groups/<stack>.<part>`` (the layer indices that hold one module, e.g.
    ``0,1,2,3``)."""

    def __init__(self, config: ShareConfig, ctx: TechniqueContext) -> None:
        if config.layers not in MODES:
            raise ConfigError(
                f"techniques.share.layers={config.layers!r} is not a sharing mode.",
                expected=f"one of {list(MODES)}",
                fix="techniques.share.layers=all, attention, ffn or none",
            )
        d_model = int(ctx.cfg.model.d_model)
        if config.embedding_size is not None and config.embedding_size >= d_model:
            raise ConfigError(
                f"techniques.share.embedding_size={config.embedding_size} is not below model.d_model={d_model}: "
                "a factorized embedding only saves parameters when E < d_model.",
                expected=f"an embedding size below {d_model}, or null for the ordinary embedding",
                fix=f"set techniques.share.embedding_size to at most {d_model - 1}, or remove it",
            )
        self._check_distill(config, ctx)
        self.config = config
        self.summary: dict[str, Any] = {}

    @staticmethod
    def _check_distill(config: ShareConfig, ctx: TechniqueContext) -> None:
        distill = (ctx.cfg.get("techniques") or {}).get("distill")
        if distill is None or config.layers == "none":
            return
        if distill.get("init_from_teacher", False):
            raise ConfigError(
                f"techniques.distill.init_from_teacher copies a different teacher layer into each student layer, "
                f"but with techniques.share.layers={config.layers} the student's layers share their weights, so "
                "every copy would overwrite the one shared tensor.",
                expected="init_from_teacher=false with a shared student",
                fix="set techniques.distill.init_from_teacher=false, or techniques.share.layers=none",
            )
        per_layer = (distill.get("hidden_weight", 0) or 0) > 0 or (distill.get("attention_weight", 0) or 0) > 0
        if per_layer and config.layers in ("all", "attention"):
            raise ConfigError(
                "techniques.distill.hidden_weight/attention_weight record each layer's attention inputs with hooks "
                f"on the attention modules, but with techniques.share.layers={config.layers} one attention module "
                "serves every layer, so the layers could not be told apart.",
                expected="logit distillation only (hidden_weight=0, attention_weight=0), or layers=ffn or none",
                fix="set techniques.distill.hidden_weight=0 and attention_weight=0, or techniques.share.layers=ffn",
            )

    # Before the other techniques' model_built (pruning masks must go on the shared modules;
    # quantization-aware training keeps modules that are shared shared, in either order).
    @hookimpl(tryfirst=True)
    def model_built(self, model: nn.Module, cfg: Any) -> None:
        before = unique_parameter_count(model)
        groups = share_layers(model, self.config.layers) if self.config.layers != "none" else {}
        tied_heads = factorize_embeddings(model, self.config.embedding_size) if self.config.embedding_size else 0
        after = unique_parameter_count(model)
        self.summary = {
            "share/layers": self.config.layers,
            "share/embedding_size": self.config.embedding_size,
            "share/tied_heads": tied_heads,
            "share/params_unshared": before,
            "share/params": after,
            "share/params_saved": before - after,
        }
        for name, indices in groups.items():
            self.summary[f"share/groups/{name}"] = " ".join(",".join(map(str, group)) for group in indices)

    @hookimpl
    def run_summary(self, trainer: Any, module: Any) -> dict[str, Any] | None:
        return dict(self.summary) or None


COMPONENT = Component(
    kind="technique",
    name="share",
    factory=Share,
    config=ShareConfig,
    summary="ALBERT cross-layer parameter sharing (all, attention, ffn) and factorized embeddings (E < d_model).",
    reference="Lan et al. 2020, ALBERT: A Lite BERT for Self-supervised Learning of Language Representations",
)
