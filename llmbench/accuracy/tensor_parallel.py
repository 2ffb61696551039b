"""The accuracy run on every rank under DeepSpeed AutoTP
(distributed/run_accuracy_with_deepspeed.py): the same tasks and report as one process, the
model sliced by llmbench.distributed.model; rank 0 writes the report."""

from __future__ import annotations

from typing import Any

from llmbench import backends
from llmbench.accuracy.single_instance import announce_default, evaluate_and_report
from llmbench.accuracy.tasks import load_tasks, quiet_lm_eval_logging, task_requests
from llmbench.cli import WHOLE_MODEL_REASON, flags, settings_from
from llmbench.errors import UserError
from llmbench.settings import Settings

RANK_DESCRIPTION = ("Accuracy with lm-eval, tensor parallel across ranks with DeepSpeed AutoTP "
                    "(one process per rank: launch with `deepspeed`); rank 0 writes the results.")


def build_rank_parser(prog: str = "run_accuracy_with_deepspeed.py") -> flags.Parser:
    return flags.build_parser(prog, RANK_DESCRIPTION, (*flags.accuracy_groups(),
                                                       flags.add_rank_flags))


def check_rank_args(settings: Settings) -> Any:
    """What run_accuracy_with_deepspeed.py refuses before anything loads (every rank alike),
    and the weight-only scheme each rank quantizes its slice with (None: float)."""
    from llmbench.quant.workflow import scheme_of

    backend = "ipex" if settings.model.ipex else settings.model.backend
    if backend == "ipex":
        from llmbench.backends.ipex import require_ipex

        require_ipex()  # IPEX absent: one line saying so
        raise UserError("run_accuracy_with_deepspeed.py --ipex: ipex.llm.optimize of a DeepSpeed "
                        "AutoTP model is not wired in here; drop --ipex")
    if backend != "stock" or settings.model.kv_cache_dtype != "auto":
        raise UserError("run_accuracy_with_deepspeed.py runs transformers' own model, tensor "
                        "parallel: drop --backend/--kv-cache-dtype")
    if settings.quantization.quantized_model_path is not None:
        raise UserError(f"--quantized-model-path does not run tensor parallel: a saved quantized "
                        f"model {WHOLE_MODEL_REASON}, or evaluate it with "
                        "single_instance/run_accuracy.py")
    if settings.quantization.low_precision_checkpoint is not None:
        raise UserError(f"--low-precision-checkpoint does not run tensor parallel: a whole-model "
                        f"checkpoint {WHOLE_MODEL_REASON}")
    scheme = scheme_of(settings.quantization)
    if scheme is not None and scheme.method != "woq":
        raise UserError(f"{scheme.describe()} does not run tensor parallel: each rank quantizes "
                        "its slice round to nearest (--ipex-weight-only-quantization without "
                        "--gptq / --ipex-smooth-quant)")
    return scheme


def rank_main(argv: list[str] | None = None) -> int:
    """distributed/run_accuracy_with_deepspeed.py: every rank holds a slice of the model and
    scores every document (lm-eval sees one process per rank: the ranks run the same batches in
    step, as AutoTP's all-reduces need); rank 0 prints the table and writes the report."""
    from llmbench.distributed import model as tp_model
    from llmbench.distributed import ranks
    from llmbench.precision import check_dtype

    settings = settings_from(build_rank_parser().parse_args(argv))
    model = settings.model
    scheme = check_rank_args(settings)
    requests = task_requests(settings.accuracy)
    notes = check_dtype(model.dtype)
    info = ranks.setup_environment(settings.distribution.local_rank)
    is_root = info.rank == 0
    if is_root:
        announce_default(settings.accuracy)
    quiet_lm_eval_logging()
    manager, tasks = load_tasks(requests)  # every rank: the same documents in the same order
    comm_backend = ranks.init_process_group(info, settings.distribution.dist_timeout)
    ranks.inject_failure(info)
    if info.world_size == 1:
        notes.append("one rank: nothing is tensor parallel; launch with `deepspeed "
                     "--num_accelerators N --bind_cores_to_rank "
                     "distributed/run_accuracy_with_deepspeed.py ...`")
    tp = tp_model.load_autotp_model(model.model_name_or_path, model.dtype, model.config_file, info)
    notes += tp.notes
    prepared = backends.PreparedModel(model=tp.loaded.model, backend=tp_model.BACKEND_NAME,
                                      details={"tp_size": info.world_size,
                                               "communication_backend": comm_backend,
                                               "load_path": tp.load_path})
    if scheme is not None or tp.checkpoint is not None:  # as the AutoTP benchmark does
        quant, scheme = tp_model.quantize_rank(tp, scheme, settings.quantization.group_size)
        prepared.details["quantization"] = quant.details()
        if is_root:
            print(f"quantized: {scheme.describe()}, {quant.applied}: {len(quant.qlinears)} "
                  f"projections per rank, {len(quant.left_float)} left float", flush=True)
    extra = {"distributed": {"world_size": info.world_size,
                             "communication_backend": comm_backend,
                             "load_path": tp.load_path,
                             "all_reduce": ranks.all_reduce_path(model.dtype, info)}}
    status = evaluate_and_report(settings, tp.loaded, prepared, requests, manager, tasks, notes,
                                 write=is_root, extra=extra)
    ranks.barrier()
    import torch.distributed as dist

    dist.destroy_process_group()
    return status
