"""The single-instance generation benchmark (single_instance/run_generation.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from llmbench import backends
from llmbench.bench import BenchmarkRun, run_benchmark
from llmbench.cli import flags, settings_from
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
from llmbench.settings import Settings

DESCRIPTION = "Generation latency benchmark of a Hugging Face causal LM on CPU."


def build_parser(prog: str = "run_generation.py") -> flags.Parser:
    return flags.build_parser(prog, DESCRIPTION, (*flags.single_generation_groups(),
                                                  flags.add_quantization_flags,
                                                  flags.add_benchmark_noop_flag))


def main(argv: list[str] | None = None) -> int:
    return benchmark(settings_from(build_parser().parse_args(argv)))


@dataclass
class Setup:
    """What a session loaded for the benchmark: the model as it runs, and its prompt (None: a
    text prompt from --input-tokens / --prompt, built by the body)."""

    loaded: Any
    prepared: backends.PreparedModel
    prompt: Any = None
    encoder_timer: Any = None
    decode_weight_bytes: int | None = None  # None: the loaded model's own count


class Session(Protocol):
    """Where the benchmark runs: this one process (SingleInstance), or one rank of a tensor
    parallel group (llmbench.distributed.benchmark.TensorParallel). The benchmark body is
    one; the session loads the model, names the run, adds its report sections and ends it."""

    is_root: bool  # prints and writes the report

    def begin(self, settings: Settings, notes: list[str]) -> None: ...
    def load(self, settings: Settings, request: Any, notes: list[str]) -> Setup: ...
    def headline(self, settings: Settings, setup: Setup, mode: str) -> list[str]: ...  # model first
    def stem_backend(self, setup: Setup) -> str: ...
    def add_sections(self, writer: ReportWriter, setup: Setup) -> None: ...
    def runnable(self, setup: Setup) -> Any: ...
    def complete(self, settings: Settings, setup: Setup, run: BenchmarkRun,
                 writer: ReportWriter | None, stats: dict[str, Any]) -> None: ...
    def load_text(self, setup: Setup) -> str: ...
    def after_results(self, writer: ReportWriter) -> None: ...
    def close(self) -> None: ...


def benchmark(settings: Settings, session: Session | None = None) -> int:
    """The benchmark of these settings, in this process or on this rank: load, prepare,
    measure, report."""
    session = SingleInstance() if session is None else session
    mode, generate_kwargs = decoding_of(settings)
    notes = check_dtype(settings.model.dtype)
    session.begin(settings, notes)
    from llmbench import multimodal

    request = multimodal.check_request(settings)  # None: a text model's run
    setup = session.load(settings, request, notes)
    loaded, prepared = setup.loaded, setup.prepared
    prompt = setup.prompt if setup.prompt is not None else text_prompt(settings, loaded)
    if session.is_root:
        for note in notes:
            print(f"note: {note}", flush=True)
        lines = session.headline(settings, setup, mode)
        if request is not None:  # after the model line, before any session details
            lines.insert(1, f"input: {request.describe()}")
        for line in lines:
            print(line, flush=True)
        print(f"---- Prompt size: {prompt.tokens}", flush=True)

    writer = None
    if session.is_root:
        report = base_report(settings, loaded, prepared, prompt, mode, generate_kwargs, notes)
        report["input"] = input_record(request)
        writer = ReportWriter(settings.measurement.output_dir, report_stem(
            loaded.family.model_type, settings.model.dtype, session.stem_backend(setup), mode),
            report)
        session.add_sections(writer, setup)
    decode_bytes = (setup.decode_weight_bytes if setup.decode_weight_bytes is not None
                    else loaded.decode_weight_bytes)

    def stats_of(run: BenchmarkRun) -> dict[str, Any]:
        return compute_statistics(run, settings.prompt.batch_size, decode_bytes)

    run = measure(settings, session.runnable(setup), loaded, prompt, generate_kwargs, writer,
                  stats_of, encoder_timer=setup.encoder_timer, streaming=session.is_root)
    stats = stats_of(run)
    session.complete(settings, setup, run, writer, stats)
    if writer is not None:
        print_results(run, stats, session.load_text(setup))
        session.after_results(writer)
        print(f"report: {writer.json_path}")
        print(f"summary: {writer.markdown_path}", flush=True)
    session.close()
    return 0


class SingleInstance:
    """The benchmark in this one process (single_instance/run_generation.py)."""

    is_root = True

    def begin(self, settings: Settings, notes: list[str]) -> None:
        self.backend = backends.requested(settings.model.backend, settings.model.ipex)

    def load(self, settings: Settings, request: Any, notes: list[str]) -> Setup:
        from llmbench import multimodal

        model = settings.model
        if request is None and settings.quantization.quantized_model_path is None:
            from llmbench.quant.checkpoint_settings import folder_quantization
            from llmbench.quant.workflow import scheme_of

            # -m of a GPTQ/AWQ folder takes the examples' weight-only flags (prepare_saved
            # checks them against the folder)
            if (scheme_of(settings.quantization) is not None
                    and folder_quantization(model.model_name_or_path) is None):
                raise UserError("run_generation.py benchmarks a saved quantized model: pass "
                                "--quantized-model-path (run.py with "
                                "--ipex-weight-only-quantization makes one first)")
        encoder_timer = prompt = None
        if request is not None:
            loaded, prompt = load_multimodal(settings, request)
            if request.image is not None or request.audio is not None:  # not in text mode 0
                encoder_timer = multimodal.EncoderTimer(loaded.model, loaded.family.model_type)
            prepared = multimodal.prepare(settings, loaded, self.backend)
        else:
            loaded = load_model(model.model_name_or_path, model.dtype, model.config_file)
            saved = settings.quantization.quantized_model_path is not None
            if saved or loaded.quantized is not None:  # a saved model, or a GPTQ/AWQ folder
                from llmbench.quant.workflow import prepare_saved

                prepared = prepare_saved(settings, loaded, self.backend)
            else:
                prepared = backends.prepare(loaded.model, backend=self.backend, dtype=model.dtype,
                                            family=loaded.family.model_type,
                                            kv_cache_dtype=model.kv_cache_dtype)
        loaded.model = prepared.model  # a backend that rebuilt the model frees the original
        if "fallback_reason" in prepared.details:
            notes.append(prepared.details["fallback_reason"])
        return Setup(loaded, prepared, prompt, encoder_timer)

    def headline(self, settings: Settings, setup: Setup, mode: str) -> list[str]:
        loaded = setup.loaded
        return [f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
                f"{settings.model.dtype} | backend {setup.prepared.backend} | {mode} | "
                f"load {loaded.load_seconds:.2f} s"]

    def stem_backend(self, setup: Setup) -> str:
        return setup.prepared.backend

    def add_sections(self, writer: ReportWriter, setup: Setup) -> None:
        pass

    def runnable(self, setup: Setup) -> Any:
        return setup.prepared.model

    def complete(self, settings: Settings, setup: Setup, run: BenchmarkRun,
                 writer: ReportWriter | None, stats: dict[str, Any]) -> None:
        writer.update("complete", run, stats, profile_trace=run.trace_path)

    def load_text(self, setup: Setup) -> str:
        loaded = setup.loaded
        return f"{loaded.load_seconds:.2f} s" + (
            f" (+{loaded.conversion_seconds:.1f} s converting GGUF, first run only)"
            if loaded.conversion_seconds else "")

    def after_results(self, writer: ReportWriter) -> None:
        print(f"Peak RSS: {writer.report['peak_rss_bytes'] / 2**20:.0f} MiB")

    def close(self) -> None:
        pass


# ---- the steps the single-instance and tensor-parallel benchmarks share ---------------------


def decoding_of(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The decoding mode's name and generate() settings, checked against the batch."""
    decoding = settings.decoding
    mode, generate_kwargs = decoding_settings(
        greedy=decoding.greedy, sample=decoding.sample, num_beams=decoding.num_beams,
        max_new_tokens=decoding.max_new_tokens, generation_config=decoding.generation_config)
    if decoding.streaming and (generate_kwargs["num_beams"] > 1
                               or settings.prompt.batch_size > 1):
        raise UserError("--streaming needs one beam (--greedy or --sample) and --batch-size 1")
    return mode, generate_kwargs


