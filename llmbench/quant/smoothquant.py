"""SmoothQuant static W8A8 (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models"): calibrate, smooth, quantize, fall back.

1. Calibration: `--calib-iters` samples of `--calib-len` tokens from `--dataset` run through the
   float model; a forward pre-hook on every linear records the per-input-channel abs-max of its
   input (padding excluded) and keeps a small random sample of input rows (AUTO_TOKENS) to score
   quantization error.
2. Smoothing: per group of projections sharing one input, s_j = max|X_j|^a / max|W_j|^(1-a),
   the input divided by s and the weight columns multiplied by it, which leaves the float model
   unchanged. Where the division goes:
   - q/k/v and gate/up: into the RMSNorm (or LayerNorm, weight and bias) before them;
   - o_proj: into the rows of v_proj. Attention is linear in V (softmax(QK^T) V), so scaling
     v's output channel c by 1/s scales o_proj's input channels fed by c by 1/s; with grouped
     query attention one v head feeds n_rep query heads, so those channels share one factor
     (the max over the heads of the group);
   - down_proj: into the rows of up_proj: down's input is act(gate) * up, linear in up;
   - lm_head: into the final norm (the embedding, if tied, is not touched: the quantized
     lm_head is its own tensor).
   Groups whose structure isn't recognized (other families, MoE experts) are quantized unsmoothed.
   `--alpha auto` picks each group's alpha from ALPHA_GRID minimizing the group's output error
   (mean over the sample rows, summed over its projections, of ||Q(X/s) Q(W s)^T - X W^T||^2 /
   ||X W^T||^2 per row).
3. Quantization: weights int8 per output channel, symmetric; activations int8 per tensor,
   symmetric, static: scale = max over calibration of |X/s| / 127, outlier tokens excluded
   (OUTLIER_FACTOR: the attention-sink token's inputs reach thousands where the others stay
   below ~10; a range that holds them leaves the other tokens a handful of int8 levels: +27%
   perplexity on the embedded model instead of +5%). At run time a token beyond the range is
   computed with fp32 activations on the same int8 weights (StaticInt8Linear): in practice the
   first prompt token, never a decode step we have seen.
4. Fallback (choose_fallback): units ranked by output error fall back, most damaged first,
   until the perplexity on held-out calibration samples (split_for_fallback) is within
   FALLBACK_BUDGET of float; they stay in float with
   their smoothed weight (their input is smoothed), and so does every `--fallback-add` name;
   the saved model records which and why.

The result of 1-2 (alphas, smoothing factors, activation scales, automatic fallbacks) is the
recipe: `--qconfig-summary-file` writes it, or reuses it without calibrating when it exists.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmbench import kernels
from llmbench.errors import UserError
from llmbench.progress import bar
from llmbench.quant.calibration import load_texts
from llmbench.quant.linears import OVERFLOW, FloatLinear, StaticInt8Linear
from llmbench.settings import QuantizationSettings

RECIPE_FORMAT = "llmbench.smoothquant-recipe/1"
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
# Fractions of the calibrated activation abs-max tried as the int8 range (clipping outliers).
CLIP_GRID = (1.0,)
# A token whose largest input is this many times the sample's median is an outlier token (the
# attention sink: hundreds to thousands where others are ~1-10); the int8 range is calibrated
# without them, and at run time a row beyond it is computed with float activations.
OUTLIER_FACTOR = 8.0
AUTO_TOKENS = 256  # input rows kept per projection to score quantization error
# Calibration-perplexity increase (vs float) the fallback search aims to stay under, and the
# part of the calibration data it scores on: the last EVAL_SAMPLES samples, held out of the
# activation ranges when there are at least 2 x EVAL_SAMPLES (judged on the very tokens that set
# the ranges, the search saw +1.5% where the prompt.json texts then measured +6.4 to +7.1%).
FALLBACK_BUDGET = 0.02
EVAL_SAMPLES = 4
EVAL_TOKENS = 256
SEED = 0


# ---- calibration data ---------------------------------------------------------------------------

@dataclass
class CalibSettings:
    dataset: str | None = None
    calib_len: int = 512
    calib_iters: int = 32
    shuffle: bool = False
    padding: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "calib_len": self.calib_len,
                "calib_iters": self.calib_iters, "shuffle": self.shuffle,
                "padding": self.padding}


def calibration_samples(tokenizer: Any, settings: CalibSettings
                        ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """(input_ids [1, L], attention_mask [1, L]) per calibration iteration, and a description.
    Default: the texts joined (EOS between) and cut into windows of calib_len tokens; with
    padding: one text per sample, truncated or right-padded to calib_len (pads masked out)."""
    texts, source = load_texts(settings.dataset, with_code=False)  # see calibration.py
    if settings.shuffle:
        texts = list(texts)
        random.Random(SEED).shuffle(texts)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    length = settings.calib_len
    samples = []
    if settings.padding:
        for text in texts[: settings.calib_iters]:
            ids = tokenizer(text).input_ids[:length]
            mask = [1] * len(ids) + [0] * (length - len(ids))
            ids = ids + [pad] * (length - len(ids))
            samples.append((torch.tensor([ids]), torch.tensor([mask])))
    else:
        stream: list[int] = []
        need = length * settings.calib_iters
        for text in texts:
            stream += tokenizer(text).input_ids + ([eos] if eos is not None else [])
            if len(stream) >= need:
                break
        if len(stream) < length:  # shorter than one window: one sample of everything
            length = len(stream)
        for start in range(0, min(len(stream), need) - length + 1, length):
            ids = torch.tensor([stream[start: start + length]])
            samples.append((ids, torch.ones_like(ids)))
    if not samples:
        raise UserError(f"--dataset {source}: no calibration sample could be made")
    info = {"source": source, **settings.to_dict(), "samples_used": len(samples),
            "tokens": int(sum(int(m.sum()) for _, m in samples))}
    if len(samples) < settings.calib_iters:
        info["note"] = (f"the dataset gave {len(samples)} of the {settings.calib_iters} "
                        "samples asked for")
    return samples, info


# ---- the model's smoothing groups ---------------------------------------------------------------

@dataclass
class Group:
    """Projections sharing one input whose smoothing factor is divided out upstream."""

    name: str
    consumers: list[str]
    norm: str | None = None  # module name of the norm whose weight (and bias) is divided by s
    producer: str | None = None  # linear whose output rows are divided by s (v_proj, up_proj)
    n_rep: int = 1  # GQA: query heads per kv head (o_proj channels per v channel)
    head_dim: int = 0


def find_groups(model: torch.nn.Module, linears: dict[str, torch.nn.Linear]) -> list[Group]:
    """The smoothing groups of a llama-like decoder (input_layernorm + self_attn q/k/v/o,
    post_attention_layernorm + mlp gate/up/down, final norm + lm_head); every other linear is
    quantized unsmoothed."""
    groups: list[Group] = []
    modules = dict(model.named_modules())
    config = model.config
    for name, module in modules.items():
        attn = getattr(module, "self_attn", None)
        mlp = getattr(module, "mlp", None)
        norm1 = getattr(module, "input_layernorm", None)
        norm2 = getattr(module, "post_attention_layernorm", None)
        if attn is not None and norm1 is not None and _norm_ok(norm1):
            parts = [f"{name}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            if all(p in linears for p in parts):
                groups.append(Group(f"{name}.attn_in", parts, f"{name}.input_layernorm"))
                o_name = f"{name}.self_attn.o_proj"
                heads = getattr(config, "num_attention_heads", 0)
                kv_heads = getattr(config, "num_key_value_heads", None) or heads
                head_dim = getattr(attn, "head_dim", 0)
                v = linears[parts[2]]
                if (o_name in linears and heads and head_dim and heads % kv_heads == 0
                        and v.out_features == kv_heads * head_dim
                        and linears[o_name].in_features == heads * head_dim):
                    groups.append(Group(f"{name}.attn_out", [o_name], producer=parts[2],
                                        n_rep=heads // kv_heads, head_dim=head_dim))
        if mlp is not None and norm2 is not None and _norm_ok(norm2):
            parts = [f"{name}.mlp.{p}" for p in ("gate_proj", "up_proj")]
            if all(p in linears for p in parts):
                groups.append(Group(f"{name}.mlp_in", parts, f"{name}.post_attention_layernorm"))
                down = f"{name}.mlp.down_proj"
                if (down in linears and _is_gated_mlp(mlp)
                        and linears[down].in_features == linears[parts[1]].out_features):
                    groups.append(Group(f"{name}.mlp_out", [down], producer=parts[1]))
    output = model.get_output_embeddings()
    head = next((n for n, m in linears.items() if m is output), None)
    base = getattr(model, "model", None)
    final_norm = getattr(base, "norm", None)
    if head is not None and final_norm is not None and _norm_ok(final_norm):
        groups.append(Group("lm_head_in", [head], "model.norm"))
    return groups


def _is_gated_mlp(mlp: torch.nn.Module) -> bool:
    """down(act(gate(x)) * up(x)): checked on the module itself with a random input, so a
    variant that does something else to up's output is never folded."""
    if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    with torch.no_grad():
        x = torch.randn(2, mlp.gate_proj.in_features, dtype=mlp.gate_proj.weight.dtype)
        expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        return torch.allclose(mlp(x), expected, rtol=1e-4, atol=1e-5)


