"""The generation benchmark on every rank (distributed/run_generation_with_deepspeed.py): the
single-instance benchmark's generation, timing and report, plus each rank's record, the
all-reduce time per token, and rank 0's table of ranks."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from llmbench.cli import flags, rank_settings
from llmbench.distributed.model import (
    BACKEND_NAME,
    AutoTPModel,
    load_autotp_model,
    load_autotp_multimodal,
    load_native_tp,
    quantize_rank,
)
from llmbench.distributed.ranks import (
    FAIL_RANK_ENV,
    PeerWatchdog,
    RankInfo,
    all_reduce_path,
    barrier,
    current_rank,
    env_int,
    gather,
    init_process_group,
    inject_failure,
    setup_environment,
)
from llmbench.errors import UserError
from llmbench.settings import Settings

DESCRIPTION = ("Generation latency benchmark, tensor parallel across ranks with DeepSpeed AutoTP "
               "(one process per rank: launch with `deepspeed` or through run.py --autotp).")


class RecordingModel:
    """Passes generate() through and keeps its last output, so the report can hold the token
    ids every rank generated (the test compares them with a single-instance run)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.last_output: Any = None

    def generate(self, **kwargs: Any) -> Any:
        kill_at = kill_step()
        if kill_at is not None:  # tests: this rank dies mid-run, as a crashed rank would
            kwargs["stopping_criteria"] = [*(kwargs.get("stopping_criteria") or []),
                                           KillAtStep(kill_at)]
        self.last_output = self.model.generate(**kwargs)
        return self.last_output


