"""A quantized checkpoint's settings, read from its config.json or file metadata without
loading it (and without torch: run.py plans its steps with them before any step starts);
llmbench.quant.checkpoint reads the tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmbench.errors import UserError

METHODS = ("gptq", "awq")
# Channel INT8 folders (meituan/DeepSeek-R1-Channel-INT8): `<module>.weight` int8 [N, K] and
# `<module>.weight_scale` [N] or [N, 1], w = weight * scale, symmetric per output channel; IPEX's
# README has users add `"quantization_config": {"quant_method": "int8", "bits": 8,
# "group_size": -1}` to config.json, and SGLang names the same layout "w8a8_int8".
CHANNEL_INT8_METHODS = ("int8", "w8a8_int8")


def describe_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of a quantization_config (or file metadata), normalized: method, bits,
    group_size, desc_act, sym, checkpoint_format. Refuses what we can't run."""
    method = str(settings.get("quant_method", "")).lower()
    bits = int(settings.get("bits", settings.get("w_bit", 4)))
    if bits != 4:
        raise UserError(f"{method or 'the'} checkpoint has {bits}-bit weights; only 4-bit "
                        "GPTQ/AWQ checkpoints run here (our int4 kernel)")
    group = int(settings.get("group_size", settings.get("q_group_size", -1)))
    if method == "awq":
        version = str(settings.get("version", "gemm")).lower()
        if version != "gemm":
            raise UserError(f"AWQ version {version!r}: only the GEMM layout (version 'gemm') is "
                            "read here")
        fmt = "awq_gemm"
        sym = not bool(settings.get("zero_point", True))
        desc_act = False
    else:
        fmt = str(settings.get("checkpoint_format", settings.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise UserError(f"GPTQ checkpoint_format {fmt!r}: only 'gptq' (zeros stored minus "
                            "one) and 'gptq_v2' are read here")
        sym = _flag(settings.get("sym", True))
        desc_act = _flag(settings.get("desc_act", False))
    return {"quant_method": method, "bits": bits, "group_size": group, "desc_act": desc_act,
            "sym": sym, "checkpoint_format": fmt}


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")



def folder_quantization(name_or_path: str | None) -> dict[str, Any] | None:
    """The quantization_config of a local GPTQ/AWQ folder given as -m (None for anything else),
    read from its config.json without loading the model: run.py plans its steps with it."""
    if not name_or_path:
        return None
    config = Path(name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        return hf_quantization(json.loads(config.read_text()))
    except (OSError, ValueError):
        return None


def hf_quantization(config_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's GPTQ/AWQ (or channel INT8) settings, or None when it isn't one."""
    qc = config_dict.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    if method in CHANNEL_INT8_METHODS:
        assert isinstance(qc, dict)
        group = int(qc.get("group_size", -1))
        if int(qc.get("bits", 8)) != 8 or group != -1:
            raise UserError(f"quant_method {method!r} with bits {qc.get('bits')} and group_size "
                            f"{group}: channel INT8 checkpoints are 8-bit per output channel "
                            "(bits 8, group_size -1)")
        return {"quant_method": "int8", "bits": 8, "group_size": -1, "desc_act": False,
                "sym": True, "checkpoint_format": "channel_int8"}
    if method not in METHODS:
        return None
    return describe_settings(qc)