def _norm_ok(norm: torch.nn.Module) -> bool:
    """The norm scales its output per channel by `weight` (and adds `bias`): dividing both by s
    divides the output by s. Checked numerically (Gemma's (1 + weight) fails and is skipped)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return False
    bias = getattr(norm, "bias", None)
    with torch.no_grad():
        x = torch.randn(3, weight.numel(), dtype=weight.dtype)
        s = torch.rand(weight.numel(), dtype=weight.dtype) + 0.5
        expected = norm(x) / s
        old_w, old_b = weight.detach().clone(), None if bias is None else bias.detach().clone()
        weight.div_(s)
        if bias is not None:
            bias.div_(s)
        try:
            got = norm(x)
        finally:
            weight.copy_(old_w)
            if bias is not None:
                bias.copy_(old_b)
    return torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


# ---- calibration ---------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the lm_head hook: its input is all calibration needs, its 49k-wide output isn't."""


@dataclass
class Stats:
    absmax: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> [K]
    body_absmax: dict[str, torch.Tensor] = field(default_factory=dict)  # without outlier rows
    rows: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # linear -> [T, K] chunks


def calibrate(model: torch.nn.Module, linears: dict[str, torch.nn.Linear],
              samples: list[tuple[torch.Tensor, torch.Tensor]]) -> Stats:
    stats = Stats()
    generator = torch.Generator().manual_seed(SEED)
    per_sample = max(1, math.ceil(AUTO_TOKENS / len(samples)))
    state: dict[str, Any] = {}
    output = model.get_output_embeddings()
    handles = []

    def hook_for(name: str, stop: bool):
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            x = x[state["valid"]]
            amax = x.abs().amax(dim=0)
            old = stats.absmax.get(name)
            stats.absmax[name] = amax if old is None else torch.maximum(old, amax)
            # the same without the outlier tokens (attention sinks): the int8 range
            row_max = x.abs().amax(dim=1)
            body = x[row_max <= OUTLIER_FACTOR * row_max.median()]
            if body.shape[0]:
                amax = body.abs().amax(dim=0)
                old = stats.body_absmax.get(name)
                stats.body_absmax[name] = amax if old is None else torch.maximum(old, amax)
            # random rows, plus the row holding this sample's largest value: the outlier tokens
            # that set the activation range must weigh in when a clipped range is scored
            top = x.abs().amax(dim=1).argmax().reshape(1)
            stats.rows.setdefault(name, []).append(x[torch.cat((state["pick"], top))].clone())
            if stop:
                raise _StopForward
        return hook

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(hook_for(name, module is output)))
    try:
        with torch.inference_mode():
            for ids, mask in bar(samples, "SmoothQuant calibration", unit="sample"):
                valid = mask.reshape(-1).bool()
                count = int(valid.sum())
                state["valid"] = valid
                state["pick"] = torch.randperm(count, generator=generator)[:per_sample]
                try:
                    model(input_ids=ids, attention_mask=mask)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return stats