class KillAtStep:
    """A stopping criterion that SIGKILLs this process at its `step`-th call (tests)."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import signal

        import torch

        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def kill_step() -> int | None:
    """LLMBENCH_FAIL_RANK=R@N: rank R kills itself at its N-th decoding step (tests)."""
    wanted = os.environ.get(FAIL_RANK_ENV, "")
    if "@" not in wanted:
        return None
    rank, step = wanted.split("@", 1)
    return int(step) if rank.strip() == str(current_rank()) else None


def build_parser(prog: str = "run_generation_with_deepspeed.py") -> flags.Parser:
    # The quantization group as a whole (one definition of each flag); what does not run per
    # rank is refused by llmbench.cli.autotp_scheme.
    return flags.build_parser(prog, DESCRIPTION, (*flags.generation_groups(),
                                                  flags.add_multimodal_flags,
                                                  flags.add_rank_flags,
                                                  flags.add_quantization_flags,
                                                  flags.add_benchmark_noop_flag))


def rank_record(info: RankInfo, tp: AutoTPModel, token_ids: list[list[int]],
                quant: Any = None) -> dict[str, Any]:
    import torch

    from llmbench.environment import peak_rss_bytes

    return {
        "rank": info.rank,
        "local_rank": info.local_rank,
        "host": socket.gethostname(),
        # the launcher's machine index (DeepSpeed's CROSS_RANK): tells apart "machines" that
        # share a host name, as the two-address test's do
        "node_rank": env_int("CROSS_RANK"),
        "pid": os.getpid(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_bytes": peak_rss_bytes(),
        "local_weight_bytes": tp.local_weight_bytes,
        "load_seconds": tp.loaded.load_seconds,
        **({} if quant is None else {
            "quantized_projections": len(quant.qlinears),
            "float_projections": len(quant.left_float),
            "empty_slices": len(quant.empty_slices),
            "quantized_weight_bytes": quant.nbytes,
            "quantize_seconds": quant.seconds}),
        "generated_token_ids": token_ids,
    }


def all_reduce_record(native: Any, run: Any, max_new_tokens: int) -> dict[str, Any]:
    """This rank's all-reduce time per generated token over every iteration it ran (warm-up
    included), measured around each call, and its weights' read rate at its own mean
    next-token latency."""
    seconds, calls = native.take_all_reduce_time()
    iterations = len(run.iterations) + len(run.warmup_seconds)
    tokens = max(1, iterations * max_new_tokens)
    steps = [s for it in run.iterations if it.step_latencies for s in it.step_latencies[1:]]
    record: dict[str, Any] = {
        "all_reduce_ms_per_token": 1000.0 * seconds / tokens,
        "all_reduce_calls_per_token": calls / tokens,
        "weight_bytes_per_token": native.weight_bytes}
    if steps:
        record["decode_read_gb_per_s"] = native.weight_bytes / (sum(steps) / len(steps)) / 1e9
    return record


def main(argv: list[str] | None = None) -> int:
    from llmbench.generation import benchmark

    parser = build_parser()
    settings, scheme = rank_settings(parser, parser.parse_args(argv))
    return benchmark(settings, TensorParallel(scheme))


class TensorParallel:
    """The benchmark on one rank of a tensor-parallel group (llmbench.generation.Session):
    every rank loads its slice (native, or DeepSpeed AutoTP's), quantizes it where asked, and
    runs the same generate() in step; rank 0 writes the report, with every rank's record and
    whether they generated the same tokens."""

    def __init__(self, scheme: Any) -> None:
        self.scheme = scheme  # the weight-only scheme each rank quantizes its slice with

    def begin(self, settings: Settings, notes: list[str]) -> None:
        from llmbench.models import resolve_source

        resolve_source(settings.model.model_name_or_path)  # every rank stops here alike
        self.info = info = setup_environment(settings.distribution.local_rank)
        self.comm_backend = init_process_group(info, settings.distribution.dist_timeout)
        self.watchdog = PeerWatchdog(info)
        inject_failure(info)
        self.is_root = info.rank == 0
        if info.world_size == 1:
            notes.append("one rank: nothing is tensor parallel; launch with `deepspeed "
                         "--num_accelerators N --bind_cores_to_rank run.py --autotp ...`")
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        if info.local_size > 1 and len(affinity) >= (os.cpu_count() or 1) > 1:
            notes.append("the ranks on this machine share all its cores: bind each to its own "
                         "(deepspeed --bind_cores_to_rank, or numactl)")

    def load(self, settings: Settings, request: Any, notes: list[str]) -> Any:
        from llmbench import multimodal
        from llmbench.backends import PreparedModel
        from llmbench.generation import Setup
        from llmbench.quant import autotp as tp_quant

        model, info, scheme = settings.model, self.info, self.scheme
        encoder_timer = prompt = native_prepared = fallback = None
        if model.backend == "native":
            shared_memory = all_reduce_path("float32", info) == "deepspeed shared-memory all-reduce"
            tp, native_prepared, prompt, fallback = load_native_tp(settings, scheme, info,
                                                                   shared_memory, request)
            if native_prepared is not None and request is not None and (
                    request.image is not None or request.audio is not None):
                encoder_timer = multimodal.EncoderTimer(native_prepared.model.model,
                                                        request.family.model_type)
        if fallback is not None:
            fallback = f"{fallback}: this run is STOCK transformers under DeepSpeed AutoTP"
            notes.append(fallback)
        if native_prepared is None and request is None:
            tp = load_autotp_model(model.model_name_or_path, model.dtype, model.config_file, info)
        elif native_prepared is None:
            tp, prompt = load_autotp_multimodal(settings, request, info)
            if request.image is not None or request.audio is not None:
                encoder_timer = multimodal.EncoderTimer(tp.loaded.model,
                                                        request.family.model_type)
        loaded = tp.loaded
        notes += tp.notes
        quant = None
        decode_bytes = getattr(loaded, "decode_weight_bytes", loaded.weight_bytes)
        if native_prepared is None and (scheme is not None or tp.checkpoint is not None):
            start = time.perf_counter()
            quant, scheme = quantize_rank(tp, scheme, settings.quantization.group_size)
            quant.seconds = time.perf_counter() - start
            tp.local_weight_bytes = tp_quant.weight_bytes(loaded.model)
            # The GB/s figure: what all ranks read per decoding step together, their quantized
            # slices (the float model's decode_weight_bytes would overstate it 2-7x).
            decode_bytes = sum(gather(tp_quant.decode_weight_bytes(tp.sharded)))
            loaded.decode_weight_bytes = decode_bytes
        all_reduce = all_reduce_path(model.dtype, info)
        details = {"tp_size": info.world_size, "communication_backend": self.comm_backend}
        if native_prepared is not None:
            prepared = native_prepared
            all_reduce = prepared.details["all_reduce"]
            prepared.details.update(details, load_path=tp.load_path)
        else:
            prepared = PreparedModel(model=loaded.model, backend=BACKEND_NAME, details={
                **details, "all_reduce": all_reduce, "load_path": tp.load_path,
                "attention": getattr(loaded.config, "_attn_implementation", None)})
            if model.backend == "native":
                prepared.details.update({"requested": "native", "fallback_reason": fallback})
        if quant is not None:
            prepared.details["quantization"] = quant.details() | {
                "weight_bytes_per_token": decode_bytes, "quantize_seconds": quant.seconds}
            prepared.details["weight_bytes_per_token"] = decode_bytes
            if "note" in prepared.details["quantization"]:
                notes.append(prepared.details["quantization"]["note"])
        self.tp, self.quant, self.scheme = tp, quant, scheme
        self.native = native_prepared is not None
        self.all_reduce = all_reduce
        return Setup(loaded, prepared, prompt, encoder_timer, decode_bytes)

    def headline(self, settings: Settings, setup: Any, mode: str) -> list[str]:
        loaded, info = setup.loaded, self.info
        backend_name = "native-autotp" if self.native else BACKEND_NAME
        lines = [f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
                 f"{settings.model.dtype} | {backend_name} x{info.world_size} "
                 f"({self.comm_backend}, {self.all_reduce}) | {mode} | "
                 f"load {loaded.load_seconds:.2f} s ({self.tp.load_path})"]
        if self.quant is not None:
            quant = self.quant
            splits = setup.prepared.details["quantization"]["splits_per_rank"]
            lines.append(f"quantized: {self.scheme.describe()}, {quant.applied}: "
                         f"{len(quant.qlinears)} projections per rank ("
                         + ", ".join(f"{n} {k}" for k, n in splits.items() if n)
                         + f"), {len(quant.left_float)} left float, in {quant.seconds:.1f} s; "
                         f"{setup.decode_weight_bytes / 2**20:.1f} MiB read per token over all "
                         "ranks")
        return lines

    def stem_backend(self, setup: Any) -> str:
        return f"autotp{self.info.world_size}"

    def add_sections(self, writer: Any, setup: Any) -> None:
        tp = self.tp
        writer.report["distributed"] = {
            "world_size": self.info.world_size, "communication_backend": self.comm_backend,
            "all_reduce": self.all_reduce, "load_path": tp.load_path,
            "checkpoint_files": tp.checkpoint_files,
            "launcher_env": {name: os.environ[name] for name in (
                "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE", "CROSS_SIZE", "DS_ACCELERATOR",
                "CCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if name in os.environ}}
        self.watchdog.on_abort = writer.fail

    def runnable(self, setup: Any) -> Any:
        model = setup.loaded.model
        self.recorder = RecordingModel(model)
        self.native_model = getattr(model, "native", model) if self.native else None
        if self.native_model is not None:
            self.native_model.take_all_reduce_time()  # from here on: the measured iterations
        return self.recorder

    def complete(self, settings: Settings, setup: Any, run: Any, writer: Any,
                 stats: dict[str, Any]) -> None:
        from llmbench.atomic import write_text
        from llmbench.generation import record_failure
        from llmbench.report import markdown

        recorder = self.recorder
        try:
            token_ids = recorder.last_output.tolist() if recorder.last_output is not None else []
            record = rank_record(self.info, self.tp, token_ids, self.quant)
            record["all_reduce"] = self.all_reduce
            if self.native_model is not None:
                record.update(all_reduce_record(self.native_model, run,
                                                settings.decoding.max_new_tokens))
            ranks = gather(record)
        except BaseException as exc:
            record_failure(writer, exc)
            raise
        if writer is None:
            return
        agree = all(record["generated_token_ids"] == token_ids for record in ranks)
        writer.report["distributed"].update(ranks=ranks, ranks_agree=agree)
        if self.native_model is not None:
            writer.report["distributed"]["all_reduce_ms_per_token"] = max(
                record["all_reduce_ms_per_token"] for record in ranks)
        writer.update("complete", run, stats, profile_trace=run.trace_path,
                      generated_token_ids=token_ids)
        if not agree:  # tensor parallel went wrong: the numbers measure something broken
            message = "the ranks generated different tokens (see the report's distributed.ranks)"
            writer.fail(message)
            raise UserError(message)
        write_text(writer.markdown_path, markdown(writer.report) + rank_table(writer.report))

    def load_text(self, setup: Any) -> str:
        return f"{setup.loaded.load_seconds:.2f} s ({self.tp.load_path})"

    def after_results(self, writer: Any) -> None:
        for record in writer.report["distributed"]["ranks"]:
            print(f"Rank {record['rank']}: cores {compact_cores(record['cpu_affinity'])}, "
                  f"peak RSS {record['peak_rss_bytes'] / 2**20:.0f} MiB, "
                  f"{record['local_weight_bytes'] / 2**20:.0f} MiB of weights")

    def close(self) -> None:
        self.watchdog.stop()
        barrier()
        import torch.distributed as dist

        dist.destroy_process_group()


def compact_cores(cores: list[int] | None) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    if not cores:
        return "?"
    spans: list[list[int]] = []
    for core in cores:
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def rank_table(report: dict[str, Any]) -> str:
    dist_info = report["distributed"]
    quant = report.get("backend", {}).get("quantization")
    lines = ["", f"## {dist_info['world_size']} ranks: {dist_info['communication_backend']}, "
                 f"{dist_info['all_reduce']}, {dist_info['load_path']}", ""]
    if quant is not None:  # the summary table above has no quantization row; say what ran
        lines += [f"Quantization: {quant['description']}, {quant['applied']}; "
                  f"{quant['weight_bytes_per_token'] / 2**20:.1f} MiB read per token over all "
                  "ranks.", ""]
    header = "| rank | host | cores | threads | peak RSS | weights |"
    lines += [header + (" quantized / float projections |" if quant else ""),
              "|---|---|---|---|---|---|" + ("---|" if quant else "")]
    for record in dist_info.get("ranks", []):
        line = (f"| {record['rank']} | {record['host']} | "
                f"{compact_cores(record['cpu_affinity'])} | {record['torch_threads']} | "
                f"{record['peak_rss_bytes'] / 2**20:.0f} MiB | "
                f"{record['local_weight_bytes'] / 2**20:.0f} MiB |")
        if quant:
            line += (f" {record.get('quantized_projections')} / "
                     f"{record.get('float_projections')} |")
        lines.append(line)
    return "\n".join(lines) + "\n"
