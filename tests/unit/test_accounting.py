"""accounting is pure arithmetic: seed figures reproduced exactly, usage parsing, cost, energy,
and the per-token defaults in config/prices.yaml checked against the derivation that produced them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.accounting import (
    DEEPSEEK_V3_R1_FLEET_DAY,
    JOULES_PER_KWH,
    EnergyProfile,
    FleetDay,
    Price,
    PriceTable,
    Usage,
    account,
    co2_grams,
    cost_usd,
    derive_per_token_energy,
    electricity_usd,
    energy_joules,
    gpu_hours_per_day,
    it_joules,
    joules,
    kwh,
    parse_prices,
)

PRICES_YAML = Path(__file__).resolve().parents[2] / "config" / "prices.yaml"
TABLE = parse_prices(PRICES_YAML.read_text(encoding="utf-8"))
SEED_QUERY = EnergyProfile(joules_per_request=joules(0.002), pue=1.0, grid_gco2_per_kwh=0.0,
                           usd_per_kwh=0.10)


# --------------------------------------------------------------------------- seed arithmetic


@pytest.mark.parametrize(("pue", "kwh_total", "usd_total"), [
    (1.0, 20_000.0, 2_000.0),   # 10M queries x 0.002 kWh = 20,000 kWh; x $0.10 = $2,000
    (1.5, 30_000.0, 3_000.0),   # with PUE 1.5: $3,000
])
def test_seed_queries_reproduce_exactly(pue: float, kwh_total: float, usd_total: float) -> None:
    profile = SEED_QUERY.model_copy(update={"pue": pue})
    per_query = energy_joules(Usage(), profile)
    total = 10_000_000 * per_query
    assert joules(0.002) == 7_200.0
    assert kwh(total) == kwh_total
    assert electricity_usd(total, profile) == usd_total


def test_seed_it_energy_without_pue_is_20000_kwh() -> None:
    profile = SEED_QUERY.model_copy(update={"pue": 1.5})
    assert kwh(10_000_000 * it_joules(Usage(), profile)) == 20_000.0


@pytest.mark.parametrize(("nodes", "gpus", "hours", "expected"), [
    (226.75, 8, 24.0, 43_536.0),   # DeepSeek's average fleet: 1,814 GPUs x 24 h
    (226.75, 8, 1.0, 1_814.0),
    (1, 8, 24.0, 192.0),
    (0, 8, 24.0, 0.0),
])
def test_gpu_hours_per_day(nodes: float, gpus: int, hours: float, expected: float) -> None:
    assert gpu_hours_per_day(nodes, gpus, hours) == expected


def test_gpu_hours_default_day() -> None:
    assert gpu_hours_per_day(226.75, 8) == 43_536.0


@pytest.mark.parametrize(("kwh_", "joules_"), [(1.0, 3_600_000.0), (0.002, 7_200.0), (0.0, 0.0),
                                              (20_000.0, 7.2e10)])
def test_unit_conversions(kwh_: float, joules_: float) -> None:
    assert joules(kwh_) == joules_
    assert kwh(joules_) == kwh_
    assert JOULES_PER_KWH == 3.6e6


# --------------------------------------------------------------------------- usage parsing


USAGE_CASES: list[tuple[str, Any, Usage]] = [
    ("deepseek split", {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                        "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36},
     Usage(prompt_cache_hit=64, prompt_cache_miss=36, completion=20)),
    ("deepseek split wins over openai details",
     {"prompt_tokens": 100, "prompt_cache_hit_tokens": 10, "prompt_cache_miss_tokens": 90,
      "prompt_tokens_details": {"cached_tokens": 50}, "completion_tokens": 1},
     Usage(prompt_cache_hit=10, prompt_cache_miss=90, completion=1)),
    ("deepseek split without prompt_tokens", {"prompt_cache_hit_tokens": 7, "prompt_cache_miss_tokens": 3},
     Usage(prompt_cache_hit=7, prompt_cache_miss=3)),
    ("deepseek hit only", {"prompt_tokens": 50, "prompt_cache_hit_tokens": 30},
     Usage(prompt_cache_hit=30, prompt_cache_miss=20)),
    ("deepseek miss only", {"prompt_tokens": 50, "prompt_cache_miss_tokens": 45},
     Usage(prompt_cache_hit=5, prompt_cache_miss=45)),
    ("hit clamped to prompt_tokens", {"prompt_tokens": 10, "prompt_cache_hit_tokens": 99,
                                      "prompt_cache_miss_tokens": 0},
     Usage(prompt_cache_hit=10, prompt_cache_miss=0)),
    ("openai cached_tokens", {"prompt_tokens": 2006, "completion_tokens": 300,
                              "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0}},
     Usage(prompt_cache_hit=1920, prompt_cache_miss=86, completion=300)),
    ("openai details null", {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": None},
     Usage(prompt_cache_miss=12, completion=3)),
    ("no cache information: all miss", {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
     Usage(prompt_cache_miss=12, completion=3)),
    ("reasoning tokens are part of completion",
     {"prompt_tokens": 10, "completion_tokens": 500, "prompt_cache_hit_tokens": 0,
      "prompt_cache_miss_tokens": 10, "completion_tokens_details": {"reasoning_tokens": 420}},
     Usage(prompt_cache_miss=10, completion=500, reasoning=420)),
    ("reasoning larger than completion raises completion",
     {"completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 8}},
     Usage(completion=8, reasoning=8)),
    ("zero usage", {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, Usage()),
    ("empty usage", {}, Usage()),
    ("missing usage", None, Usage()),
    ("usage not an object", [1, 2, 3], Usage()),
    ("garbage values ignored", {"prompt_tokens": "12", "completion_tokens": -4,
                                "prompt_cache_hit_tokens": True, "prompt_tokens_details": "x"},
     Usage()),
    ("integral floats accepted", {"prompt_tokens": 12.0, "completion_tokens": 3.5},
     Usage(prompt_cache_miss=12)),
    ("non-finite float ignored", {"prompt_tokens": math.inf, "completion_tokens": 2},
     Usage(completion=2)),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES])
def test_usage_from_dict(raw: Any, expected: Usage) -> None:
    usage = Usage.from_dict(raw)
    assert usage == expected
    assert usage.prompt == expected.prompt_cache_hit + expected.prompt_cache_miss
    assert usage.total == usage.prompt + usage.completion
    assert usage.reasoning <= usage.completion


# --------------------------------------------------------------------------- cost


COST_CASES: list[tuple[str, Usage, float]] = [
    ("1M of each", Usage(prompt_cache_hit=1_000_000, prompt_cache_miss=1_000_000, completion=1_000_000),
     0.028 + 0.28 + 0.42),
    ("deepseek hit/miss split", Usage(prompt_cache_hit=64, prompt_cache_miss=36, completion=20),
     (64 * 0.028 + 36 * 0.28 + 20 * 0.42) / 1e6),
    ("all miss", Usage(prompt_cache_miss=1000, completion=100), (1000 * 0.28 + 100 * 0.42) / 1e6),
    ("all hit", Usage(prompt_cache_hit=1000), 1000 * 0.028 / 1e6),
    ("reasoning not charged twice", Usage(prompt_cache_miss=10, completion=500, reasoning=420),
     (10 * 0.28 + 500 * 0.42) / 1e6),
    ("zero", Usage(), 0.0),
]


@pytest.mark.parametrize(("usage", "expected"), [c[1:] for c in COST_CASES], ids=[c[0] for c in COST_CASES])
@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_cost_usd(model: str, usage: Usage, expected: float) -> None:
    price = TABLE.lookup(model)
    assert price is not None
    assert cost_usd(usage, price) == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_cache_hit_split_saves_against_all_miss() -> None:
    split = Usage.from_dict({"prompt_tokens": 1_000_000, "prompt_cache_hit_tokens": 563_000,
                             "prompt_cache_miss_tokens": 437_000})
    price = TABLE.lookup("deepseek-chat")
    assert price is not None
    assert cost_usd(split, price) == pytest.approx(0.563 * 0.028 + 0.437 * 0.28, rel=1e-12)
    assert cost_usd(Usage(prompt_cache_miss=1_000_000), price) == pytest.approx(0.28, rel=1e-12)


def test_openai_cached_tokens_priced_at_hit_rate() -> None:
    table = PriceTable(models={"gpt-4o*": Price(input_cache_hit=1.25, input_cache_miss=2.5, output=10.0)})
    acc = account({"prompt_tokens": 2006, "completion_tokens": 300,
                   "prompt_tokens_details": {"cached_tokens": 1920}}, "gpt-4o-2024-08-06", "openai", table)
    assert acc.priced
    assert acc.usd == pytest.approx((1920 * 1.25 + 86 * 2.5 + 300 * 10.0) / 1e6, rel=1e-12)
    assert (acc.tokens_prompt, acc.tokens_completion) == (2006, 300)


# --------------------------------------------------------------------------- lookup and account


@pytest.mark.parametrize(("models", "model", "expected_output"), [
    ({"deepseek-chat": 1.0, "deepseek-*": 2.0}, "deepseek-chat", 1.0),
    ({"deepseek-*": 2.0, "deepseek-chat": 1.0}, "deepseek-chat", 2.0),   # first match wins
    ({"deepseek-*": 2.0}, "deepseek-reasoner", 2.0),
    ({"deepseek-*": 2.0}, "DeepSeek-chat", None),                        # case-sensitive
    ({"*": 3.0}, "anything", 3.0),
    ({}, "deepseek-chat", None),
])
def test_lookup_first_match_wins(models: dict[str, float], model: str, expected_output: float | None) -> None:
    table = PriceTable(models={k: Price(input_cache_hit=0, input_cache_miss=0, output=v)
                               for k, v in models.items()})
    price = table.lookup(model)
    assert (price.output if price else None) == expected_output


def test_default_table_prices_both_models_and_not_others() -> None:
    for model in ("deepseek-chat", "deepseek-reasoner"):
        assert TABLE.lookup(model) == Price(input_cache_hit=0.028, input_cache_miss=0.28, output=0.42)
    assert TABLE.lookup("gpt-4o") is None


def test_unpriced_model_counts_tokens_and_energy_but_no_usd() -> None:
    acc = account({"prompt_tokens": 100, "completion_tokens": 10}, "mystery-model", "deepseek", TABLE)
    assert acc.priced is False
    assert acc.usd is None
    assert (acc.tokens_prompt, acc.tokens_completion) == (100, 10)
    assert acc.joules > 0 and acc.co2_g > 0 and acc.method == "estimated"


def test_account_deepseek_estimate() -> None:
    raw = {"prompt_tokens": 1000, "completion_tokens": 300, "prompt_cache_hit_tokens": 600,
           "prompt_cache_miss_tokens": 400}
    acc = account(raw, "deepseek-chat", "deepseek", TABLE)
    profile = TABLE.profile("deepseek")
    assert profile is not None
    expected_j = (1000 * 0.1383 + 300 * 0.6888) * 1.5
    assert acc.joules == pytest.approx(expected_j, rel=1e-12)
    assert acc.co2_g == pytest.approx(expected_j / 3.6e6 * 582, rel=1e-12)
    assert acc.electricity_usd == pytest.approx(expected_j / 3.6e6 * 0.10, rel=1e-12)
    assert acc.usd == pytest.approx((600 * 0.028 + 400 * 0.28 + 300 * 0.42) / 1e6, rel=1e-12)
    assert acc.priced and acc.method == "estimated"
    assert acc.usage == Usage(prompt_cache_hit=600, prompt_cache_miss=400, completion=300)
    assert co2_grams(acc.joules, profile) == acc.co2_g


@pytest.mark.parametrize("raw", [None, {}, {"prompt_tokens": 0, "completion_tokens": 0}])
def test_account_zero_or_missing_usage(raw: Any) -> None:
    acc = account(raw, "deepseek-chat", "deepseek", TABLE)
    assert (acc.tokens_prompt, acc.tokens_completion, acc.usd, acc.joules, acc.co2_g) == (0, 0, 0.0, 0.0, 0.0)
    assert acc.priced
    # a per-request figure is still charged for a call that reported no tokens
    local = account(raw, "llama", "local", TABLE)
    assert local.joules == 7200 * 1.5
    assert local.usd is None and not local.priced


def test_account_accepts_a_usage() -> None:
    usage = Usage(prompt_cache_miss=5, completion=2)
    assert account(usage, "deepseek-chat", "deepseek", TABLE).usage is usage


@pytest.mark.parametrize(("backend", "measured", "joules_", "method"), [
    ("local", 1000.0, 1500.0, "measured"),       # measured IT energy x PUE 1.5
    ("local", None, 7200.0 * 1.5, "estimated"),  # fallback: the per-request estimate
    ("local", math.nan, 7200.0 * 1.5, "estimated"),
    ("local", -1.0, 7200.0 * 1.5, "estimated"),
    ("nowhere", 1000.0, 1000.0, "measured"),     # no profile: the measurement as is
    ("nowhere", None, 0.0, None),                # no profile, no measurement: no energy
])
def test_account_measured_energy(backend: str, measured: float | None, joules_: float,
                                 method: str | None) -> None:
    acc = account({"prompt_tokens": 3, "completion_tokens": 4}, "deepseek-chat", backend, TABLE,
                  measured_joules=measured)
    assert acc.joules == joules_
    assert acc.method == method
    if backend == "nowhere":
        assert acc.co2_g == 0.0 and acc.electricity_usd == 0.0
    else:
        assert acc.co2_g == pytest.approx(joules_ / 3.6e6 * 480, rel=1e-12)


# --------------------------------------------------------------------------- the price file


def test_prices_yaml_loads() -> None:
    with open(PRICES_YAML, encoding="utf-8") as f:
        table = parse_prices(f.read())
    assert set(table.models) == {"deepseek-chat", "deepseek-reasoner"}
    assert set(table.energy) == {"deepseek", "local"}
    assert table.energy["local"].method == "measured"
    assert table.energy["deepseek"].method == "estimated"


def test_yaml_energy_matches_the_derivation() -> None:
    derived = derive_per_token_energy()
    profile = TABLE.profile("deepseek")
    assert profile is not None
    assert profile.joules_per_input_token == float(f"{derived.joules_per_input_token:.4g}")
    assert profile.joules_per_output_token == float(f"{derived.joules_per_output_token:.4g}")
    assert profile.pue == 1.5 and profile.usd_per_kwh == 0.10 and profile.grid_gco2_per_kwh == 582


def test_derivation_figures() -> None:
    d = derive_per_token_energy(DEEPSEEK_V3_R1_FLEET_DAY)
    assert d.gpu_hours_per_day == 43_536.0
    assert d.fleet_kwh_per_day == pytest.approx(55_508.4, rel=1e-12)   # 226.75 x 10.2 kW x 24 h
    assert d.output_to_input_ratio == pytest.approx(73.7 / 14.8, rel=1e-12)
    assert d.joules_per_input_token == pytest.approx(0.138330, rel=1e-5)
    assert d.joules_per_output_token == pytest.approx(0.688844, rel=1e-5)
    # the split conserves the day's energy
    fleet = DEEPSEEK_V3_R1_FLEET_DAY
    total = d.joules_per_input_token * fleet.input_tokens + d.joules_per_output_token * fleet.output_tokens
    assert total == pytest.approx(joules(d.fleet_kwh_per_day), rel=1e-12)


def test_derivation_with_equal_throughput_is_a_flat_split() -> None:
    fleet = FleetDay(nodes=1, gpus_per_node=8, node_kw=10.0, input_tokens=3.6e6, output_tokens=0.0,
                     prefill_tokens_per_s_per_node=1.0, decode_tokens_per_s_per_node=1.0, hours=1.0)
    d = derive_per_token_energy(fleet)
    assert d.joules_per_input_token == d.joules_per_output_token == 10.0   # 10 kWh / 3.6M tokens


def test_published_throughput_accounts_for_the_fleet_day() -> None:
    """Sanity check of the split rule: node-time implied by the published per-node throughputs
    (prefill + decode) comes within 0.1% of the fleet's 226.75 x 24 node-hours."""
    f = DEEPSEEK_V3_R1_FLEET_DAY
    node_hours = (f.input_tokens / f.prefill_tokens_per_s_per_node
                  + f.output_tokens / f.decode_tokens_per_s_per_node) / 3600
    assert node_hours == pytest.approx(f.nodes * f.hours, rel=1e-3)