# ---- smoothing and quantization ------------------------------------------------------------------

def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float
                      ) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); 1 for a channel that is never active."""
    act = act_max.clamp_min(1e-5)
    s = act.pow(alpha) / weight_max.clamp_min(1e-5).pow(1.0 - alpha)
    s = s.clamp(1e-4, 1e4)
    return torch.where(act_max > 0, s, torch.ones_like(s))


def _group_inputs(group: Group, stats: Stats, weights: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel activation abs-max, per-channel weight abs-max) of the group's input; for
    a GQA o_proj, channels fed by the same v channel are reduced together."""
    act = stats.absmax[group.consumers[0]]
    wmax = torch.stack([weights[c].abs().amax(dim=0) for c in group.consumers]).amax(dim=0)
    if group.n_rep > 1:
        act = _per_kv(act, group)
        wmax = _per_kv(wmax, group)
    return act, wmax


def _per_kv(v: torch.Tensor, group: Group) -> torch.Tensor:
    # o_proj input channel (head h, dim d) comes from v channel (h // n_rep, d).
    return v.view(-1, group.n_rep, group.head_dim).amax(dim=1).reshape(-1)


def _expand(s: torch.Tensor, group: Group) -> torch.Tensor:
    """Factors per producer output channel -> per consumer input channel."""
    if group.n_rep == 1:
        return s
    return s.view(-1, 1, group.head_dim).expand(-1, group.n_rep, -1).reshape(-1)


