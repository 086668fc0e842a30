"""Measured GPU energy (proxy/energy.py) with fake power readers and clocks; no GPU needed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.accounting import account, parse_prices
from proxy.config import BackendConfig, Config
from proxy.energy import EnergyMeter, EnergyUnavailable, NvmlPowerReader, energy_meter, metered_backends


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ConstantReader:
    def __init__(self, watts: float) -> None:
        self.value = watts
        self.reads = 0
        self.closed = False

    def watts(self) -> float:
        self.reads += 1
        return self.value

    def close(self) -> None:
        self.closed = True


def meter(clock: FakeClock, watts: float | None = None) -> EnergyMeter:
    m = EnergyMeter(ConstantReader(watts or 0.0), ["local"], clock=clock)
    if watts is not None:
        m.record(watts, clock.now)
    return m


def test_one_call_gets_power_times_time() -> None:
    clock = FakeClock()
    m = meter(clock, 100.0)
    call = m.begin("local")
    clock.now = 0.5
    m.record(100.0)
    clock.now = 1.0
    m.record(300.0)          # trapezoid: (100 + 300) / 2 W over 0.5 s
    clock.now = 1.25         # the last reading (300 W) until the end
    assert m.end(call) == pytest.approx(100 * 0.5 + 200 * 0.5 + 300 * 0.25)


def test_overlapping_calls_share_power_and_add_up_to_the_total() -> None:
    clock = FakeClock()
    m = meter(clock, 100.0)
    a = m.begin("local")
    clock.now = 1.0
    m.record(100.0)          # 0-1 s: A alone, 100 J
    b = m.begin("local")
    clock.now = 2.0
    m.record(200.0)          # 1-2 s: mean 150 W, 150 J shared: 75 each
    assert m.end(a) == pytest.approx(175.0)
    clock.now = 3.0
    m.record(200.0)          # 2-3 s: B alone, 200 J
    assert m.end(b) == pytest.approx(275.0)
    assert m.total_joules == pytest.approx(450.0)


def test_time_with_no_call_in_flight_is_charged_to_nobody() -> None:
    clock = FakeClock()
    m = meter(clock, 80.0)
    clock.now = 10.0
    m.record(80.0)
    call = m.begin("local")
    clock.now = 11.0
    m.record(80.0)
    assert m.end(call) == pytest.approx(80.0)
    assert m.total_joules == pytest.approx(80.0)


def test_end_is_idempotent_and_stops_accruing() -> None:
    clock = FakeClock()
    m = meter(clock, 50.0)
    call = m.begin("local")
    clock.now = 2.0
    first = m.end(call)
    clock.now = 5.0
    m.record(50.0)
    assert m.end(call) == first == pytest.approx(100.0)


def test_a_stale_reading_from_an_idle_period_is_not_averaged_in() -> None:
    clock = FakeClock()
    m = EnergyMeter(ConstantReader(0), ["local"], clock=clock)
    m.record(60.0)           # idle power, long ago
    m._fresh = False         # what the sampler does when it goes idle
    call = m.begin("local")
    clock.now = 0.1
    m.record(400.0)          # the first reading under load covers the whole first interval
    assert m.end(call) == pytest.approx(40.0)


def test_negative_or_nan_readings_are_ignored() -> None:
    clock = FakeClock()
    m = meter(clock, 100.0)
    call = m.begin("local")
    clock.now = 1.0
    m.record(float("nan"))
    m.record(-5.0)
    assert m.samples == 1
    assert m.end(call) == pytest.approx(100.0)


async def test_track_and_take_measure_one_call_with_the_sampler() -> None:
    reader = ConstantReader(250.0)
    m = EnergyMeter(reader, ["local"], interval_s=0.02)
    await m.start()
    try:
        seen: list[float | None] = []

        async def backend_call() -> None:
            await asyncio.sleep(0.3)
            seen.append(m.take("local"))

        await m.track("local", backend_call())
    finally:
        await m.close()
    (joules,) = seen
    assert joules is not None
    assert joules == pytest.approx(250.0 * 0.3, rel=0.25)
    assert reader.reads >= 5           # sampled while the call ran
    assert reader.closed


async def test_concurrent_tracked_calls_split_the_energy() -> None:
    m = EnergyMeter(ConstantReader(200.0), ["local"], interval_s=0.02)
    await m.start()
    results: dict[str, float | None] = {}

    async def call(name: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        results[name] = m.take("local")

    try:
        await asyncio.gather(m.track("local", call("long", 0.4)), m.track("local", call("short", 0.2)))
    finally:
        await m.close()
    long, short = results["long"], results["short"]
    assert long is not None and short is not None
    # 0-0.2 s shared (20 J each), 0.2-0.4 s the long call alone (40 J)
    assert short == pytest.approx(20.0, rel=0.3)
    assert long == pytest.approx(60.0, rel=0.3)
    assert long + short == pytest.approx(m.total_joules)


async def test_unmetered_backends_and_failovers_are_not_measured() -> None:
    m = EnergyMeter(ConstantReader(100.0), ["local"], interval_s=0.02)
    await m.start()
    out: list[float | None] = []

    async def call(answered_by: str) -> None:
        await asyncio.sleep(0.05)
        out.append(m.take(answered_by))

    try:
        await m.track("deepseek", call("deepseek"))   # never metered
        await m.track("local", call("deepseek"))      # failed over to a remote backend
        assert m.take("local") is None                # outside any tracked call
    finally:
        await m.close()
    assert out == [None, None]


async def test_a_failing_reader_falls_back_to_estimates() -> None:
    class Broken:
        def watts(self) -> float:
            raise RuntimeError("GPU is lost")

    m = EnergyMeter(Broken(), ["local"], interval_s=0.01)
    await m.start()
    out: list[float | None] = []

    async def call() -> None:
        await asyncio.sleep(0.05)
        out.append(m.take("local"))

    try:
        await m.track("local", call())
    finally:
        await m.close()
    assert out == [None]


def test_measured_joules_go_through_accounting_with_pue_and_the_measured_label() -> None:
    table = parse_prices(Path("config/prices.yaml").read_text(encoding="utf-8"))
    figures = account({"prompt_tokens": 10, "completion_tokens": 5}, "qwen", "local", table,
                      measured_joules=1000.0)
    assert figures.method == "measured"
    assert figures.joules == pytest.approx(1500.0)          # PUE 1.5 of the local profile
    assert figures.co2_g == pytest.approx(1500.0 / 3.6e6 * 480)


# -------------------------------------------------------------------- NVML adapter


class FakeNvml:
    """Stands in for the pynvml module."""

    class NVMLError(Exception):
        pass

    def __init__(self, milliwatts: list[int], init_fails: bool = False) -> None:
        self.milliwatts = milliwatts
        self.init_fails = init_fails
        self.shutdown = 0

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.shutdown += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.milliwatts)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return SimpleNamespace(index=index)

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return f"NVIDIA H100 #{handle.index}"

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self.milliwatts[handle.index]


def test_nvml_reader_sums_the_boards_in_watts() -> None:
    nvml = FakeNvml([70_500, 310_250])
    reader = NvmlPowerReader(nvml=nvml)
    assert reader.watts() == pytest.approx(380.75)
    assert NvmlPowerReader(indices=[1], nvml=nvml).watts() == pytest.approx(310.25)
    reader.close()
    assert nvml.shutdown == 1


def test_nvml_reader_without_a_driver_or_gpu_is_unavailable() -> None:
    with pytest.raises(EnergyUnavailable, match="Driver Not Loaded"):
        NvmlPowerReader(nvml=FakeNvml([], init_fails=True))
    nvml = FakeNvml([])
    with pytest.raises(EnergyUnavailable, match="no GPU"):
        NvmlPowerReader(nvml=nvml)
    assert nvml.shutdown == 1


def test_only_local_backends_not_marked_estimated_are_metered() -> None:
    table = parse_prices("""
energy:
  remote-vllm: {joules_per_request: 1, pue: 1, grid_gco2_per_kwh: 1, usd_per_kwh: 1, method: estimated}
  local: {joules_per_request: 1, pue: 1.5, grid_gco2_per_kwh: 1, usd_per_kwh: 1, method: measured}
""")
    config = Config(backends=(BackendConfig(name="deepseek"),
                              BackendConfig(name="local", type="vllm", base_url="http://127.0.0.1:8000"),
                              BackendConfig(name="remote-vllm", type="vllm", base_url="http://10.0.0.9:8000"),
                              BackendConfig(name="gpu2", type="vllm", base_url="http://127.0.0.1:8001")))
    assert metered_backends(config, table) == ("local", "gpu2")
    m = energy_meter(config, table, ConstantReader(1.0))
    assert m is not None and m.backends == {"local", "gpu2"}
    remote_only = Config(backends=(BackendConfig(name="deepseek"),))
    assert energy_meter(remote_only, table, ConstantReader(1.0)) is None
