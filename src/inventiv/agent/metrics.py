"""Measurements the heartbeat carries: GPUs through NVML, the host through psutil, and the
engine's queue from its Prometheus /metrics. Real numbers or none: nothing is invented unless
WORKER_SIMULATE_GPU asks for (clearly marked) simulated GPUs."""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import sys
from collections.abc import Mapping
from typing import Any

import httpx
import psutil

from inventiv.protocol import GpuInfo, GpuStats, HostFacts, SystemStats

log = logging.getLogger("inventiv.agent")

QUEUE_METRIC = "vllm:num_requests_waiting"
RUNNING_METRIC = "vllm:num_requests_running"
MB = 1024 * 1024
GB = 1024 * MB


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum each metric over all its label sets: `name{a="x"} 2` and `name{a="y"} 3` -> 5.

    Handles label values containing spaces, braces and escaped quotes, optional timestamps,
    comments and NaN/Inf; malformed lines are skipped rather than failing the whole scrape.
    """
    totals: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            end = _end_of_labels(line, brace)
            if end == -1:
                continue
            rest = line[end + 1 :]
        else:
            if space == -1:
                continue
            name, rest = line[:space], line[space:]
        fields = rest.split()
        if not name or not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isnan(value):
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


def _end_of_labels(line: str, start: int) -> int:
    """Index of the `}` closing the label set opened at `start`, skipping quoted values."""
    in_quotes = False
    i = start + 1
    while i < len(line):
        ch = line[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "}":
            return i
        i += 1
    return -1


def queue_from_metrics(totals: Mapping[str, float]) -> tuple[int | None, int | None]:
    """(queue_depth, requests_running) from vLLM's metric names; None when not exported."""

    def count(name: str) -> int | None:
        value = totals.get(name)
        if value is None or math.isinf(value):
            return None
        return max(0, round(value))

    return count(QUEUE_METRIC), count(RUNNING_METRIC)


async def scrape_engine_queue(
    client: httpx.AsyncClient, base_url: str, api_key: str | None
) -> tuple[int | None, int | None]:
    """Queue numbers from the engine, or (None, None) while it is down or exports nothing."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = await client.get(f"{base_url}/metrics", headers=headers, timeout=2.0)
    except httpx.HTTPError:
        return None, None
    if response.status_code != 200:
        return None, None
    return queue_from_metrics(parse_prometheus(response.text))


class GpuProbe:
    """NVML when a driver is present; otherwise no GPUs (an empty list, never made-up numbers).

    With `simulate=True` it reports one fake GPU instead, and the caller marks the heartbeat
    `"simulated": true` so nobody mistakes it for a measurement.
    """

    SIM_NAME = "Simulated GPU (WORKER_SIMULATE_GPU)"
    SIM_MEMORY_MB = 81920

    def __init__(self, simulate: bool = False) -> None:
        self.simulate = simulate
        self._nvml: Any = None
        if simulate:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no library, no driver, no device: all mean "no GPU here"
            log.debug("NVML unavailable (%s): reporting no GPUs", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def inventory(self) -> list[GpuInfo]:
        if self.simulate:
            return [GpuInfo(index=0, name=self.SIM_NAME, memory_total_mb=self.SIM_MEMORY_MB)]
        nv = self._nvml
        if nv is None:
            return []
        gpus: list[GpuInfo] = []
        try:
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                name = nv.nvmlDeviceGetName(handle)
                if isinstance(name, bytes):
                    name = name.decode(errors="replace")
                memory = nv.nvmlDeviceGetMemoryInfo(handle)
                uuid = nv.nvmlDeviceGetUUID(handle)
                if isinstance(uuid, bytes):
                    uuid = uuid.decode(errors="replace")
                gpus.append(
                    GpuInfo(
                        index=index,
                        name=str(name)[:256],
                        memory_total_mb=int(memory.total // MB),
                        uuid=str(uuid)[:256],
                    )
                )
        except Exception as exc:
            log.warning("NVML inventory failed: %s", exc)
        return gpus

    def stats(self, load_hint: int = 0) -> list[GpuStats]:
        if self.simulate:
            busy = min(100.0, 20.0 * load_hint)
            used = self.SIM_MEMORY_MB * 0.9  # what vLLM pre-allocates with its default 0.9
            return [
                GpuStats(
                    index=0,
                    utilization=busy,
                    memory_used_mb=used,
                    memory_total_mb=float(self.SIM_MEMORY_MB),
                    temperature_c=35.0 + busy / 4,
                    power_w=60.0 + 6.0 * busy,
                )
            ]
        nv = self._nvml
        if nv is None:
            return []
        out: list[GpuStats] = []
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception as exc:
            log.warning("NVML device count failed: %s", exc)
            return []
        for index in range(count):
            try:
                out.append(self._one(nv, index))
            except Exception as exc:  # one broken GPU must not hide the others
                log.debug("NVML stats for GPU %d failed: %s", index, exc)
                out.append(GpuStats(index=index))
        return out

    @staticmethod
    def _one(nv: Any, index: int) -> GpuStats:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        memory = nv.nvmlDeviceGetMemoryInfo(handle)
        stats: dict[str, float] = {
            "memory_used_mb": memory.used / MB,
            "memory_total_mb": memory.total / MB,
        }
        try:
            stats["utilization"] = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            pass
        try:
            stats["temperature_c"] = float(
                nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)
            )
        except Exception:
            pass
        try:
            stats["power_w"] = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except Exception:
            pass
        return GpuStats(index=index, **stats)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


class SystemProbe:
    """CPU, memory, disk and load of the host, through psutil."""

    def __init__(self, disk_path: str = "/") -> None:
        self.disk_path = disk_path
        # The first cpu_percent(None) call only sets the reference point and returns 0.0.
        psutil.cpu_percent(interval=None)

    def stats(self) -> SystemStats:
        memory = psutil.virtual_memory()
        values: dict[str, float] = {
            "cpu_percent": min(100.0, max(0.0, psutil.cpu_percent(interval=None))),
            "memory_used_mb": (memory.total - memory.available) / MB,
            "memory_total_mb": memory.total / MB,
        }
        try:
            disk = psutil.disk_usage(self.disk_path)
            values["disk_used_gb"] = disk.used / GB
            values["disk_total_gb"] = disk.total / GB
        except OSError:
            pass
        try:
            values["load1"] = os.getloadavg()[0]
        except OSError:
            pass
        return SystemStats(**values)


def host_facts() -> HostFacts:
    return HostFacts(
        hostname=socket.gethostname()[:256],
        cpu_count=psutil.cpu_count() or None,
        memory_total_mb=psutil.virtual_memory().total // MB,
        os=platform.platform()[:256],
        python=sys.version.split()[0],
    )