def text_prompt(settings: Settings, loaded: Any) -> Any:
    """A text model's prompt: --prompt, or exactly --input-tokens tokens of prompt.json."""
    return build_prompt(loaded.tokenizer, loaded.config, loaded.family.model_type,
                        input_tokens=settings.prompt.input_tokens,
                        prompt_text=settings.prompt.prompt,
                        batch_size=settings.prompt.batch_size,
                        max_new_tokens=settings.decoding.max_new_tokens,
                        seq2seq=loaded.family.seq2seq)


def input_record(request: Any) -> dict[str, Any]:
    """The report's `input`: the multimodal request, or a text run's."""
    return (request.record() if request is not None
            else {"mode": 0, "mode_name": "text", "image": None, "audio": None})


def measure(settings: Settings, model: Any, loaded: Any, prompt: Any,
            generate_kwargs: dict[str, Any], writer: ReportWriter | None, stats_of: Any, *,
            encoder_timer: Any = None, streaming: bool = True) -> BenchmarkRun:
    """The measured iterations (warm-up first), the report rewritten after each; a failure is
    recorded in the report before it propagates. writer None: a rank that writes nothing."""
    measurement, decoding = settings.measurement, settings.decoding
    try:
        return run_benchmark(
            model, loaded.tokenizer, prompt, generate_kwargs,
            seq2seq=loaded.family.seq2seq, num_iter=measurement.num_iter,
            num_warmup=measurement.num_warmup, token_latency=measurement.token_latency,
            streaming=decoding.streaming and streaming, profile=measurement.profile,
            seed=decoding.seed, trace_dir=writer.json_path.parent if writer else None,
            on_iteration=(lambda partial: writer.update("running", partial, stats_of(partial)))
            if writer else None, encoder_timer=encoder_timer)
    except BaseException as exc:
        record_failure(writer, exc)
        raise


