"""The accuracy run of one process (single_instance/run_accuracy.py): load and prepare the model
as the benchmark does, score it, print the table, write the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from llmbench import backends
from llmbench.accuracy.tasks import (
    LAMBADA_LOCAL,
    TaskRequest,
    evaluate,
    load_tasks,
    make_lm,
    quiet_lm_eval_logging,
    results_table,
    task_requests,
)
from llmbench.cli import flags, settings_from
from llmbench.environment import collect_environment, peak_rss_bytes
from llmbench.errors import UserError
from llmbench.settings import AccuracySettings, Settings

DESCRIPTION = "Accuracy of a Hugging Face causal LM on CPU with lm-eval (EleutherAI harness)."
ACCURACY_SCHEMA = "llmbench.accuracy/1"


def build_parser(prog: str = "run_accuracy.py") -> flags.Parser:
    return flags.build_parser(prog, DESCRIPTION, flags.accuracy_groups())


def check_weight_dtype(prepared: Any, weight: str | None) -> None:
    if weight is None:
        return
    scheme = (prepared.details.get("quantization") or {}).get("scheme") or {}
    if scheme.get("weight_dtype") != weight:
        raise UserError(f"--dtype {weight.lower()}: the quantized model holds "
                        f"{scheme.get('weight_dtype') or 'no quantized'} weights")


def load_and_prepare(settings: Settings, backend: str) -> tuple[Any, Any, list[str]]:
    """The model exactly as the benchmark runs it: load_model, then backends.prepare, with the
    same dtype and backend. A saved quantized model (--quantized-model-path, from the
    quantization work) plugs in here, in place of load_model + prepare; a quantization scheme
    without one is applied here (round to nearest, or GPTQ with --gptq)."""
    from llmbench.models import load_model
    from llmbench.precision import check_dtype
    from llmbench.quant.workflow import scheme_of

    model = settings.model
    notes = check_dtype(model.dtype)
    scheme = None
    if settings.quantization.quantized_model_path is None:
        scheme = scheme_of(settings.quantization)
    if scheme is not None and scheme.method not in ("woq", "gptq"):
        raise UserError("run_accuracy.py evaluates a saved quantized model for this scheme: "
                        "pass --quantized-model-path (run.py with the same flags makes one "
                        "first)")
    loaded = load_model(model.model_name_or_path, "float32" if scheme else model.dtype,
                        model.config_file)
    if scheme is not None:
        from llmbench.quant.workflow import quantize_in_process

        prepared = quantize_in_process(settings, loaded, scheme, backend)
    elif settings.quantization.quantized_model_path is not None or loaded.quantized is not None:
        from llmbench.quant.workflow import prepare_saved  # the benchmark's own loader

        prepared = prepare_saved(settings, loaded, backend)
    else:
        prepared = backends.prepare(loaded.model, backend=backend, dtype=model.dtype,
                                    family=loaded.family.model_type,
                                    kv_cache_dtype=model.kv_cache_dtype)
    loaded.model = prepared.model
    if "fallback_reason" in prepared.details:
        notes.append(prepared.details["fallback_reason"])
    if "note" in (prepared.details.get("quantization") or {}):
        notes.append(prepared.details["quantization"]["note"])
    import torch

    if not isinstance(prepared.model, torch.nn.Module):
        raise UserError(f"--backend {prepared.backend}: this model only generates (its own decode "
                        "loop); lm-eval scores log-likelihoods through the model's forward pass, "
                        "which only transformers' model has: evaluate with --backend stock (the "
                        "same weights and dtype)")
    return loaded, prepared, notes


def build_report(settings: Settings, loaded: Any, prepared: Any,
                 requests: list[TaskRequest], results: dict[str, Any], eval_seconds: float,
                 notes: list[str]) -> dict[str, Any]:
    import lm_eval

    return {
        "schema": ACCURACY_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "complete",
        "config": settings.flags,
        "model": loaded.record(),
        "backend": {"name": prepared.backend, **prepared.details},
        "quantization": prepared.details.get("quantization"),
        "tasks": [{"name": r.label, "source": r.source, "path": r.path} for r in requests],
        "limit": settings.accuracy.limit,
        "batch_size": settings.prompt.batch_size,
        "lm_eval_version": lm_eval.__version__,
        "eval_seconds": eval_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "notes": notes,
        "lm_eval": results,  # simple_evaluate's dict: results, groups, configs, versions, n-shot
        "environment": collect_environment(),
    }


def write_report(report: dict[str, Any], table: str, output_dir: str) -> Path:
    from lm_eval.utils import handle_non_serializable

    from llmbench.atomic import write_text
    from llmbench.report import report_stem

    model = report["model"]
    backend = report["backend"]
    stem = report_stem(model["family"], model["dtype"], f"autotp{backend['tp_size']}"
                       if "tp_size" in backend else backend["name"], "accuracy")
    path = Path(output_dir) / f"{stem}.json"
    write_text(path, json.dumps(report, indent=1, default=handle_non_serializable) + "\n")
    env = report["environment"]
    markdown = [f"# llmbench accuracy: {report['created']}", "",
                f"{model['name']} ({model['family']}) | {model['dtype']} | backend "
                f"{report['backend']['name']} | lm-eval {report['lm_eval_version']} | limit "
                f"{report['limit']} | batch {report['batch_size']} | "
                f"{report['eval_seconds']:.1f} s", "", table, "",
                f"CPU: {env['cpu']['model']}, torch {env['packages']['torch']}, transformers "
                f"{env['packages']['transformers']}, git {env['git_revision']}"]
    write_text(path.with_suffix(".md"), "\n".join(markdown) + "\n")
    return path


def announce_default(accuracy: AccuracySettings) -> None:
    if accuracy.tasks is None and accuracy.tasks_file is None and accuracy.lambada_file is None:
        print(f"note: no --tasks given: evaluating the shipped {LAMBADA_LOCAL.name} (offline, "
              "scored as lambada_openai); --tasks lambada_openai for the standard set", flush=True)


def evaluate_and_report(settings: Settings, loaded: Any, prepared: Any,
                        requests: list[TaskRequest], manager: Any, tasks: list[Any],
                        notes: list[str], *, write: bool = True,
                        extra: dict[str, Any] | None = None) -> int:
    """Score the prepared model, print lm-eval's table and write the report (where `write`)."""
    for note in notes if write else []:
        print(f"note: {note}", flush=True)
    if write:
        print(f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
              f"{settings.model.dtype} | backend {prepared.backend} | "
              f"load {loaded.load_seconds:.2f} s | "
              f"tasks {', '.join(r.label for r in requests)}", flush=True)
    lm = make_lm(prepared.model, loaded.tokenizer, batch_size=settings.prompt.batch_size,
                 seq2seq=loaded.family.seq2seq)
    start = time.perf_counter()
    results = evaluate(lm, manager, tasks, limit=settings.accuracy.limit,
                       batch_size=settings.prompt.batch_size)
    eval_seconds = time.perf_counter() - start
    if not write or results is None:
        return 0
    table = results_table(results)
    print(table, flush=True)
    report = build_report(settings, loaded, prepared, requests, results, eval_seconds, notes)
    report.update(extra or {})
    path = write_report(report, table, settings.measurement.output_dir)
    print(f"Evaluation: {eval_seconds:.1f} s | peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"results: {path}")
    print(f"summary: {path.with_suffix('.md')}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from llmbench import backends

    settings = settings_from(build_parser().parse_args(argv))
    backend = backends.requested(settings.model.backend, settings.model.ipex)
    requests = task_requests(settings.accuracy)
    announce_default(settings.accuracy)
    quiet_lm_eval_logging()
    manager, tasks = load_tasks(requests)
    loaded, prepared, notes = load_and_prepare(settings, backend)
    check_weight_dtype(prepared, settings.accuracy.expect_weight_dtype)
    return evaluate_and_report(settings, loaded, prepared, requests, manager, tasks, notes)