@pytest.mark.parametrize(("text", "error"), [
    ("models: [1, 2]", ValidationError),
    ("- a\n- b\n", ValueError),
    ("models: {x: {input_cache_hit: 1, input_cache_miss: 1}}", ValidationError),          # no output
    ("models: {x: {input_cache_hit: -1, input_cache_miss: 1, output: 1}}", ValidationError),
    ("models: {x: {input_cache_hit: 1, input_cache_miss: 1, output: 1, extra: 1}}", ValidationError),
    ("energy: {b: {pue: 1.2, grid_gco2_per_kwh: 1, usd_per_kwh: 1}}", ValidationError),    # no joules
    ("energy: {b: {joules_per_request: 1, pue: 0.9, grid_gco2_per_kwh: 1, usd_per_kwh: 1}}",
     ValidationError),
    ("energy: {b: {joules_per_request: 1, pue: 1, grid_gco2_per_kwh: 1, usd_per_kwh: 1, method: guessed}}",
     ValidationError),
    ("colour: blue", ValidationError),
    ("models: {x: [unclosed", ValueError),
])
def test_parse_prices_rejects(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_prices(text)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "models: {}\nenergy: {}\n"])
def test_parse_prices_empty(text: str) -> None:
    table = parse_prices(text)
    assert table.lookup("deepseek-chat") is None and table.profile("deepseek") is None


def test_models_are_frozen() -> None:
    price = TABLE.lookup("deepseek-chat")
    assert price is not None
    with pytest.raises(ValidationError):
        price.output = 1.0  # type: ignore[misc]
