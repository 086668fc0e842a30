"""Cost and energy accounting: pure arithmetic over a usage dict, a price table and energy profiles.

Nothing here does I/O, keeps state or knows about metrics: the caller parses ``config/prices.yaml``
once with :func:`parse_prices`, then calls :func:`account` per backend call (spent) or per cache
hit / coalesced follower (saved, with the usage of the answer that was reused). Every formula and
every default figure is explained in ``docs/accounting.md``; the per-token energy defaults for the
DeepSeek upstream come from :func:`derive_per_token_energy`, so the document, the YAML and the
tests agree on one derivation.

Units: USD, joules, grams CO2e, kWh. Prices are USD per 1,000,000 tokens.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: prices in the table are per this many tokens
TOKENS_PER_PRICE_UNIT = 1_000_000
#: 1 kWh = 1000 W x 3600 s
JOULES_PER_KWH = 3_600_000.0

Method = Literal["estimated", "measured"]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


# --------------------------------------------------------------------------- unit helpers


def kwh(joules_: float) -> float:
    """Joules to kilowatt-hours."""
    return joules_ / JOULES_PER_KWH


def joules(kwh_: float) -> float:
    """Kilowatt-hours to joules."""
    return kwh_ * JOULES_PER_KWH


def gpu_hours_per_day(nodes: float, gpus_per_node: int, hours: float = 24.0) -> float:
    """GPU-hours a fleet of ``nodes`` (an average, so possibly fractional) runs in ``hours``."""
    return nodes * gpus_per_node * hours


# --------------------------------------------------------------------------- price table


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Frozen):
    """USD per 1M tokens for one model."""

    #: prompt tokens the provider served from its own prompt cache
    input_cache_hit: NonNegative
    #: prompt tokens the provider had to process
    input_cache_miss: NonNegative
    #: completion tokens, reasoning tokens included
    output: NonNegative


class EnergyProfile(_Frozen):
    """Energy model of one backend. Token and request figures are IT energy (before PUE)."""

    joules_per_input_token: NonNegative = 0.0
    joules_per_output_token: NonNegative = 0.0
    joules_per_request: NonNegative = 0.0
    #: power usage effectiveness: facility energy / IT energy
    pue: float = Field(ge=1.0, le=10.0, allow_inf_nan=False)
    #: grid carbon intensity, grams CO2e per kWh
    grid_gco2_per_kwh: NonNegative
    #: electricity price used to put a dollar figure on the energy
    usd_per_kwh: NonNegative
    #: "measured": the caller supplies measured joules (NVML) and the per-token figures are
    #: only the fallback when no measurement is available
    method: Method = "estimated"

    @model_validator(mode="after")
    def _some_energy_figure(self) -> Self:
        given = {"joules_per_input_token", "joules_per_output_token", "joules_per_request"}
        if not given & self.model_fields_set:
            raise ValueError("an energy profile needs joules_per_input_token, "
                             "joules_per_output_token or joules_per_request")
        return self


class PriceTable(_Frozen):
    """Prices per model and energy profiles per backend; keys are fnmatch patterns, first match wins."""

    models: dict[str, Price] = Field(default_factory=dict)
    energy: dict[str, EnergyProfile] = Field(default_factory=dict)

    def lookup(self, model: str) -> Price | None:
        """The price of ``model``, or None when it is unpriced (the caller warns once)."""
        for pattern, price in self.models.items():
            if fnmatch.fnmatchcase(model, pattern):
                return price
        return None

    def profile(self, backend: str) -> EnergyProfile | None:
        """The energy profile of the backend called ``backend``, or None when it has none."""
        for pattern, profile in self.energy.items():
            if fnmatch.fnmatchcase(backend, pattern):
                return profile
        return None


def parse_prices(text: str) -> PriceTable:
    """Parse the YAML text of a price table (``config/prices.yaml``). Raises ValueError."""
    try:
        data: object = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"prices: not valid YAML: {exc}") from exc
    if data is None:
        return PriceTable()
    if not isinstance(data, dict):
        raise ValueError("prices: the top level must be a mapping with 'models' and 'energy'")
    return PriceTable.model_validate(data)  # ValidationError is a ValueError


# --------------------------------------------------------------------------- usage


def _count(value: object) -> int | None:
    """A token count from untrusted JSON: a non-negative integer, else None (absent/garbage)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and math.isfinite(value) and value >= 0 and value.is_integer():
        return int(value)
    return None


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = usage.get(key)
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call. ``reasoning`` is part of ``completion``, not added to it."""

    prompt_cache_hit: int = 0
    prompt_cache_miss: int = 0
    completion: int = 0
    reasoning: int = 0

    @property
    def prompt(self) -> int:
        return self.prompt_cache_hit + self.prompt_cache_miss

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    @classmethod
    def from_dict(cls, usage: Mapping[str, Any] | None) -> Usage:
        """Read an OpenAI / DeepSeek ``usage`` object; missing or malformed fields count as 0.

        Prompt tokens split into provider-cache hit and miss using DeepSeek's
        ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens`` when present, else OpenAI's
        ``prompt_tokens_details.cached_tokens``, else all miss. ``prompt_tokens`` stays the total
        when it is given; the hit count is clamped to it.
        """
        if not isinstance(usage, Mapping):
            return cls()
        prompt = _count(usage.get("prompt_tokens"))
        hit = _count(usage.get("prompt_cache_hit_tokens"))
        miss = _count(usage.get("prompt_cache_miss_tokens"))
        if hit is None and miss is None:
            hit = _count(_details(usage, "prompt_tokens_details").get("cached_tokens"))
        if prompt is None:
            prompt = (hit or 0) + (miss or 0)
        if hit is None:
            hit = prompt - miss if miss is not None else 0
        hit = max(0, min(hit, prompt))
        completion = _count(usage.get("completion_tokens")) or 0
        reasoning = _count(_details(usage, "completion_tokens_details").get("reasoning_tokens")) or 0
        # reasoning tokens are billed as output: the completion count is at least that many
        completion = max(completion, reasoning)
        return cls(prompt_cache_hit=hit, prompt_cache_miss=prompt - hit,
                   completion=completion, reasoning=reasoning)


# --------------------------------------------------------------------------- formulas


def cost_usd(usage: Usage, price: Price) -> float:
    """What the provider bills for ``usage``: hit, miss and output tokens at their own rates."""
    return (usage.prompt_cache_hit * price.input_cache_hit
            + usage.prompt_cache_miss * price.input_cache_miss
            + usage.completion * price.output) / TOKENS_PER_PRICE_UNIT


def it_joules(usage: Usage, profile: EnergyProfile) -> float:
    """Estimated IT energy (servers only, before PUE) of one call."""
    return (usage.prompt * profile.joules_per_input_token
            + usage.completion * profile.joules_per_output_token
            + profile.joules_per_request)


def energy_joules(usage: Usage, profile: EnergyProfile) -> float:
    """Estimated facility energy of one call: IT energy x PUE."""
    return it_joules(usage, profile) * profile.pue


def co2_grams(joules_: float, profile: EnergyProfile) -> float:
    """Grams CO2e for ``joules_`` of facility energy on the profile's grid."""
    return kwh(joules_) * profile.grid_gco2_per_kwh


