"""The single-instance generation benchmark (single_instance/run_generation.py)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from llmbench import backends, flags
from llmbench.bench import BenchmarkRun, run_benchmark
from llmbench.decoding import decoding_settings
from llmbench.environment import collect_environment
from llmbench.errors import UserError
from llmbench.models import load_model
from llmbench.precision import check_dtype
from llmbench.prompts import build_prompt
from llmbench.report import (
    REPORT_SCHEMA,
    ReportWriter,
    compute_statistics,
    report_stem,
    summary_lines,
)

DESCRIPTION = "Generation latency benchmark of a Hugging Face causal LM on CPU."


def build_parser(prog: str = "run_generation.py") -> flags.Parser:
    return flags.build_parser(prog, DESCRIPTION, (*flags.single_generation_groups(),
                                                  flags.add_quantization_flags,
                                                  flags.add_benchmark_noop_flag))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backend = backends.requested(args.backend, args.ipex)
    mode, generate_kwargs = decoding_settings(
        greedy=args.greedy, sample=args.sample, num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens, generation_config=args.generation_config)
    if args.streaming and (generate_kwargs["num_beams"] > 1 or args.batch_size > 1):
        raise UserError("--streaming needs one beam (--greedy or --sample) and --batch-size 1")
    from llmbench import multimodal

    request = multimodal.check_request(args)  # None: a text model's run, as before
    if request is None and args.quantized_model_path is None:
        from llmbench.quant.checkpoint_settings import folder_quantization
        from llmbench.quant.cli import scheme_from_args

        # -m of a GPTQ/AWQ folder takes the examples' weight-only flags (prepare_saved checks
        # them against the folder)
        if (scheme_from_args(args) is not None
                and folder_quantization(args.model_name_or_path) is None):
            raise UserError("run_generation.py benchmarks a saved quantized model: pass "
                            "--quantized-model-path (run.py with --ipex-weight-only-quantization "
                            "makes one first)")
    if args.quant_with_amp:
        args.dtype = "bfloat16"  # the layers left unquantized run in bf16
    notes = check_dtype(args.dtype)

    encoder_timer = None
    if request is not None:
        loaded, prompt = load_multimodal(args, request)
        if request.image is not None or request.audio is not None:  # not in text mode 0
            encoder_timer = multimodal.EncoderTimer(loaded.model, loaded.family.model_type)
        prepared = multimodal.prepare(args, loaded, backend)
    else:
        loaded = load_model(args.model_name_or_path, args.dtype, args.config_file)
        if args.quantized_model_path is not None or loaded.quantized is not None:  # saved/GPTQ
            from llmbench.quant.cli import prepare_saved

            prepared = prepare_saved(args, loaded, backend)
        else:
            prepared = backends.prepare(loaded.model, backend=backend, dtype=args.dtype,
                                        family=loaded.family.model_type,
                                        kv_cache_dtype=args.kv_cache_dtype)
    loaded.model = prepared.model  # a backend that rebuilt the model frees the original
    if "fallback_reason" in prepared.details:
        notes.append(prepared.details["fallback_reason"])
    if request is None:
        prompt = build_prompt(loaded.tokenizer, loaded.config, loaded.family.model_type,
                              input_tokens=args.input_tokens, prompt_text=args.prompt,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              seq2seq=loaded.family.seq2seq)
    for note in notes:
        print(f"note: {note}", flush=True)
    print(f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
          f"{args.dtype} | backend {prepared.backend} | {mode} | "
          f"load {loaded.load_seconds:.2f} s", flush=True)
    if request is not None:
        print(f"input: {request.describe()}", flush=True)
    print(f"---- Prompt size: {prompt.tokens}", flush=True)

    report = base_report(args, loaded, prepared, prompt, mode, generate_kwargs, notes)
    report["input"] = (request.record() if request is not None
                       else {"mode": 0, "mode_name": "text", "image": None, "audio": None})
    writer = ReportWriter(args.output_dir,
                          report_stem(loaded.family.model_type, args.dtype, prepared.backend, mode),
                          report)

    def stats_of(run: BenchmarkRun) -> dict[str, Any]:
        return compute_statistics(run, args.batch_size, loaded.decode_weight_bytes)

    try:
        run = run_benchmark(
            prepared.model, loaded.tokenizer, prompt, generate_kwargs,
            seq2seq=loaded.family.seq2seq, num_iter=args.num_iter, num_warmup=args.num_warmup,
            token_latency=args.token_latency, streaming=args.streaming, profile=args.profile,
            seed=args.seed, trace_dir=writer.json_path.parent,
            on_iteration=lambda partial: writer.update("running", partial, stats_of(partial)),
            encoder_timer=encoder_timer)
    except UserError as exc:
        writer.fail(str(exc))
        raise
    except BaseException as exc:
        writer.fail(f"{type(exc).__name__}: {exc}")
        raise
    stats = stats_of(run)
    writer.update("complete", run, stats, profile_trace=run.trace_path)

    if run.profile_table:
        print(run.profile_table)
        if run.trace_path:
            print(f"profile trace: {run.trace_path}")
    print(f"generated (first sequence): {run.generated_text[0]!r}")
    for line in summary_lines(stats):
        print(line)
    print(f"Model load: {loaded.load_seconds:.2f} s"
          + (f" (+{loaded.conversion_seconds:.1f} s converting GGUF, first run only)"
             if loaded.conversion_seconds else ""))
    print(f"Peak RSS: {writer.report['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"report: {writer.json_path}")
    print(f"summary: {writer.markdown_path}", flush=True)
    return 0


def load_multimodal(args: argparse.Namespace, request: Any) -> tuple[Any, Any]:
    """A multimodal model and its inputs, built by its processor (llmbench.multimodal)."""
    from llmbench import multimodal
    from llmbench.quant.cli import scheme_from_args

    # quantization reads the fp32 weights; the model then runs in --dtype (multimodal.prepare)
    load_dtype = "float32" if scheme_from_args(args) is not None else args.dtype
    loaded, processor = multimodal.load(args, request, load_dtype)
    prompt = multimodal.build_inputs(processor, request, args.prompt, args.batch_size,
                                     args.dtype)
    return loaded, prompt


def base_report(args: argparse.Namespace, loaded: Any, prepared: backends.PreparedModel,
                prompt: Any, mode: str, generate_kwargs: dict[str, Any],
                notes: list[str]) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "started",
        "config": vars(args),
        "model": loaded.record(),
        "backend": {"name": prepared.backend, **prepared.details,
                    **getattr(prepared.model, "runtime_details", dict)()},
        "decoding": {"mode": mode, "generate_kwargs": generate_kwargs},
        "prompt": {"tokens": prompt.tokens, "source": prompt.source, "text": prompt.text},
        "notes": notes,
        "environment": collect_environment(),
    }