def quantize_static(weight: torch.Tensor, act_absmax: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """int8 weight per output channel (symmetric) and the static per-tensor activation scale."""
    q, scales = kernels.quantize_int8(weight.float())
    act_scale = torch.tensor([max(act_absmax, 1e-8) / 127.0])
    return q, scales, act_scale


def _fake_quant_output(x: torch.Tensor, weight: torch.Tensor, act_absmax: float) -> torch.Tensor:
    """What StaticInt8Linear computes: rows beyond the int8 range keep float activations."""
    q, scales, act_scale = quantize_static(weight, act_absmax)
    s = float(act_scale)
    xq = torch.clamp(torch.round(x / s), -127, 127) * s
    over = x.abs().amax(dim=1) > OVERFLOW * s
    xq[over] = x[over]
    return xq @ (q.float() * scales[:, None]).T


def output_error(x: torch.Tensor, weight: torch.Tensor, col_scale: torch.Tensor,
                 act_absmax: float) -> tuple[float, float]:
    """(sum over rows of ||y_q - y||^2 / ||y||^2, rows) for a projection whose input x is
    divided and weight columns multiplied by col_scale (the bias cancels out). Per row, not
    over the whole output: a few tokens with massive activations (attention sinks, outputs
    in the thousands) would otherwise hide what a coarse int8 step does to all the others."""
    reference = x @ weight.T
    got = _fake_quant_output(x / col_scale, weight * col_scale, act_absmax)
    per_row = (got - reference).square().sum(dim=1) / reference.square().sum(dim=1).clamp_min(
        1e-20)
    return float(per_row.sum()), float(x.shape[0])


@dataclass
class Recipe:
    """What calibration decided; JSON-serializable (the --qconfig-summary-file)."""

    alpha: str
    groups: dict[str, dict[str, Any]]  # name -> {alpha, consumers, norm, producer, ..., factors}
    act_absmax: dict[str, float]  # linear -> max |input after smoothing| over calibration
    errors: dict[str, float]  # linear -> relative output error when quantized
    fallback: dict[str, str]  # linear -> why it stays in float (automatic ones only)
    calibration: dict[str, Any]
    source_model: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": RECIPE_FORMAT, "alpha": self.alpha, "source_model": self.source_model,
                "calibration": self.calibration, "fallback": self.fallback,
                "errors": self.errors, "act_absmax": self.act_absmax, "groups": self.groups}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return cls(alpha=str(data["alpha"]), groups=data["groups"],
                   act_absmax={k: float(v) for k, v in data["act_absmax"].items()},
                   errors={k: float(v) for k, v in data.get("errors", {}).items()},
                   fallback=dict(data.get("fallback", {})), calibration=data["calibration"],
                   source_model=data["source_model"])


