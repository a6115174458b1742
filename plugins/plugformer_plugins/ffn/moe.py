"""Mixture of experts (Shazeer et al. 2017; GShard, Lepikhin et al. 2021; Switch, Fedus et
al. 2022; ST-MoE, Zoph et al. 2022): a router sends each token to its top-k of E experts,
each expert any registered feed-forward component.

Contract (a :class:`plugformer.FeedForward`, (batch, length, d_model) → same shape):

- Router: logits = x·W_r, computed in at least float32 (autocast off); probabilities
  p = softmax(logits). With ``noisy_gating`` (Shazeer's noisy top-k), in training only, the
  routing logits are logits + ε·softplus(x·W_noise), ε ~ N(0, 1).
- Top-k: each token's k experts of highest probability. Gates: the top-1 probability itself
  (Switch) for k = 1; for k > 1 the k probabilities renormalized to sum to 1 (Shazeer's
  softmax over the top-k logits, GShard's g1/(g1+g2)) unless ``normalize_gates`` is off.
- Capacity: each expert takes at most C = ceil(capacity_factor · k · T / E) of the T tokens of
  a call; first choices take precedence over second choices, then tokens in order (GShard).
  An assignment over capacity is dropped: it contributes nothing, so a token dropped by all
  its experts gets a zero output and passes through the block's residual unchanged. In eval
  mode nothing is dropped unless ``eval_capacity_factor`` is set, so evaluation is
  position-wise: with dropping, a token's output depends on the other tokens of the batch,
  later ones included (a causal leak in a decoder; training accepts it, as Switch does).
- Auxiliary losses of the last call (:meth:`aux_losses`, already weighted):
  ``moe_balance`` = balance_weight · E · Σ_i f_i·P_i, f_i the fraction of the k·T
  assignments routed to expert i (before capacity), P_i the mean router probability of
  expert i (Switch; 1 for uniform routing); ``moe_z`` = z_loss_weight · mean over tokens of
  logsumexp(logits)² (ST-MoE). The training loop sums each over the MoE layers.
- Statistics for the metrics callback (:mod:`plugformer_plugins.ffn.moe_metrics`): after
  :meth:`record_next_call`, the next call stores a :class:`RoutingStatistics`, read with
  :meth:`take_statistics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import (
    BuildContext,
    Capabilities,
    Component,
    ConfigError,
    FeedForward,
    Registry,
    RegistryView,
    UnknownComponentError,
    bounds,
    check_bounds,
)


@dataclass
class MoEConfig:
    """``expert``: the name of a registered ffn; its options in ``expert_options``
    (``+model.ffn.expert_options.expansion=2``). ``capacity_factor``: None for no capacity
    limit (no token dropped). ``eval_capacity_factor``: None drops nothing in eval mode."""

    num_experts: int = field(default=4, metadata=bounds(ge=1))
    top_k: int = field(default=1, metadata=bounds(ge=1))
    expert: str = "mlp"
    expert_options: dict[str, Any] = field(default_factory=dict)
    capacity_factor: float | None = field(default=1.25, metadata=bounds(gt=0.0))
    eval_capacity_factor: float | None = field(default=None, metadata=bounds(gt=0.0))
    balance_weight: float = field(default=1e-2, metadata=bounds(ge=0.0))
    z_loss_weight: float = field(default=1e-3, metadata=bounds(ge=0.0))
    noisy_gating: bool = False
    normalize_gates: bool = True
    router_init_std: float = field(default=0.02, metadata=bounds(gt=0.0))


@dataclass
class RoutingStatistics:
    """What one or more calls routed: ``load`` (E,) assignments per expert before capacity,
    ``dropped`` assignments over capacity (at the capacity in effect, or, in eval mode
    without dropping, at the training ``capacity_factor``: what training would drop),
    ``entropy`` the sum over tokens of the router distribution's entropy (nats), ``tokens``."""

    load: Tensor
    dropped: Tensor
    entropy: Tensor
    tokens: Tensor

    def vector(self) -> Tensor:
        """All counts in one float64 vector (E + 3,), for summing across layers and ranks."""
        return torch.cat([self.load, self.dropped[None], self.entropy[None], self.tokens[None]]).double()

    @staticmethod
    def from_vector(vector: Tensor) -> RoutingStatistics:
        return RoutingStatistics(vector[:-3], vector[-3], vector[-2], vector[-1])

    def metrics(self) -> dict[str, float]:
        """``expert_load_<i>`` (fractions summing to 1), ``dropped_fraction`` (of the
        assignments) and ``router_entropy`` (mean nats per token; log E is uniform)."""
        assignments = max(float(self.load.sum()), 1.0)
        values = {f"expert_load_{i}": float(count) / assignments for i, count in enumerate(self.load)}
        values["dropped_fraction"] = float(self.dropped) / assignments
        values["router_entropy"] = float(self.entropy) / max(float(self.tokens), 1.0)
        return values


