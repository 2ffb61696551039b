"""single_instance/run_quantization.py's work: quantize a model, measure what it costs in
quality, and save it to the output folder as best_model.safetensors + best_model.json (run.py's
first step). Its command line (and --benchmark of the saved model) is llmbench.cli.quantize."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from llmbench.errors import UserError
from llmbench.quant.workflow import quantize_gptq, scheme_of
from llmbench.settings import Settings


def quantize_and_save(settings: Settings) -> Any:
    """Quantize the model of these settings, measure the quality cost (unless skipped), save it
    to the output folder; the saved model's path."""
    model_settings, q = settings.model, settings.quantization
    scheme = scheme_of(q)
    if scheme is None:
        raise UserError("nothing to quantize: pass --ipex-weight-only-quantization, "
                        "--ipex-smooth-quant or --low-precision-checkpoint")
    if model_settings.backend == "ipex" or model_settings.ipex:
        raise UserError("quantization runs on our kernels (--backend stock or native), not IPEX")

    from llmbench.models import load_model
    from llmbench.quant import apply, quality

    start = time.perf_counter()
    loaded = load_model(model_settings.model_name_or_path, "float32", model_settings.config_file)
    if loaded.quantized is not None:
        raise UserError(f"{loaded.source.display_name} is already quantized "
                        f"({loaded.quantized[1].describe()}): benchmark it with -m directly")
    identity = apply.model_identity(loaded)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
          f"quantizing: {scheme.describe()}", flush=True)
    reference = None
    if loaded.family.seq2seq and not q.skip_quality:
        # quality's perplexity and greedy checks score a causal LM's next-token predictions
        print("note: quality check skipped: it scores decoder-only models, and "
              f"{loaded.family.model_type} is an encoder-decoder", flush=True)
    elif not q.skip_quality:
        reference = quality.measure_reference(model, tokenizer)

    extra: dict[str, Any] = {}
    float_overrides: dict[str, Any] = {}
    recipe = None
    if scheme.method == "woq":
        qlinears = apply.quantize_rtn(model, scheme)
    elif scheme.method == "gptq":
        qlinears, extra["gptq"] = quantize_gptq(q, loaded, scheme)
    elif scheme.method == "checkpoint":
        from llmbench.quant.checkpoint import load_low_precision

        qlinears, file_scheme = load_low_precision(q.low_precision_checkpoint, model)
        scheme = dataclasses.replace(file_scheme, lowp_mode=scheme.lowp_mode,
                                     act_quant_mode=scheme.act_quant_mode)
        if q.group_size not in (0, scheme.group_size):
            raise UserError(f"--group-size {q.group_size}: the checkpoint's group size is "
                            f"{scheme.group_size}")
        print(f"checkpoint: {scheme.describe()} (desc_act {scheme.extra['desc_act']}, settings "
              f"{scheme.extra['settings_from']})", flush=True)
    elif scheme.method == "smoothquant":
        from llmbench.quant import smoothquant

        qlinears, float_overrides, result_sq = smoothquant.quantize(loaded, q, identity)
        recipe, extra["smoothquant"] = result_sq["recipe"], result_sq["info"]
        fallback = extra["smoothquant"]["fallback"]
        print(f"smoothquant: alpha {scheme.extra['alpha']} (mean over groups "
              f"{extra['smoothquant']['alpha_mean']}); {len(fallback)} projection(s) kept in "
              f"float: {', '.join(fallback) or 'none'}", flush=True)
    else:  # refused in scheme_of; kept for when they land
        raise UserError(f"{scheme.method} is not implemented yet")
    quantize_seconds = time.perf_counter() - start
    apply.set_float_tensors(model, float_overrides)
    # quality is measured as the benchmark will compute; the projections saved are qlinears
    apply.install_hf(model, apply.set_compute(qlinears, scheme))

    result = None
    if reference is not None:
        result = quality.compare(reference, model, tokenizer)
        print(f"quality ({scheme.describe()}): {quality.summary(result)}", flush=True)
    extra["quantize_seconds"] = quantize_seconds
    path = apply.save(settings.measurement.output_dir, qlinears, scheme, identity, result,
                      float_overrides, extra)
    weight_bytes = sum(linear.nbytes for linear in qlinears.values())
    print(f"quantized {len(qlinears)} projections ({weight_bytes / 2**20:.1f} MiB) in "
          f"{quantize_seconds:.1f} s", flush=True)
    print(f"saved: {path} and {apply.meta_path_for(path).name}", flush=True)
    if recipe is not None and extra["smoothquant"]["recipe"]["state"] == "written":
        from llmbench.quant.smoothquant import write_recipe

        write_recipe(q.qconfig_summary_file, recipe)
        print(f"smoothquant recipe: {q.qconfig_summary_file}", flush=True)
    return path


