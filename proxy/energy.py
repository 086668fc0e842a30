"""Measured energy of calls to a local GPU backend: NVML board power, sampled while calls run.

A background sampler reads the GPUs' power (``PowerReader.watts``, all GPUs summed) every
``interval_s`` while at least one metered call is in flight, and sleeps otherwise. Power is shared
equally among the calls in flight at each instant, so a call's energy is the integral of
``P(t) / n(t)`` over its lifetime (``n`` = metered calls in flight). Between two samples the power
is their mean (trapezoid rule); from a call's start or end to the next sample it is the last
reading. The calls' energies therefore add up exactly to the GPU energy integrated over the time
any call was in flight; time with no call in flight is charged to nobody.

The figures are IT energy of the GPU boards only (no CPU, memory, fans): accounting multiplies
them by the backend's PUE and labels them ``measured`` (docs/accounting.md, section 7).

The pipeline uses two calls: ``track(backend, work)`` runs a backend call's coroutine as one
measured call, and ``take(backend)``, from inside that coroutine, ends the measurement and returns
its joules (None when the backend is not metered or no power reading exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

from proxy.tasks import stop_task

from .accounting import PriceTable
from .config import Config

log = logging.getLogger(__name__)

T = TypeVar("T")

#: samples per second while calls are in flight
DEFAULT_INTERVAL_S = 0.1


class PowerReader(Protocol):
    def watts(self) -> float:
        """The current draw in watts (may block briefly: the meter calls it off the loop)."""
        ...


class EnergyUnavailable(RuntimeError):
    """No power readings on this machine (no nvidia-ml-py, no driver, no GPU)."""


class NvmlPowerReader:
    """Board power of NVIDIA GPUs through NVML (``pip install nvidia-ml-py``; ``import pynvml``).

    ``indices`` selects GPUs by NVML index (all of them by default: the local backend's GPUs are
    not known to the proxy). ``nvml`` is the pynvml module, injectable for tests.
    """

    def __init__(self, indices: Sequence[int] | None = None, nvml: Any = None) -> None:
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise EnergyUnavailable("nvidia-ml-py is not installed") from exc
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:  # pynvml.NVMLError and its many subclasses
            raise EnergyUnavailable(f"NVML did not initialise: {exc}") from exc
        try:
            count = int(nvml.nvmlDeviceGetCount())
            chosen = list(range(count)) if indices is None else list(indices)
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in chosen]
            if not self._handles:
                raise EnergyUnavailable("NVML sees no GPU")
            self.names = [str(nvml.nvmlDeviceGetName(h)) for h in self._handles]
            self.watts()  # fails here, not later, when the GPU cannot report its power
        except EnergyUnavailable:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise EnergyUnavailable(f"NVML cannot read GPU power: {exc}") from exc

    def watts(self) -> float:
        # nvmlDeviceGetPowerUsage: milliwatts, the board's power draw
        return sum(float(self._nvml.nvmlDeviceGetPowerUsage(h)) for h in self._handles) / 1000.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def open_nvml(indices: Sequence[int] | None = None) -> NvmlPowerReader | None:
    """An NVML reader, or None (logged once) when this machine cannot measure GPU power."""
    try:
        reader = NvmlPowerReader(indices)
    except EnergyUnavailable as exc:
        log.info("GPU energy is estimated, not measured: %s", exc)
        return None
    log.info("measuring GPU energy with NVML on %d GPU(s): %s", len(reader.names), ", ".join(reader.names))
    return reader


class _Call:
    __slots__ = ("backend", "joules", "live", "powered")

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.joules = 0.0
        self.live = True
        self.powered = False    # some power reading covered part of its lifetime


_CURRENT: ContextVar[_Call | None] = ContextVar("semcache_energy_call", default=None)


class EnergyMeter:
    """Attributes sampled GPU energy to the metered backend calls in flight (module docstring)."""

    def __init__(self, reader: PowerReader, backends: Iterable[str], *,
                 interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._reader = reader
        self.backends = frozenset(backends)
        self._interval = interval_s
        self._clock = clock
        self._active: dict[int, _Call] = {}
        self._power: float | None = None   # the last reading, watts
        self._fresh = False                # the last reading was taken while calls ran
        self._last = clock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed = False
        #: readings taken, and joules attributed so far (for tests and logs)
        self.samples = 0
        self.total_joules = 0.0

    # -- the hook the pipeline uses ---------------------------------------------------------

    def metered(self, backend: str) -> bool:
        return backend in self.backends

    async def track(self, backend: str, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` (one backend call) as a measured call when ``backend`` is metered."""
        if not self.metered(backend):
            return await work
        call = self.begin(backend)
        token = _CURRENT.set(call)
        try:
            return await work
        finally:
            _CURRENT.reset(token)
            self.end(call)

    def take(self, backend: str) -> float | None:
        """End the current task's measurement; its IT joules when ``backend`` (the one that
        answered) is metered and power was known, else None (accounting then estimates)."""
        call = _CURRENT.get()
        if call is None:
            return None
        joules = self.end(call)
        if not self.metered(backend) or not call.powered:
            return None
        return joules

    # -- bookkeeping: synchronous, on the event loop's thread -------------------------------

    def begin(self, backend: str) -> _Call:
        self._advance(self._clock())
        call = _Call(backend)
        self._active[id(call)] = call
        self._wake.set()
        return call

    def end(self, call: _Call) -> float:
        """Stop measuring ``call`` (idempotent); its joules so far."""
        if call.live:
            self._advance(self._clock())
            self._active.pop(id(call), None)
            call.live = False
        return call.joules

    def record(self, watts: float, now: float | None = None) -> None:
        """One power reading at ``now``: the interval since the last event is charged."""
        if not watts >= 0.0 or watts == float("inf"):
            return
        now = self._clock() if now is None else now
        self._advance(now, watts)
        self._power = watts
        self._fresh = True
        self.samples += 1

    def _advance(self, now: float, reading: float | None = None) -> None:
        dt = now - self._last
        if dt > 0 and self._active:
            power = self._power
            if reading is not None:
                # a stale reading (taken while idle) says nothing about this interval
                power = (power + reading) / 2 if power is not None and self._fresh else reading
            if power is not None:
                share = power * dt / len(self._active)
                for call in self._active.values():
                    call.joules += share
                    call.powered = True
                self.total_joules += power * dt
        if dt > 0:
            self._last = now

    # -- the sampler --------------------------------------------------------------------------

    async def start(self) -> None:
        """Take a first reading and start the sampler (on the running loop)."""
        if self._task is not None:
            return
        with contextlib.suppress(Exception):
            watts = await asyncio.to_thread(self._reader.watts)
            self._last = self._clock()
            self._power, self._fresh = watts, False
        self._task = asyncio.create_task(self._run(), name="energy-sampler")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
        closer = getattr(self._reader, "close", None)
        if callable(closer):
            closer()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            while self._active:
                try:
                    watts = await asyncio.to_thread(self._reader.watts)
                except Exception as exc:
                    if not self._failed:
                        self._failed = True
                        log.warning("GPU power reading failed (%s); energy falls back to estimates", exc)
                else:
                    self.record(watts)
                await asyncio.sleep(self._interval)
            # idle: the next call's first interval waits for a fresh reading
            self._fresh = False
            self._wake.clear()


def metered_backends(config: Config, prices: PriceTable) -> tuple[str, ...]:
    """Backends whose calls are measured: local ones (``type: vllm``) unless their energy profile
    says ``method: estimated`` (a vLLM server on another machine: NVML here cannot see its GPU)."""
    names = []
    for backend in config.backends:
        if backend.type != "vllm":
            continue
        profile = prices.profile(backend.name)
        if profile is None or profile.method == "measured":
            names.append(backend.name)
    return tuple(names)


def energy_meter(config: Config, prices: PriceTable, reader: PowerReader | None = None,
                 *, interval_s: float = DEFAULT_INTERVAL_S) -> EnergyMeter | None:
    """The meter for this configuration, or None when no backend is metered or NVML is absent."""
    names = metered_backends(config, prices)
    if not names:
        return None
    if reader is None:
        reader = open_nvml()
        if reader is None:
            return None
    return EnergyMeter(reader, names, interval_s=interval_s)