def expert_capacity(tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """C = ceil(factor · top_k · tokens / num_experts), at least 1."""
    return max(1, math.ceil(factor * top_k * tokens / num_experts))


def within_capacity(expert_index: Tensor, num_experts: int, capacity: int | None) -> Tensor:
    """(T, k) bool: which assignments fit their expert's ``capacity``. Slots are taken by all
    first choices in token order, then all second choices, and so on (GShard)."""
    if capacity is None:
        return torch.ones_like(expert_index, dtype=torch.bool)
    tokens, k = expert_index.shape
    one_hot = F.one_hot(expert_index.t().reshape(-1), num_experts)  # (k·T, E), choice-major
    slot = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # 1-based place in its expert's queue
    return (slot <= capacity).view(k, tokens).t()


def balance_loss(probs: Tensor, expert_index: Tensor, num_experts: int) -> Tensor:
    """E · Σ_i f_i·P_i: f_i the fraction of assignments to expert i, P_i its mean probability."""
    fraction = F.one_hot(expert_index.reshape(-1), num_experts).to(probs.dtype).mean(dim=0)
    return num_experts * (fraction * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Mean over tokens of logsumexp(logits)² (ST-MoE's router z-loss)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MixtureOfExperts(FeedForward):
    """Top-k routing over experts with capacity, auxiliary losses and routing statistics
    (the module docstring states the contract). ``layer_name`` is "<stack>_<layer index>"."""

    def __init__(self, config: MoEConfig, ctx: BuildContext, registry: Registry | RegistryView) -> None:
        super().__init__()
        component, expert_config = expert_choice(registry, config)
        self.config = config
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.layer_name = f"{ctx.stack}_{ctx.layer_index}"
        self.router = nn.Linear(ctx.d_model, config.num_experts, bias=False)
        self.noise = nn.Linear(ctx.d_model, config.num_experts, bias=False) if config.noisy_gating else None
        self.experts = nn.ModuleList(component.factory(expert_config, ctx) for _ in range(config.num_experts))
        self._losses: dict[str, Tensor] = {}
        self._record = False
        self._statistics: RoutingStatistics | None = None

    @torch.no_grad()
    def init_weights(self) -> None:
        """The router gets N(0, router_init_std) whatever a block did to the ffn's linear
        layers (DeepNorm's β is meant for the experts)."""
        nn.init.normal_(self.router.weight, std=self.config.router_init_std)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits, routing_logits = self._router_logits(flat)
        probs = routing_logits.softmax(dim=-1)
        top_p, expert_index = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True) if self.top_k > 1 and self.config.normalize_gates else top_p
        capacity = self._capacity(flat.shape[0], self.training)
        kept = within_capacity(expert_index, self.num_experts, capacity)
        out = self._dispatch(flat, expert_index, gates, kept)
        self._losses = self._weighted_losses(logits, probs, expert_index)
        if self._record:
            self._record = False
            self._statistics = self._routing_statistics(probs, expert_index, kept, capacity)
        return out.view_as(x)

    def aux_losses(self) -> dict[str, Tensor]:
        losses = dict(self._losses)
        for expert in self.experts:
            for name, value in expert.aux_losses().items():  # type: ignore[operator]
                losses[name] = losses[name] + value if name in losses else value
        return losses

    def record_next_call(self) -> None:
        """Store the routing statistics of the next call (the next forward pass only)."""
        self._record, self._statistics = True, None

    def take_statistics(self) -> RoutingStatistics | None:
        """The statistics recorded since :meth:`record_next_call`, then forgotten."""
        statistics, self._statistics, self._record = self._statistics, None, False
        return statistics

    def _router_logits(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(clean logits, routing logits), both (T, E) in at least float32."""
        dtype = torch.promote_types(flat.dtype, torch.float32)
        with torch.autocast(device_type=flat.device.type, enabled=False):
            wide = flat.to(dtype)
            logits = F.linear(wide, self.router.weight.to(dtype))
            if self.noise is None or not self.training:
                return logits, logits
            scale = F.softplus(F.linear(wide, self.noise.weight.to(dtype)))
            return logits, logits + torch.randn_like(logits) * scale

    def _capacity(self, tokens: int, training: bool) -> int | None:
        factor = self.config.capacity_factor if training else self.config.eval_capacity_factor
        return None if factor is None else expert_capacity(tokens, self.num_experts, self.top_k, factor)

    def _dispatch(self, flat: Tensor, expert_index: Tensor, gates: Tensor, kept: Tensor) -> Tensor:
        """Σ over kept assignments of gate · expert(token), one batched call per expert, in
        the input's dtype (under autocast experts may compute in a lower one). Every expert is
        called, with no tokens if need be, so DDP sees all parameters used."""
        out = torch.zeros_like(flat)
        token = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(expert_index)
        for index, expert in enumerate(self.experts):
            chosen = (expert_index == index) & kept
            rows = token[chosen]
            y = expert(flat[rows][None])[0]
            out = out.index_add(0, rows, (y * gates[chosen][:, None].to(y.dtype)).to(out.dtype))
        return out

    def _weighted_losses(self, logits: Tensor, probs: Tensor, expert_index: Tensor) -> dict[str, Tensor]:
        losses = {}
        if self.config.balance_weight > 0:
            losses["moe_balance"] = self.config.balance_weight * balance_loss(probs, expert_index, self.num_experts)
        if self.config.z_loss_weight > 0:
            losses["moe_z"] = self.config.z_loss_weight * z_loss(logits)
        return losses

    @torch.no_grad()
    def _routing_statistics(self, probs: Tensor, expert_index: Tensor, kept: Tensor, capacity: int | None) -> RoutingStatistics:
        tokens = probs.shape[0]
        if capacity is None and self.config.capacity_factor is not None:  # what training would drop
            kept = within_capacity(expert_index, self.num_experts, self._capacity(tokens, True))
        load = torch.bincount(expert_index.reshape(-1), minlength=self.num_experts)
        return RoutingStatistics(
            load=load.double(),
            dropped=(~kept).sum().double(),
            entropy=torch.special.entr(probs).sum().double(),
            tokens=torch.tensor(float(tokens), dtype=torch.float64, device=probs.device),
        )


def expert_choice(registry: Registry | RegistryView, config: MoEConfig) -> tuple[Component, Any]:
    """The expert's component and its config object, checked: raises ConfigError for an
    unknown or MoE expert, bad expert options, or top_k above num_experts."""
    if config.top_k > config.num_experts:
        raise ConfigError(
            f"The moe ffn routes each token to top_k={config.top_k} of num_experts={config.num_experts} experts.",
            expected="top_k ≤ num_experts",
            fix="lower model.ffn.top_k or raise model.ffn.num_experts",
        )
    if config.expert == "moe":
        raise ConfigError("The moe ffn's experts would be moe layers themselves.", expected="a dense ffn such as mlp or glu", fix="set model.ffn.expert=mlp")
    try:
        component = registry.get("ffn", config.expert)
    except UnknownComponentError as error:
        raise ConfigError(
            f"The moe ffn's expert={config.expert!r} is not a registered ffn.",
            expected=f"one of: {', '.join(n for n in registry.names('ffn') if n != 'moe')}",
            fix="set model.ffn.expert=<name>",
        ) from error
    from omegaconf import OmegaConf  # when a model is built, not when plugins load

    options = OmegaConf.to_container(config.expert_options) if OmegaConf.is_config(config.expert_options) else dict(config.expert_options or {})
    try:
        expert_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(component.config), options))
    except Exception as error:  # noqa: BLE001 - OmegaConf raises several types
        raise ConfigError(
            f"The moe ffn's expert_options {options} do not fit ffn {config.expert!r}: {error}",
            fix=f"set only options of {config.expert!r} (`plugformer plugins` lists them) under model.ffn.expert_options",
        ) from None
    check_bounds(expert_config, "model.ffn.expert_options")
    return component, expert_config


def make_component(registry: RegistryView | Registry) -> Component:
    """The ``moe`` component, building its experts through ``registry`` (the view
    :func:`register_components` receives). The expert is looked up only when the moe is
    built or its capabilities are asked for, after every plugin has registered, so an ffn of
    any plugin, loaded before or after this one, can be an expert. Its capabilities are its
    expert's, and computing them checks the config, so a bad expert is refused before any
    data is built."""

    def build_moe(config: MoEConfig, ctx: BuildContext) -> MixtureOfExperts:
        return MixtureOfExperts(config, ctx, registry)

    def capabilities(config: MoEConfig) -> Capabilities:
        component, expert_config = expert_choice(registry, config)
        return component.capabilities_for(expert_config)

    return Component(
        kind="ffn",
        name="moe",
        factory=build_moe,
        config=MoEConfig,
        summary="Mixture of experts: top-1 (Switch) or top-k routing, capacity, balance and z-losses.",
        reference="Shazeer et al. 2017; Lepikhin et al. 2021 (GShard); Fedus et al. 2022 (Switch); Zoph et al. 2022 (ST-MoE)",
        capabilities=capabilities,
    )