def record_failure(writer: ReportWriter | None, exc: BaseException) -> None:
    """The report says the run failed, and why (a user error as its one line)."""
    if writer is not None:
        writer.fail(" ".join(str(exc).split()) if isinstance(exc, UserError)
                    else f"{type(exc).__name__}: {exc}")


def print_results(run: BenchmarkRun, stats: dict[str, Any], load: str) -> None:
    """The profile (if asked), the first sequence and the examples' summary lines."""
    if run.profile_table:
        print(run.profile_table)
        if run.trace_path:
            print(f"profile trace: {run.trace_path}")
    print(f"generated (first sequence): {run.generated_text[0]!r}")
    for line in summary_lines(stats):
        print(line)
    print(f"Model load: {load}")


def load_multimodal(settings: Settings, request: Any) -> tuple[Any, Any]:
    """A multimodal model and its inputs, built by its processor (llmbench.multimodal)."""
    from llmbench import multimodal
    from llmbench.quant.workflow import scheme_of

    # quantization reads the fp32 weights; the model then runs in --dtype (multimodal.prepare)
    load_dtype = ("float32" if scheme_of(settings.quantization) is not None
                  else settings.model.dtype)
    loaded, processor = multimodal.load(settings, request, load_dtype)
    prompt = multimodal.build_inputs(processor, request, settings.prompt.prompt,
                                     settings.prompt.batch_size, settings.model.dtype)
    return loaded, prompt


def base_report(settings: Settings, loaded: Any, prepared: backends.PreparedModel,
                prompt: Any, mode: str, generate_kwargs: dict[str, Any],
                notes: list[str]) -> dict[str, Any]:
    return {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "started",
        "config": settings.flags,
        "model": loaded.record(),
        "backend": {"name": prepared.backend, **prepared.details,
                    **getattr(prepared.model, "runtime_details", dict)()},
        "decoding": {"mode": mode, "generate_kwargs": generate_kwargs},
        "prompt": {"tokens": prompt.tokens, "source": prompt.source, "text": prompt.text},
        "notes": notes,
        "environment": collect_environment(),
    }
