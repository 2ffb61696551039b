"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), our own implementation, behind utils/run_gptq.py.

For each linear layer, with X its calibration inputs, GPTQ quantizes the weight W [N, K] one
input column at a time, minimizing ||X W^T - X Q^T||^2: after rounding column j, the rounding
error is spread over the columns not yet quantized, weighted by the inverse Hessian
H^-1 (H = 2 X^T X / n). As the paper does, H^-1 is taken through the upper Cholesky factor of
its inverse (numerically stable), columns are handled in blocks (rank-B updates for the rest),
H is dampened by percdamp x mean(diag H), and with act-order columns go in decreasing diag(H)
order (groups then follow that order; the checkpoint's g_idx records each channel's group),
unless static groups fix every group's range up front, in channel order.
Decoder layers are done in order, each calibrated on the outputs of the layers already
quantized. The layer's linears are calibrated on its unquantized inputs together (no
"true sequential" pass within a layer), which saves one forward per sub-block.
With --tune-scales, the group scales are then tuned end to end (llmbench.quant.scale_tuning).

Output: a Hugging Face GPTQ folder (config.json with quantization_config, model.safetensors in
AutoGPTQ's v1 layout, tokenizer), which `-m` loads (llmbench.quant.checkpoint), and
gptq_checkpoint.safetensors (the projections alone) for --low-precision-checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmbench.atomic import atomic_folder
from llmbench.errors import UserError
from llmbench.quant.calibration import load_texts
from llmbench.quant.rtn import QuantizedWeight
from llmbench.quant.scale_tuning import ScaleTuning, tune_scales
from llmbench.quant.scheme import CLIP_GRID_4BIT, MIN_IN_FEATURES

HELDOUT_WINDOWS = 4  # held-out windows of --seqlen tokens at the end of the text, for perplexity
TUNE_DEFAULTS = ScaleTuning()
# Twice GPTQ's default windows: on the embedded model 64 windows for 2 epochs generalized better
# (held-out text) than 32 windows for 4, at the same cost (docs/quantization.md).
TUNE_NSAMPLES = 64


@dataclass
class GPTQSettings:
    group_size: int = 128  # -1: per output channel
    sym: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    clip_search: bool = True  # pick each group's range by the squared error of rounding it
    # Every group's range from the weights before any error update, groups in channel order
    # (with act_order the groups then need no input permutation at run time).
    static_groups: bool = False


# ---- the algorithm on one weight -----------------------------------------------------------

def group_params(w: torch.Tensor, sym: bool, clip_search: bool,
                 weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of w [N, g] for 4 bits. Scales are rounded to fp16
    (what the checkpoint stores) before use, so the error compensation sees the real grid.
    Asymmetric zeros lie in 1..15: AutoGPTQ's v1 layout stores zero - 1 in 4 bits. The clip
    search weighs each column's squared error by `weight` [g] (GPTQ passes diag(H): the
    column's mean squared input, so errors on busy channels count more)."""
    lo0 = w.amin(dim=1).clamp(max=0.0)
    hi0 = w.amax(dim=1).clamp(min=0.0)
    best_s = best_z = best_err = None
    for shrink in (CLIP_GRID_4BIT if clip_search else (1.0,)):
        lo, hi = lo0 * shrink, hi0 * shrink
        if sym:
            s = (torch.maximum(-lo, hi) * 2 / 15).clamp_min(1e-8).half().float()
            z = torch.full_like(s, 8.0)
        else:
            s = ((hi - lo) / 15).clamp_min(1e-8).half().float()
            z = torch.round(-lo / s).clamp(1, 15)
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 15)
        dq = (q - z[:, None]) * s[:, None]
        err = (dq - w).square()
        err = (err if weight is None else err * weight).sum(dim=1)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    assert best_s is not None and best_z is not None
    return best_s, best_z


def inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 (float64 for stability); the dampening grows
    tenfold until H is positive definite."""
    h = h.double()
    damp = percdamp * float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True).float()
        damp *= 10
    raise UserError("GPTQ: the calibration Hessian stays singular; use more --nsamples")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor,
                  settings: GPTQSettings) -> QuantizedWeight:
    """GPTQ of one weight [N, K] given H = 2 X^T X / n [K, K] of its calibration inputs."""
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0  # channels never active in calibration: weight irrelevant
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = k if settings.group_size == -1 else settings.group_size
    groups = math.ceil(k / group)
    scales, zeros = torch.zeros(n, groups), torch.zeros(n, groups)
    static = settings.static_groups
    if static:
        col_weight = torch.diag(h)
        for g in range(groups):
            cols = slice(g * group, min((g + 1) * group, k))
            scales[:, g], zeros[:, g] = group_params(w[:, cols], settings.sym,
                                                     settings.clip_search, col_weight[cols])
    perm = torch.argsort(torch.diag(h), descending=True) if settings.act_order else None
    col_group = torch.arange(k) // group  # static: each column's group, in quantization order
    if perm is not None:
        w, h, col_group = w[:, perm], h[perm][:, perm], col_group[perm]
    hinv = inverse_hessian_factor(h, settings.percdamp)
    diag = torch.diag(h)
    # Blocks never straddle a group start, so a group's range is taken from columns that all
    # carry the error of every earlier block (and none of the current one yet).
    block = group if group <= settings.block_size else settings.block_size
    if group % block:
        block = math.gcd(group, block)
    q = torch.zeros(n, k, dtype=torch.int64)
    dq = torch.zeros(n, k)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if not static and i1 % group == 0:
            g = i1 // group
            cols = slice(i1, min(i1 + group, k))
            scales[:, g], zeros[:, g] = group_params(w[:, cols], settings.sym,
                                                     settings.clip_search, diag[cols])
        s, z = scales[:, i1 // group], zeros[:, i1 // group]
        for i in range(i2 - i1):
            if static:
                s, z = scales[:, col_group[i1 + i]], zeros[:, col_group[i1 + i]]
            col = w1[:, i]
            qi = torch.clamp(torch.round(col / s) + z, 0, 15)
            dqi = (qi - z) * s
            q[:, i1 + i], dq[:, i1 + i] = qi.long(), dqi
            err = (col - dqi) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    # dynamic groups are consecutive in the (possibly permuted) quantization order
    g_idx = col_group if static else torch.arange(k) // group
    if perm is not None:  # back to the original channel order
        inverse = torch.argsort(perm)
        q, dq, g_idx = q[:, inverse], dq[:, inverse], g_idx[inverse]
    return QuantizedWeight(q, scales, zeros, g_idx, dq)


# ---- calibration data ----------------------------------------------------------------------

def calibration_ids(tokenizer: Any, texts: list[str], nsamples: int, seqlen: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The texts as one token stream (EOS between texts): the last HELDOUT_WINDOWS windows of
    seqlen tokens are held out for perplexity, nsamples random windows of the rest calibrate."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text).input_ids + ([eos] if eos is not None else [])
    heldout_len = HELDOUT_WINDOWS * seqlen
    calib_len = len(stream) - heldout_len
    if calib_len < seqlen * 2:
        raise UserError(f"the calibration text has {len(stream)} tokens: too few for --seqlen "
                        f"{seqlen} (it needs {seqlen * 2 + heldout_len} or more)")
    tokens = torch.tensor(stream)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, calib_len - seqlen + 1, (nsamples,), generator=generator)
    calib = torch.stack([tokens[s: s + seqlen] for s in starts.tolist()])
    heldout = tokens[calib_len: calib_len + heldout_len].view(HELDOUT_WINDOWS, seqlen)
    return calib, heldout


def tuning_windows(tokenizer: Any, texts: list[str], nsamples: int, seqlen: int,
                   seed: int) -> torch.Tensor:
    """Scale tuning's windows: a draw of their own (seed + 1) from the same calibration part
    of the text as GPTQ's, so the held-out windows stay unseen."""
    return calibration_ids(tokenizer, texts, nsamples, seqlen, seed + 1)[0]


# ---- the model, layer by layer -----------------------------------------------------------

class _Captured(Exception):
    """Stops the forward pass once the first decoder layer's inputs are captured."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList holding num_hidden_layers blocks."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    count = getattr(config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"GPTQ: cannot find the decoder layers of this {config.model_type} model")


def layer_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear) and module.in_features >= MIN_IN_FEATURES}


class _HessianSums:
    """X^T X summed over the calibration inputs of each linear of one layer. q/k/v (and
    gate/up) see the same input tensor, so its product is computed once per forward."""

    def __init__(self, linears: dict[str, torch.nn.Linear]) -> None:
        self.sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                     for name, m in linears.items()}
        self.rows = dict.fromkeys(linears, 0)
        self.shared: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(self, name: str) -> Any:
        def accumulate(_module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key not in self.shared:
                flat = x.reshape(-1, x.shape[-1]).float()
                # x is kept with its product: memory still referenced can't be reused by
                # another tensor of the same shape, which would then match the key. The
                # product is fp32 (fast), its running sum fp64 (many chunks add up).
                self.shared[key] = (x, (flat.t() @ flat).double())
            self.sums[name] += self.shared[key][1]
            self.rows[name] += x.numel() // x.shape[-1]
        return accumulate

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2 X^T X / n."""
        return (2.0 * self.sums[name] / max(self.rows[name], 1)).float()


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


def quantize_model(model: torch.nn.Module, calib: torch.Tensor, settings: GPTQSettings,
                   batch: int = 8, log: Any = print) -> dict[str, QuantizedWeight]:
    """GPTQ every decoder-layer linear of `model` in place (weights replaced by their
    dequantized GPTQ values); returns the results by module name."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def capture(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, dict(kwargs)))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.inference_mode():
            for chunk in calib.split(batch):
                try:
                    model(input_ids=chunk, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()

    def hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    def with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    results: dict[str, QuantizedWeight] = {}
    from llmbench.progress import bar

    for index, layer in enumerate(bar(layers, "GPTQ", total=len(layers), unit="layer")):
        start = time.perf_counter()
        linears = layer_linears(layer)
        sums = _HessianSums(linears)
        hooks = [m.register_forward_hook(sums.hook(n)) for n, m in linears.items()]
        try:
            with torch.inference_mode():
                for args, kwargs in captured:
                    sums.shared.clear()
                    layer(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        for name, module in linears.items():
            result = gptq_quantize(module.weight, sums.hessian(name), settings)
            with torch.no_grad():
                module.weight.copy_(result.dequantized.to(module.weight.dtype))
            results[f"{prefix}.{index}.{name}"] = result
        with torch.inference_mode():
            captured = [with_hidden(args, kwargs, _hidden(layer(*args, **kwargs)))
                        for args, kwargs in captured]
        log(f"layer {index + 1}/{len(layers)}: {len(linears)} linears in "
            f"{time.perf_counter() - start:.1f} s")
    return results


def int4_linears(model: torch.nn.Module, results: dict[str, QuantizedWeight]
                 ) -> dict[str, Any]:
    """The GPTQ results as our Int4Linear projections, through the checkpoint layout (what a
    saved folder loads as), ready for apply.install_hf / prepare_quantized."""
    from llmbench.quant.checkpoint import gptq_linear, gptq_tensors

    modules = dict(model.named_modules())
    out = {}
    for name, result in results.items():
        n, k = result.q.shape
        tensors = gptq_tensors(result.q, result.zeros, result.scales, result.g_idx,
                               modules[name].bias)
        out[name] = gptq_linear(tensors, k, n, name, "GPTQ")
    return out


# ---- writing ---------------------------------------------------------------------------------

def quantization_config(settings: GPTQSettings, nsamples: int, seqlen: int) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": 4, "group_size": settings.group_size,
            "desc_act": settings.act_order, "sym": settings.sym, "checkpoint_format": "gptq",
            "damp_percent": settings.percdamp, "true_sequential": False,
            "static_groups": settings.static_groups,
            "quantizer": "llmbench", "calibration": {"nsamples": nsamples, "seqlen": seqlen}}


def write_outputs(output_dir: Path, model: torch.nn.Module, tokenizer: Any,
                  results: dict[str, QuantizedWeight], qconfig: dict[str, Any]) -> None:
    """The Hugging Face GPTQ folder and gptq_checkpoint.safetensors, staged beside output_dir
    and renamed into place at the end: a failed run leaves no half-written folder."""
    from safetensors.torch import save_file

    from llmbench.quant.checkpoint import CHECKPOINT_FILE, gptq_tensors

    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(f"--output-dir {output_dir} is not empty: pass a new folder")
    modules = dict(model.named_modules())
    quantized: dict[str, torch.Tensor] = {}
    for name, result in results.items():
        for key, tensor in gptq_tensors(result.q, result.zeros, result.scales, result.g_idx,
                                        modules[name].bias).items():
            quantized[f"{name}.{key}"] = tensor
    floats: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in results or tensor.data_ptr() in seen:  # quantized, or a tied duplicate
            continue
        seen.add(tensor.data_ptr())
        floats[key] = tensor.detach().contiguous()
    metadata = {key: json.dumps(value) if not isinstance(value, str) else value
                for key, value in qconfig.items() if key != "calibration"}
    with atomic_folder(output_dir) as staging:  # output_dir is new or empty (checked above)
        config = model.config.to_dict()
        config["quantization_config"] = qconfig
        (staging / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
        save_file({**floats, **quantized}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        save_file(quantized, str(staging / CHECKPOINT_FILE), metadata=metadata)
        tokenizer.save_pretrained(str(staging))


def perplexity_on(model: Any, ids: torch.Tensor) -> float:
    from llmbench.quant.quality import perplexity_of_ids

    return perplexity_of_ids(model, ids)


@dataclass(frozen=True)
class GPTQJob:
    """What utils/run_gptq.py runs, besides GPTQSettings and the optional ScaleTuning (its
    command line is llmbench.cli.gptq)."""

    model_name_or_path: str | None
    output_dir: Path
    dataset: str | None
    nsamples: int
    seqlen: int
    seed: int
    skip_rtn: bool
    tune_nsamples: int | None


def run(job: GPTQJob, settings: GPTQSettings, tuning: ScaleTuning | None) -> int:
    """Calibrate, quantize (and tune), compare perplexities, write the GPTQ folder."""
    output_dir = job.output_dir
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(f"--output-dir {output_dir} is not empty: pass a new folder")
    texts, source = load_texts(job.dataset)

    from llmbench.models import load_model
    from llmbench.quant import apply, quality
    from llmbench.quant.scheme import Scheme

    torch.manual_seed(job.seed)
    loaded = load_model(job.model_name_or_path, "float32")
    if loaded.quantized is not None:
        raise UserError(f"{loaded.source.display_name} is already quantized")
    model, tokenizer = loaded.model, loaded.tokenizer
    calib, heldout = calibration_ids(tokenizer, texts, job.nsamples, job.seqlen, job.seed)
    print(f"model: {loaded.source.display_name} | GPTQ 4-bit group {settings.group_size} "
          f"{'sym' if settings.sym else 'asym'} act-order {settings.act_order} "
          f"static-groups {settings.static_groups} | calibration "
          f"{job.nsamples} x {job.seqlen} tokens of {source}", flush=True)
    ppl = {"fp32": (perplexity_on(model, heldout), quality.perplexity(model, tokenizer))}
    if not job.skip_rtn:  # the same layers by round to nearest (lm_head stays float too)
        rtn = load_model(job.model_name_or_path, "float32").model
        scheme = Scheme("woq", "INT4", settings.group_size, settings.sym, lm_head=False)
        apply.install_hf(rtn, apply.quantize_rtn(rtn, scheme))
        ppl["rtn"] = (perplexity_on(rtn, heldout), quality.perplexity(rtn, tokenizer))
        del rtn
    teacher = copy.deepcopy(model) if tuning else None  # the float model, before GPTQ
    start = time.perf_counter()
    results = quantize_model(model, calib, settings, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - start
    print(f"GPTQ: {len(results)} linears in {seconds:.1f} s", flush=True)
    ppl["gptq"] = (perplexity_on(model, heldout), quality.perplexity(model, tokenizer))
    qconfig = quantization_config(settings, job.nsamples, job.seqlen)
    if tuning:
        nsamples = job.tune_nsamples or TUNE_NSAMPLES
        windows = tuning_windows(tokenizer, texts, nsamples, job.seqlen, job.seed)
        stats = tune_scales(model, teacher, results, windows, tuning, seed=job.seed,
                            log=lambda line: print(line, flush=True))
        del teacher
        ppl["tuned"] = (perplexity_on(model, heldout), quality.perplexity(model, tokenizer))
        qconfig["scale_tuning"] = {"epochs": tuning.epochs, "lr": tuning.lr,
                                   "batch": tuning.batch, "nsamples": nsamples,
                                   "seqlen": job.seqlen,
                                   "objective": "KL to the float model, scales only",
                                   "kl_first_epoch": round(stats["kl_first_epoch"], 5),
                                   "kl_last_epoch": round(stats["kl_last_epoch"], 5)}
    write_outputs(output_dir, model, tokenizer, results, qconfig)
    base_heldout, base_prompts = ppl["fp32"]
    print(f"perplexity (held-out {HELDOUT_WINDOWS} x {job.seqlen} tokens of the calibration "
          "text | prompt.json texts):")
    for name, (held, prompts) in ppl.items():
        print(f"  {name:5s} {held:8.3f} ({100 * (held / base_heldout - 1):+6.2f}%) | "
              f"{prompts:8.3f} ({100 * (prompts / base_prompts - 1):+6.2f}%)")
    print(f"saved: {output_dir} (GPTQ folder: -m {output_dir}) and "
          f"{output_dir / 'gptq_checkpoint.safetensors'} (--low-precision-checkpoint)",
          flush=True)
    return 0