def electricity_usd(joules_: float, profile: EnergyProfile) -> float:
    """The electricity bill for ``joules_`` of facility energy at the profile's tariff."""
    return kwh(joules_) * profile.usd_per_kwh


@dataclass(frozen=True, slots=True)
class Account:
    """The figures for one call. ``usd`` is None when the model has no price (``priced`` False)."""

    tokens_prompt: int
    tokens_completion: int
    usd: float | None
    joules: float
    co2_g: float
    priced: bool
    #: the dollar value of ``joules`` at the backend's tariff (0.0 without an energy profile)
    electricity_usd: float
    #: how ``joules`` was obtained; None when the backend has no energy profile
    method: Method | None
    usage: Usage


def account(usage: Mapping[str, Any] | Usage | None, model: str, backend: str, table: PriceTable,
            *, measured_joules: float | None = None) -> Account:
    """Cost, energy and CO2 of one call of ``model`` on ``backend``.

    ``measured_joules`` is IT energy measured for this call (NVML power x time on a local GPU); it
    replaces the profile's estimate and is labelled ``measured``. PUE applies to both. Without an
    energy profile the measured energy is still reported (PUE 1, no CO2 or electricity figure);
    without either, energy is 0.0 and ``method`` None.
    """
    counts = usage if isinstance(usage, Usage) else Usage.from_dict(usage)
    price = table.lookup(model)
    profile = table.profile(backend)
    measured = measured_joules
    if measured is not None and not (math.isfinite(measured) and measured >= 0.0):
        measured = None
    energy = 0.0
    co2 = 0.0
    bill = 0.0
    method: Method | None = None
    if profile is not None:
        energy = measured * profile.pue if measured is not None else energy_joules(counts, profile)
        method = "measured" if measured is not None else "estimated"
        co2 = co2_grams(energy, profile)
        bill = electricity_usd(energy, profile)
    elif measured is not None:
        energy = measured
        method = "measured"
    return Account(
        tokens_prompt=counts.prompt,
        tokens_completion=counts.completion,
        usd=cost_usd(counts, price) if price is not None else None,
        joules=energy,
        co2_g=co2,
        priced=price is not None,
        electricity_usd=bill,
        method=method,
        usage=counts,
    )


