"""The warm-up / measured-iteration loop around model.generate()."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmbench.errors import UserError
from llmbench.prompts import Prompt
from llmbench.timing import StepTimer


@dataclass
class Iteration:
    seconds: float  # wall time of generate()
    new_tokens: int  # per sequence, counted from the output
    step_latencies: list[float] | None  # per decoding step, with --token-latency
    # a multimodal model's vision / audio encoder time before the first token (or in all of
    # generate() without --token-latency); None for a text model
    encoder_seconds: float | None = None


@dataclass
class BenchmarkRun:
    iterations: list[Iteration] = field(default_factory=list)
    warmup_seconds: list[float] = field(default_factory=list)
    generated_text: list[str] = field(default_factory=list)
    profile_table: str | None = None
    trace_path: str | None = None


def output_offset(prompt: Prompt, seq2seq: bool) -> int:
    """Where the new tokens start in generate()'s output."""
    if prompt.output_offset is not None:
        return prompt.output_offset
    # A seq2seq output starts with the decoder start token instead of the prompt.
    return 1 if seq2seq else prompt.tokens


def count_new_tokens(output: torch.Tensor, prompt: Prompt, seq2seq: bool) -> int:
    return output.shape[-1] - output_offset(prompt, seq2seq)


def run_benchmark(model: Any, tokenizer: Any, prompt: Prompt, generate_kwargs: dict[str, Any], *,
                  seq2seq: bool, num_iter: int, num_warmup: int, token_latency: bool,
                  streaming: bool, profile: bool, seed: int, trace_dir: Path | None = None,
                  on_iteration: Callable[[BenchmarkRun], None] | None = None,
                  encoder_timer: Any = None) -> BenchmarkRun:
    """Run num_warmup uncounted iterations, then num_iter measured ones (and, with profile, one
    more under the profiler, so profiling overhead never enters the measured numbers)."""
    from transformers import StoppingCriteriaList, TextStreamer

    expected = generate_kwargs["max_new_tokens"]
    timer = StepTimer()
    kwargs = dict(generate_kwargs)
    if prompt.input_ids is not None:  # a speech model may read audio features only
        kwargs["input_ids"] = prompt.input_ids
        kwargs["attention_mask"] = prompt.attention_mask
    kwargs.update(prompt.extra_inputs)
    kwargs["pad_token_id"] = tokenizer.pad_token_id
    if token_latency:
        kwargs["stopping_criteria"] = StoppingCriteriaList([timer])
    if streaming:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    run = BenchmarkRun()

    def one_iteration() -> tuple[float, torch.Tensor]:
        torch.manual_seed(seed)  # sampling draws the same tokens every iteration
        if encoder_timer is not None:
            encoder_timer.start()
        timer.start()
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**kwargs)
        seconds = time.perf_counter() - start
        new_tokens = count_new_tokens(output, prompt, seq2seq)
        if new_tokens != expected:
            raise UserError(f"the model generated {new_tokens} tokens instead of {expected}; "
                            "the numbers would not be comparable")
        if token_latency and len(timer.stamps) != new_tokens:
            raise UserError(f"timed {len(timer.stamps)} decoding steps for {new_tokens} tokens; "
                            "this model's generate() does not step once per token")
        return seconds, output

    for _ in range(num_warmup):
        seconds, _ = one_iteration()
        run.warmup_seconds.append(seconds)
    for _ in range(num_iter):
        seconds, output = one_iteration()
        run.iterations.append(Iteration(
            seconds=seconds,
            new_tokens=expected,
            step_latencies=timer.step_latencies() if token_latency else None,
            encoder_seconds=None if encoder_timer is None else encoder_timer.seconds_before(
                timer.stamps[0] if token_latency else None),
        ))
        if not run.generated_text:
            skip = output_offset(prompt, seq2seq)
            run.generated_text = tokenizer.batch_decode(output[:, skip:], skip_special_tokens=True)
        if on_iteration is not None:
            on_iteration(run)
    if profile:
        run.profile_table, run.trace_path = profile_once(one_iteration, trace_dir)
    return run


def profile_once(one_iteration: Callable[[], Any],
                 trace_dir: Path | None) -> tuple[str, str | None]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        one_iteration()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    trace_path = None
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        trace_path = str(trace_dir / f"profile-trace-{time.strftime('%Y%m%d-%H%M%S')}.json")
        prof.export_chrome_trace(trace_path)
    return table, trace_path