def column_scales(recipe: Recipe) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                           dict[str, torch.Tensor]]:
    """(linear -> factors its weight columns are multiplied by, linear -> factors its output rows
    are divided by, norm module -> factors its weight/bias are divided by)."""
    cols, rows, norms = {}, {}, {}
    for g in recipe.groups.values():
        s = torch.tensor(g["factors"], dtype=torch.float32)
        group = Group(g["name"], g["consumers"], g.get("norm"), g.get("producer"),
                      g.get("n_rep", 1), g.get("head_dim", 0))
        for consumer in group.consumers:
            cols[consumer] = _expand(s, group)
        if group.norm:
            norms[group.norm] = s
        if group.producer:
            rows[group.producer] = s
    return cols, rows, norms


def smoothed_model_tensors(model: torch.nn.Module, recipe: Recipe
                           ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                                      dict[str, torch.Tensor]]:
    """The recipe's smoothing applied in float: (linear -> (weight, bias)) and the changed norm
    parameters (name -> tensor). The model itself is not modified."""
    from llmbench.quant.apply import linear_modules

    cols, rows, norms = column_scales(recipe)
    modules = dict(model.named_modules())
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name, module in linear_modules(model).items():
        if name not in recipe.act_absmax:
            continue
        w = module.weight.detach().float()
        b = None if module.bias is None else module.bias.detach().float()
        if name in cols:
            w = w * cols[name][None, :]
        if name in rows:
            w = w / rows[name][:, None]
            b = None if b is None else b / rows[name]
        out[name] = (w, b)
    overrides: dict[str, torch.Tensor] = {}
    for norm_name, s in norms.items():
        norm = modules[norm_name]
        overrides[f"{norm_name}.weight"] = norm.weight.detach().float() / s
        if getattr(norm, "bias", None) is not None:
            overrides[f"{norm_name}.bias"] = norm.bias.detach().float() / s
    return out, overrides


def build_recipe(model: torch.nn.Module, stats: Stats, alpha: str,
                 calibration: dict[str, Any], source_model: dict[str, Any],
                 log: Any = print) -> Recipe:
    from llmbench.quant.apply import linear_modules

    linears = linear_modules(model)
    weights = {n: m.weight.detach().float() for n, m in linears.items()}
    rows = {n: torch.cat(chunks) for n, chunks in stats.rows.items()}
    groups = find_groups(model, linears)
    grid = ALPHA_GRID if alpha == "auto" else (float(alpha),)
    chosen: dict[str, dict[str, Any]] = {}
    grouped: set[str] = set()
    for group in groups:
        act, wmax = _group_inputs(group, stats, weights)
        best = None
        for a in grid:
            s = smoothing_factors(act, wmax, a)
            col = _expand(s, group)
            act_absmax = float((stats.body_absmax[group.consumers[0]] / col).max())
            err = norm = 0.0
            if len(grid) > 1:
                for consumer in group.consumers:
                    e, n = output_error(rows[consumer], weights[consumer], col, act_absmax)
                    err, norm = err + e, norm + n
            score = err / max(norm, 1e-30)
            if best is None or score < best[0]:
                best = (score, a, s)
        assert best is not None
        chosen[group.name] = {"name": group.name, "alpha": best[1], "consumers": group.consumers,
                              "norm": group.norm, "producer": group.producer,
                              "n_rep": group.n_rep, "head_dim": group.head_dim,
                              "factors": [round(float(v), 7) for v in best[2]]}
        grouped.update(group.consumers)
    recipe = Recipe(alpha=alpha, groups=chosen, act_absmax={}, errors={}, fallback={},
                    calibration=calibration, source_model=source_model)
    cols, _, _ = column_scales(recipe)
    # Activation ranges, clipped where that lowers the output error (the same range for the
    # projections sharing an input, so q/k/v and gate/up still fuse), then each projection's
    # error. Row division of a producer (v_proj, up_proj) changes neither its input nor its
    # relative error: the weight's per-row int8 scale absorbs it.
    inputs = [g.consumers for g in groups] + [[n] for n in linears if n not in grouped]
    for names in inputs:
        col = cols.get(names[0], torch.ones(weights[names[0]].shape[1]))
        full = float((stats.body_absmax[names[0]] / col).max())
        best_clip = None
        for clip in CLIP_GRID:
            err = norm = 0.0
            for name in names:
                e, n = output_error(rows[name], weights[name], col, full * clip)
                err, norm = err + e, norm + n
            if best_clip is None or err < best_clip[0]:
                best_clip = (err, clip)
        assert best_clip is not None
        for name in names:
            recipe.act_absmax[name] = full * best_clip[1]
            e, n = output_error(rows[name], weights[name], col, recipe.act_absmax[name])
            recipe.errors[name] = round(math.sqrt(e / max(n, 1e-30)), 6)
    return recipe