# --------------------------------------------------------------------------- derivation


@dataclass(frozen=True, slots=True)
class FleetDay:
    """One day of a serving fleet, as published, plus the node power we assume."""

    #: average number of nodes serving over the day
    nodes: float
    gpus_per_node: int
    #: assumed electrical draw of one node, kW (IT only)
    node_kw: float
    input_tokens: float
    output_tokens: float
    #: published average prefill throughput of one node, input tokens/s
    prefill_tokens_per_s_per_node: float
    #: published average decode throughput of one node, output tokens/s
    decode_tokens_per_s_per_node: float
    hours: float = 24.0


#: DeepSeek, "Day 6: One More Thing, DeepSeek-V3/R1 Inference System Overview" (2025-03-01),
#: 24 h from 2025-02-27 12:00 UTC+8: 226.75 nodes x 8 H800 on average, 608B input tokens
#: (56.3% on-disk cache hits), 168B output tokens, ~73.7k input tok/s per node in prefill and
#: ~14.8k output tok/s per node in decode. node_kw 10.2 is OUR ASSUMPTION (NVIDIA DGX H100
#: maximum system power, applied to an 8x H800 node); see docs/accounting.md.
DEEPSEEK_V3_R1_FLEET_DAY = FleetDay(
    nodes=226.75,
    gpus_per_node=8,
    node_kw=10.2,
    input_tokens=608e9,
    output_tokens=168e9,
    prefill_tokens_per_s_per_node=73_700.0,
    decode_tokens_per_s_per_node=14_800.0,
)


@dataclass(frozen=True, slots=True)
class PerTokenEnergy:
    """IT energy per token derived from a fleet day (multiply by PUE for facility energy)."""

    joules_per_input_token: float
    joules_per_output_token: float
    #: the fleet's IT energy for the day, kWh
    fleet_kwh_per_day: float
    #: how many input tokens cost as much as one output token
    output_to_input_ratio: float
    gpu_hours_per_day: float


def derive_per_token_energy(fleet: FleetDay = DEEPSEEK_V3_R1_FLEET_DAY) -> PerTokenEnergy:
    """Split a fleet's daily energy between input and output tokens by node-time.

    A node spends ``1 / prefill_tps`` seconds on an input token and ``1 / decode_tps`` seconds on
    an output token, so an output token costs ``prefill_tps / decode_tps`` input tokens. The whole
    day's energy is shared out on that ratio, so the per-token figures add back up to it exactly:
    ``E = J_in x input_tokens + J_out x output_tokens``.
    """
    day_kwh = fleet.nodes * fleet.node_kw * fleet.hours
    ratio = fleet.prefill_tokens_per_s_per_node / fleet.decode_tokens_per_s_per_node
    per_input = joules(day_kwh) / (fleet.input_tokens + fleet.output_tokens * ratio)
    return PerTokenEnergy(
        joules_per_input_token=per_input,
        joules_per_output_token=per_input * ratio,
        fleet_kwh_per_day=day_kwh,
        output_to_input_ratio=ratio,
        gpu_hours_per_day=gpu_hours_per_day(fleet.nodes, fleet.gpus_per_node, fleet.hours),
    )
