"""Accelerator descriptions for the analytic planner: peak numbers per GPU, and presets.

Units: FLOP/s and bytes/s are plain SI numbers (1 GB = 1e9 bytes, 1 TB/s = 1e12 bytes/s).
HBM capacities of the presets are binary (GiB), because that is what the device reports:
an "80GB" A100 shows 81920 MiB in nvidia-smi, i.e. 80 GiB = 85.9e9 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from sp_serve.config import parse_bytes  # noqa: F401  (the planner's flags take sizes too)

GB = 1e9
GIB = float(2**30)
TB = 1e12


@dataclass(frozen=True)
class Hardware:
    """One GPU. Bandwidths are per GPU and per direction (what one send or one copy can use)."""

    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s, without 2:4 sparsity
    hbm_bytes: float  # HBM capacity
    hbm_bandwidth: float  # HBM <-> SM, bytes/s
    interconnect_bandwidth: float  # GPU <-> GPU (NVLink through NVSwitch), bytes/s one way
    pcie_bandwidth: float  # host <-> GPU over PCIe x16, bytes/s one way
    # GPU <-> GPU on another node (each GPU's own NIC, GPUDirect RDMA), bytes/s one way; None:
    # not given (a plan spanning nodes then asks for it)
    inter_node_bandwidth: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if value is None and f.name == "inter_node_bandwidth":
                continue
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(
                    f"hardware {self.name!r}: {f.name} must be a positive number, got {value!r}"
                )


# Datasheet numbers (dense, no sparsity). NVLink: A100 600 GB/s and H100/H200 900 GB/s are
# totals over both directions, so one direction is half. PCIe: Gen4 x16 ~32 GB/s, Gen5 x16
# ~64 GB/s one way. Between nodes, as in a DGX/HGX: one NIC per GPU, ConnectX-6 HDR 200 Gb/s
# (A100) or ConnectX-7 NDR 400 Gb/s (H100, H200), i.e. 25 or 50 GB/s one way.
HARDWARE_PRESETS: dict[str, Hardware] = {
    "a100-80g": Hardware(
        name="a100-80g",
        peak_flops=312e12,
        hbm_bytes=80 * GIB,
        # 2039 GB/s is the SXM 80GB datasheet figure; it reproduces the paper's decoding
        # latencies (8.5 s / 9.8 s for 250 tokens), which "2 TB/s" rounded would miss by ~2%.
        hbm_bandwidth=2.039e12,
        interconnect_bandwidth=300e9,
        pcie_bandwidth=32e9,
        inter_node_bandwidth=25e9,
    ),
    "h100-sxm": Hardware(
        name="h100-sxm",
        peak_flops=989e12,
        hbm_bytes=80 * GIB,
        hbm_bandwidth=3.35e12,
        interconnect_bandwidth=450e9,
        pcie_bandwidth=64e9,
        inter_node_bandwidth=50e9,
    ),
    "h200": Hardware(
        name="h200",
        peak_flops=989e12,
        hbm_bytes=141 * GIB,
        hbm_bandwidth=4.8e12,
        interconnect_bandwidth=450e9,
        pcie_bandwidth=64e9,
        inter_node_bandwidth=50e9,
    ),
}


def get_hardware(name: str) -> Hardware:
    """A preset by name; ValueError naming the presets otherwise."""
    try:
        return HARDWARE_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown hardware preset {name!r}; choose one of {sorted(HARDWARE_PRESETS)}, "
            "or 'custom' with --peak-tflops, --hbm, --hbm-bw-gbs, --interconnect-bw-gbs and "
            "--pcie-bw-gbs (and --inter-node-bw-gbs for a plan over several nodes)"
        ) from None