class _Switch(torch.nn.Module):
    """A projection that runs either its int8 or its (smoothed) float version."""

    def __init__(self, quant: Any, float_: Any) -> None:
        super().__init__()
        self.quant, self.float_, self.use_quant = quant, float_, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.quant if self.use_quant else self.float_)(x.float()).to(x.dtype)


def split_for_fallback(samples: list[Any]) -> tuple[list[Any], list[Any]]:
    """(samples that set the activation ranges, samples the fallback search is judged on)."""
    if len(samples) >= 2 * EVAL_SAMPLES:
        return samples[:-EVAL_SAMPLES], samples[-EVAL_SAMPLES:]
    return samples, samples[:EVAL_SAMPLES]


def choose_fallback(model: torch.nn.Module, recipe: Recipe,
                    samples: list[tuple[torch.Tensor, torch.Tensor]], log: Any = print) -> None:
    """Which projections stay in float. Units (the projections sharing one input: q/k/v, o,
    gate/up, down, lm_head) are ranked, down_proj units first, by their per-row output error
    on the calibration rows (recipe.errors); then, in that order, units fall back in growing
    steps (1, 2, 3, 4, 6, ...) until the whole model's perplexity on `samples` (the held-out
    ones, see split_for_fallback; their first EVAL_TOKENS tokens) is within FALLBACK_BUDGET of
    float."""
    from llmbench.quant.apply import linear_modules, set_float_tensors

    eval_samples = [(ids[:, :EVAL_TOKENS], mask[:, :EVAL_TOKENS]) for ids, mask in samples]
    qlinears, overrides = make_linears(model, recipe, {})
    floats, _ = make_linears(model, recipe, dict.fromkeys(recipe.act_absmax, ""))
    originals = {n: m for n, m in linear_modules(model).items() if n in qlinears}
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in overrides}
    switches = {n: _Switch(qlinears[n], floats[n]) for n in qlinears}
    units = [g["consumers"] for g in recipe.groups.values()]
    covered = {n for unit in units for n in unit}
    units += [[n] for n in qlinears if n not in covered]
    down = {c for g in recipe.groups.values() if g["name"].endswith(".mlp_out")
            for c in g["consumers"]}
    # down_proj first: on the embedded model all 30 in float take perplexity from +4.9% to
    # +1.3%, while the per-row output error ranks some q/k/v and gate/up above them and the
    # calibration loss (a few hundred tokens) is too noisy to rank 121 units one by one.
    ranked = sorted(units, key=lambda unit: (unit[0] not in down,
                                             -max(recipe.errors[n] for n in unit)))

    def loss() -> float:
        total = count = 0.0
        with torch.inference_mode():
            for ids, mask in eval_samples:
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                keep = mask[:, 1:].reshape(-1).bool()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1])[keep],
                    ids[:, 1:].reshape(-1)[keep], reduction="sum")
                total, count = total + float(nll), count + int(keep.sum())
        return total / max(count, 1.0)

    def set_quant(names: set[str]) -> None:
        for n, switch in switches.items():
            switch.use_quant = n in names

    set_float_tensors(model, overrides)
    for n, switch in switches.items():
        model.set_submodule(n, switch)
    try:
        set_quant(set())
        base = loss()
        everything = set(qlinears)
        k = 0
        while True:
            set_quant(everything - {n for unit in ranked[:k] for n in unit})
            change = math.exp(loss() - base) - 1.0
            if change <= FALLBACK_BUDGET or k >= len(ranked):
                break
            k = min(len(ranked), k + max(1, k // 2))  # 1, 2, 3, 4, 6, 9, 13 ... units
        recipe.calibration["perplexity_change_after_fallback"] = round(change, 5)
        for unit in ranked[:k]:
            worst = max(recipe.errors[n] for n in unit)
            for n in unit:
                recipe.fallback[n] = (f"output error {recipe.errors[n]:.3f} (unit worst "
                                      f"{worst:.3f}): among the {k} most damaged units kept in "
                                      f"float to bring calibration perplexity within "
                                      f"{FALLBACK_BUDGET:.0%} of float")
        log(f"smoothquant: {k} of {len(units)} units kept in float; calibration perplexity "
            f"{change:+.2%} vs float")
    finally:
        for n, module in originals.items():
            model.set_submodule(n, module)
        set_float_tensors(model, saved)


# ---- the recipe file -----------------------------------------------------------------------------

def read_recipe(path: str, identity: dict[str, Any], alpha: str,
                linears: dict[str, torch.nn.Linear]) -> Recipe:
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") != RECIPE_FORMAT:
            raise UserError(f"--qconfig-summary-file {path} is not an llmbench SmoothQuant "
                            f"recipe (format {data.get('format')!r})")
        recipe = Recipe.from_dict(data)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            ValueError) as exc:
        raise UserError(f"--qconfig-summary-file {path}: cannot read it ({type(exc).__name__}: "
                        f"{exc})") from exc
    for key, what in (("config_sha256", "config"), ("weights_fingerprint", "weights")):
        if recipe.source_model.get(key) != identity.get(key):
            raise UserError(f"--qconfig-summary-file {path} was calibrated on another model "
                            f"({recipe.source_model.get('name')}; {what} differ from "
                            f"{identity.get('name')}): delete it to calibrate again")
    if recipe.alpha != str(alpha):
        raise UserError(f"--qconfig-summary-file {path} was calibrated with --alpha "
                        f"{recipe.alpha}, not {alpha}: pass --alpha {recipe.alpha} to reuse it")
    missing = sorted(set(recipe.act_absmax) ^ set(linears))
    if missing:
        raise UserError(f"--qconfig-summary-file {path} does not match this model's projections "
                        f"({missing[0]})")
    for g in recipe.groups.values():
        expect = linears[g["consumers"][0]].in_features // max(1, g.get("n_rep", 1))
        if len(g["factors"]) != expect:
            raise UserError(f"--qconfig-summary-file {path}: group {g['name']} has "
                            f"{len(g['factors'])} factors, the model needs {expect}")
    return recipe


def write_recipe(path: str, recipe: Recipe) -> None:
    from llmbench.atomic import write_text

    write_text(path, json.dumps(recipe.to_dict(), indent=1) + "\n")


# ---- the whole step ------------------------------------------------------------------------------

def parse_fallback_add(text: str | None, names: list[str]) -> dict[str, str]:
    """--fallback-add NAME[,NAME]: module names or dotted suffixes ("lm_head", "down_proj",
    "layers.3.mlp.down_proj"); one that matches nothing is an error, not a silent no-op."""
    chosen: dict[str, str] = {}
    if not text:
        return chosen
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        hits = [n for n in names if n == item or n.endswith("." + item)]
        if not hits:
            raise UserError(f"--fallback-add {item}: no projection of this model is called that "
                            f"(e.g. {names[0]}, or a suffix such as down_proj)")
        for hit in hits:
            chosen[hit] = "--fallback-add"
    return chosen


def make_linears(model: torch.nn.Module, recipe: Recipe, fallback: dict[str, str]
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The quantized projections (float for the fallback ones) and the smoothed norms."""
    tensors, overrides = smoothed_model_tensors(model, recipe)
    qlinears: dict[str, Any] = {}
    for name, (w, b) in tensors.items():
        if name in fallback:
            qlinears[name] = FloatLinear(w, b)
        else:
            q, scales, act_scale = quantize_static(w, recipe.act_absmax[name])
            qlinears[name] = StaticInt8Linear(q, scales, act_scale, b)
    return qlinears, overrides


def quantize(loaded: Any, q: QuantizationSettings, identity: dict[str, Any], log: Any = print
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """run_quantization.py --ipex-smooth-quant: (projections, float tensors to save, what to
    record in best_model.json)."""
    from llmbench.quant.apply import linear_modules

    model = loaded.model
    linears = linear_modules(model)
    fallback_user = parse_fallback_add(q.fallback_add, sorted(linears))
    recipe_path = q.qconfig_summary_file
    if recipe_path and Path(recipe_path).is_file():
        recipe = read_recipe(recipe_path, identity, q.alpha, linears)
        log(f"smoothquant: reusing the recipe {recipe_path} (no calibration)")
        recipe_state = "reused"
    else:
        calib = CalibSettings(q.dataset, q.calib_len, q.calib_iters, q.calib_shuffle,
                              q.calib_padding)
        samples, calib_info = calibration_samples(loaded.tokenizer, calib)
        log(f"smoothquant: calibrating on {calib_info['samples_used']} samples "
            f"({calib_info['tokens']} tokens) from {calib_info['source']}")
        range_samples, judge_samples = split_for_fallback(samples)
        calib_info["fallback_judged_on"] = (
            f"the last {len(judge_samples)} samples, held out of the activation ranges"
            if len(judge_samples) < len(samples) else
            f"the first {len(judge_samples)} calibration samples (too few samples to hold "
            f"{EVAL_SAMPLES} out)")
        stats = calibrate(model, linears, range_samples)
        recipe = build_recipe(model, stats, str(q.alpha), calib_info,
                              {k: identity.get(k) for k in ("name", "family", "config_sha256",
                                                            "weights_fingerprint")}, log)
        del stats
        choose_fallback(model, recipe, judge_samples, log)
        recipe_state = "written" if recipe_path else "not saved"
    fallback = {**recipe.fallback, **fallback_user}
    qlinears, overrides = make_linears(model, recipe, fallback)
    alphas = [g["alpha"] for g in recipe.groups.values()]
    info = {
        "alpha": recipe.alpha,
        "alpha_per_group": {n: g["alpha"] for n, g in recipe.groups.items()},
        "alpha_mean": round(sum(alphas) / len(alphas), 3) if alphas else None,
        "smoothed_groups": len(recipe.groups),
        "unsmoothed_projections": sorted(set(linears) - {c for g in recipe.groups.values()
                                                         for c in g["consumers"]}),
        "calibration": recipe.calibration,
        "activation_quantization": "int8 static per-tensor symmetric",
        "weight_quantization": "int8 per output channel symmetric",
        "fallback": dict(sorted(fallback.items())),
        "fallback_budget": FALLBACK_BUDGET,
        "max_error_quantized": max((e for n, e in recipe.errors.items() if n not in fallback),
                                   default=None),
        "recipe": {"path": recipe_path, "state": recipe_state},
    }
    return qlinears, overrides, {"recipe": recipe, "info": info}
