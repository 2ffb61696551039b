"""Accuracy with lm-eval (single_instance/run_accuracy.py): the model the benchmark runs, scored.

The model comes from the benchmark's own path (llmbench.models.load_model, then
llmbench.backends.prepare, same dtype and backend), and lm-eval 0.4.x scores it through
`HFLM(pretrained=<that model object>)`, so what is measured is what is benchmarked.

Tasks, in the order they run:
- `--tasks a,b`: any lm-eval task, group or tag name. Hub-backed data sets load from the local
  Hugging Face cache or the hub; when neither can provide them the run stops with one line.
- `--tasks-file FILE.yaml`: an lm-eval task definition (a local `dataset_path: json` works offline).
- `--lambada-file FILE.jsonl`: `{"text": ...}` per line, scored exactly as lm-eval's
  lambada_openai (context = all but the last word, target = the last word; accuracy and
  perplexity), through a task config generated here with `dataset_path: json`.
- none of these: the project's own llmbench/data/lambada_local.jsonl, so the command works on a
  fresh machine with no network.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbench import backends, flags
from llmbench.environment import PROJECT_ROOT, collect_environment, peak_rss_bytes
from llmbench.errors import UserError

DESCRIPTION = "Accuracy of a Hugging Face causal LM on CPU with lm-eval (EleutherAI harness)."
ACCURACY_SCHEMA = "llmbench.accuracy/1"
LAMBADA_LOCAL = PROJECT_ROOT / "llmbench" / "data" / "lambada_local.jsonl"

# lm-eval's lambada_openai.yaml (0.4.x), less its data set: a --lambada-file is scored the same way.
# tests/test_accuracy.py checks these keys against the installed lm-eval's own file.
LAMBADA_OPENAI_SCORING: dict[str, Any] = {
    "output_type": "loglikelihood",
    "test_split": "test",
    "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
    "doc_to_target": "{{' '+text.split(' ')[-1]}}",
    "should_decontaminate": True,
    "doc_to_decontamination_query": "{{text}}",
    "metric_list": [
        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    ],
    "metadata": {"version": 1.0},
}

# lm-eval's warnings about being handed a model object: that is the point here, not a problem.
QUIET_LM_EVAL_MESSAGES = ("`pretrained` model kwarg is not of type `str`",
                          "Passed an already-initialized model through `pretrained`")


@dataclass
class TaskRequest:
    """One thing to evaluate, as the user named it."""

    label: str  # how messages and the report name it
    source: str  # "lm-eval" (a registered name) | "tasks-file" | "lambada-file"
    spec: str | dict[str, Any]  # what lm-eval's TaskManager.load takes
    path: str | None = None


def build_parser(prog: str = "run_accuracy.py") -> flags.Parser:
    return flags.build_parser(prog, DESCRIPTION, flags.accuracy_groups())


# ---------------------------------------------------------------- what to evaluate


def lambada_task_name(path: Path) -> str:
    stem = re.sub(r"\W+", "_", path.stem).strip("_").lower() or "file"
    return stem if stem.startswith("lambada") else f"lambada_{stem}"


def check_lambada_file(path: Path) -> int:
    """Every line a JSON object whose "text" has at least two words; returns the passage count."""
    if not path.is_file():
        raise UserError(f"--lambada-file {path}: no such file")
    count = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"--lambada-file {path}: line {number} is not JSON "
                                    f"({exc.msg})") from exc
                text = doc.get("text") if isinstance(doc, dict) else None
                if not isinstance(text, str) or " " not in text.strip():
                    raise UserError(f"--lambada-file {path}: line {number} needs "
                                    '{"text": "<a passage of at least two words>"}')
                count += 1
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--lambada-file {path}: cannot read it ({exc})") from exc
    if count == 0:
        raise UserError(f"--lambada-file {path}: no passages in it")
    return count


def lambada_task_config(path: Path, name: str | None = None) -> dict[str, Any]:
    """An lm-eval task config scoring a local LAMBADA-format file as lambada_openai does."""
    path = Path(path).expanduser().resolve()
    return {
        "task": name or lambada_task_name(path),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        **json.loads(json.dumps(LAMBADA_OPENAI_SCORING)),  # a copy: lm-eval may edit it
    }


def task_requests(args: argparse.Namespace) -> list[TaskRequest]:
    """What --tasks / --tasks-file / --lambada-file ask for, local files checked up front (before
    anything slow is loaded); with none of them, the shipped lambada_local."""
    requests = []
    for name in (args.tasks or "").split(","):
        if name.strip():
            requests.append(TaskRequest(name.strip(), "lm-eval", name.strip()))
    if args.tasks is not None and not requests:
        raise UserError("--tasks is empty: name lm-eval tasks, e.g. --tasks lambada_openai")
    if args.tasks_file:
        path = Path(args.tasks_file).expanduser()
        if not path.is_file():
            raise UserError(f"--tasks-file {args.tasks_file}: no such file")
        requests.append(TaskRequest(str(path), "tasks-file", str(path.resolve()),
                                    str(path.resolve())))
    lambada = args.lambada_file
    if lambada is None and not requests:
        lambada = str(LAMBADA_LOCAL)
    if lambada:
        path = Path(lambada).expanduser()
        check_lambada_file(path)
        config = lambada_task_config(path)
        requests.append(TaskRequest(config["task"], "lambada-file", config, str(path.resolve())))
    return requests


# ---------------------------------------------------------------- lm-eval


def quiet_lm_eval_logging() -> None:
    """lm-eval's warnings as `lm-eval: ...` lines, without its INFO chatter or the warnings about
    being handed a model object; no progress bars from `datasets` (lm-eval keeps its own)."""

    class Quiet(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(QUIET_LM_EVAL_MESSAGES)

    logger = logging.getLogger("lm_eval")
    if not any(getattr(h, "llmbench", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.llmbench = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("lm-eval: %(message)s"))
        handler.addFilter(Quiet())
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise UserError(f"lm-eval is not installed ({exc}): pip install lm-eval==0.4.13 "
                        "(it is in requirements.txt)") from exc
    return lm_eval


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _is_unreachable_hub(exc: BaseException) -> bool:
    """datasets raises ConnectionError when neither the hub nor the cache has a data set
    (offline mode, no network); huggingface_hub's and httpx's errors can surface too."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        name = type(seen).__name__
        if isinstance(seen, ConnectionError | TimeoutError) or any(
                word in name for word in ("Offline", "LocalEntryNotFound", "Connect", "Timeout")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def task_manager(full_index: bool, include: list[str]) -> Any:
    """lm-eval's TaskManager. Indexing its ~15,000 bundled task files takes seconds, so without
    task names to look up it indexes only the --tasks-file's folder (as lm-eval's own
    --include_path does: a group file there finds its tasks beside it)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=full_index, include_path=include or None)


def tasks_file_name(path: str) -> str:
    """The task or group a --tasks-file defines (lm-eval loads a group file by its name only)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=False, recursive=True)
    except Exception as exc:  # YAML syntax, a missing include
        raise UserError(f"cannot read --tasks-file {path}: {_first_line(exc)}") from exc
    name = config.get("group") or config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise UserError(f"--tasks-file {path} defines no task (a `task: NAME` or `group: NAME` "
                        "key)")
    return name


def top_level(loaded: dict[str, Any]) -> list[Any]:
    """The groups and tasks of one TaskManager.load result that no group there contains."""
    children = {name for names in loaded.get("group_map", {}).values() for name in names}
    return ([group for name, group in loaded["groups"].items() if name not in children]
            + [task for name, task in loaded["tasks"].items() if name not in children])


def task_error(request: TaskRequest, exc: BaseException, manager: Any) -> UserError:
    if _is_unreachable_hub(exc):
        return UserError(
            f"task '{request.label}' needs its data set from the Hugging Face hub, which can't be "
            f"reached (offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set, or no network), and it "
            f"is not in the local cache ({_first_line(exc)}); run it once with network access to "
            f"cache it, or evaluate local data with --lambada-file or --tasks-file")
    if isinstance(exc, KeyError) and request.source == "lm-eval":
        import difflib

        close = difflib.get_close_matches(request.label, manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        return UserError(f"unknown lm-eval task '{request.label}': {hint}"
                         f"list them with `lm-eval ls tasks`")
    return UserError(f"cannot load task '{request.label}' ({request.source}): "
                     f"{_first_line(exc)}")


def load_tasks(requests: list[TaskRequest]) -> tuple[Any, list[Any]]:
    """Build every task, which loads its data, before the model: a task that can't run stops the
    run in seconds. One request at a time, so a failure names it."""
    import_lm_eval()
    for request in requests:
        if request.source == "tasks-file":
            assert request.path is not None
            request.spec = request.label = tasks_file_name(request.path)
    include = sorted({str(Path(r.path).parent) for r in requests if r.source == "tasks-file"
                      and r.path is not None})
    full = any(request.source == "lm-eval" for request in requests)
    manager = task_manager(full, include)
    built: list[Any] = []
    names: dict[str, TaskRequest] = {}  # task or group name -> who asked for it
    for request in requests:
        try:
            loaded = manager.load(request.spec)
        except Exception as exc:  # task definitions and their data are user input
            if full or request.source != "tasks-file" or not isinstance(exc, KeyError):
                raise task_error(request, exc, manager) from exc
            full, manager = True, task_manager(True, include)  # it names lm-eval's own tasks
            try:
                loaded = manager.load(request.spec)
            except Exception as exc_again:
                raise task_error(request, exc_again, manager) from exc_again
        for name in [*loaded["groups"], *loaded["tasks"]]:
            first = names.setdefault(name, request)
            if first is not request:
                raise UserError(f"two tasks are named '{name}' (from {first.source} "
                                f"{first.path or first.label} and {request.source} "
                                f"{request.path or request.label}): rename one (a "
                                "--lambada-file's task is named after the file)")
        built += top_level(loaded)
    try:
        manager.load(built)  # lm-eval's own check: no task in two of the groups asked for
    except ValueError as exc:
        raise UserError(f"a task was asked for twice: {_first_line(exc)}") from exc
    return manager, built


def make_lm(model: Any, tokenizer: Any, *, batch_size: int, seq2seq: bool) -> Any:
    """lm-eval's HF model around a model object we already loaded and prepared.

    HFLM calls `model.tie_weights()` on the object it is given, which would point the output layer
    back at the whole input embedding: it undoes what a backend did to a tied lm_head (AutoTP's
    slice of it, a quantized copy). The model is used as prepared, so that call does nothing."""
    from lm_eval.models.huggingface import HFLM

    shadowed = "tie_weights" in vars(model)
    saved = vars(model).get("tie_weights")
    model.tie_weights = lambda *args, **kwargs: None
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                    backend="seq2seq" if seq2seq else "causal")
    finally:
        if shadowed:
            model.tie_weights = saved
        else:
            del model.tie_weights


def evaluate(lm: Any, manager: Any, tasks: list[Any], *, limit: int | float | None,
             batch_size: int) -> dict[str, Any] | None:
    """lm-eval's simple_evaluate over built tasks: its result dict, per-sample logs left out
    (None on the ranks of a tensor-parallel run that don't report)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                              batch_size=batch_size, log_samples=False)
    if results is not None:
        results.pop("samples", None)
    return results


def results_table(results: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


# ---------------------------------------------------------------- the model and the report


def apply_quantized_dtype(args: argparse.Namespace) -> str | None:
    """The examples' `--dtype int8|int4` (and --quant-with-amp / --int8-bf16-mixed) in the
    accuracy scripts: weight-only quantization with that weight type. With
    --quantized-model-path the saved model must hold it (checked once it is read); without, the
    model is quantized round to nearest in this process, as --ipex-weight-only-quantization
    --weight-dtype INT8|INT4 asks. The layers left in float run in bf16 with --quant-with-amp,
    else fp32. Returns the weight type --dtype asked for (None: a float --dtype)."""
    weight = args.dtype.upper() if args.dtype in ("int8", "int4") else None
    if weight is not None:
        if args.ipex_weight_only_quantization and args.weight_dtype not in ("INT8", weight):
            raise UserError(f"--dtype {args.dtype} contradicts --weight-dtype {args.weight_dtype}")
        if args.quantized_model_path is None and args.low_precision_checkpoint is None:
            args.ipex_weight_only_quantization = True
            args.weight_dtype = weight
        args.dtype = "float32"
    if args.quant_with_amp:
        args.dtype = "bfloat16"  # the layers left unquantized run in bf16, as the benchmark's
    return weight


def check_weight_dtype(prepared: Any, weight: str | None) -> None:
    if weight is None:
        return
    scheme = (prepared.details.get("quantization") or {}).get("scheme") or {}
    if scheme.get("weight_dtype") != weight:
        raise UserError(f"--dtype {weight.lower()}: the quantized model holds "
                        f"{scheme.get('weight_dtype') or 'no quantized'} weights")


def load_and_prepare(args: argparse.Namespace, backend: str) -> tuple[Any, Any, list[str]]:
    """The model exactly as the benchmark runs it: load_model, then backends.prepare, with the
    same dtype and backend. A saved quantized model (--quantized-model-path, from the
    quantization work) plugs in here, in place of load_model + prepare; a quantization scheme
    without one is applied here (round to nearest, or GPTQ with --gptq)."""
    from llmbench.models import load_model
    from llmbench.precision import check_dtype
    from llmbench.quant.cli import scheme_from_args

    notes = check_dtype(args.dtype)
    scheme = None
    if getattr(args, "quantized_model_path", None) is None:
        scheme = scheme_from_args(args)
    if scheme is not None and scheme.method not in ("woq", "gptq"):
        raise UserError("run_accuracy.py evaluates a saved quantized model for this scheme: "
                        "pass --quantized-model-path (run.py with the same flags makes one "
                        "first)")
    loaded = load_model(args.model_name_or_path, "float32" if scheme else args.dtype,
                        args.config_file)
    if scheme is not None:
        from llmbench.quant.cli import quantize_in_process

        prepared = quantize_in_process(args, loaded, scheme, backend)
    elif getattr(args, "quantized_model_path", None) is not None or loaded.quantized is not None:
        from llmbench.quant.cli import prepare_saved  # the benchmark's own loader

        prepared = prepare_saved(args, loaded, backend)
    else:
        prepared = backends.prepare(loaded.model, backend=backend, dtype=args.dtype,
                                    family=loaded.family.model_type,
                                    kv_cache_dtype=args.kv_cache_dtype)
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


def build_report(args: argparse.Namespace, loaded: Any, prepared: Any,
                 requests: list[TaskRequest], results: dict[str, Any], eval_seconds: float,
                 notes: list[str]) -> dict[str, Any]:
    import lm_eval

    return {
        "schema": ACCURACY_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "complete",
        "config": vars(args),
        "model": loaded.record(),
        "backend": {"name": prepared.backend, **prepared.details},
        "quantization": prepared.details.get("quantization"),
        "tasks": [{"name": r.label, "source": r.source, "path": r.path} for r in requests],
        "limit": args.limit,
        "batch_size": args.batch_size,
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


def announce_default(args: argparse.Namespace) -> None:
    if args.tasks is None and args.tasks_file is None and args.lambada_file is None:
        print(f"note: no --tasks given: evaluating the shipped {LAMBADA_LOCAL.name} (offline, "
              "scored as lambada_openai); --tasks lambada_openai for the standard set", flush=True)


def evaluate_and_report(args: argparse.Namespace, loaded: Any, prepared: Any,
                        requests: list[TaskRequest], manager: Any, tasks: list[Any],
                        notes: list[str], *, write: bool = True,
                        extra: dict[str, Any] | None = None) -> int:
    """Score the prepared model, print lm-eval's table and write the report (where `write`)."""
    for note in notes if write else []:
        print(f"note: {note}", flush=True)
    if write:
        print(f"model: {loaded.source.display_name} | family {loaded.family.model_type} | "
              f"{args.dtype} | backend {prepared.backend} | load {loaded.load_seconds:.2f} s | "
              f"tasks {', '.join(r.label for r in requests)}", flush=True)
    lm = make_lm(prepared.model, loaded.tokenizer, batch_size=args.batch_size,
                 seq2seq=loaded.family.seq2seq)
    start = time.perf_counter()
    results = evaluate(lm, manager, tasks, limit=args.limit, batch_size=args.batch_size)
    eval_seconds = time.perf_counter() - start
    if not write or results is None:
        return 0
    table = results_table(results)
    print(table, flush=True)
    report = build_report(args, loaded, prepared, requests, results, eval_seconds, notes)
    report.update(extra or {})
    path = write_report(report, table, args.output_dir)
    print(f"Evaluation: {eval_seconds:.1f} s | peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"results: {path}")
    print(f"summary: {path.with_suffix('.md')}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from llmbench import backends

    args = build_parser().parse_args(argv)
    backend = backends.requested(args.backend, args.ipex)
    weight = apply_quantized_dtype(args)
    requests = task_requests(args)
    announce_default(args)
    quiet_lm_eval_logging()
    manager, tasks = load_tasks(requests)
    loaded, prepared, notes = load_and_prepare(args, backend)
    check_weight_dtype(prepared, weight)
    return evaluate_and_report(args, loaded, prepared, requests, manager, tasks, notes)


# ---------------------------------------------------------------- tensor parallel (AutoTP)

RANK_DESCRIPTION = ("Accuracy with lm-eval, tensor parallel across ranks with DeepSpeed AutoTP "
                    "(one process per rank: launch with `deepspeed`); rank 0 writes the results.")


def build_rank_parser(prog: str = "run_accuracy_with_deepspeed.py") -> flags.Parser:
    return flags.build_parser(prog, RANK_DESCRIPTION, (*flags.accuracy_groups(),
                                                       flags.add_rank_flags))


def check_rank_args(args: argparse.Namespace) -> Any:
    """What run_accuracy_with_deepspeed.py refuses before anything loads (every rank alike),
    and the weight-only scheme each rank quantizes its slice with (None: float)."""
    from llmbench.quant.cli import WHOLE_MODEL_REASON, scheme_from_args

    backend = "ipex" if args.ipex else args.backend
    if backend == "ipex":
        from llmbench.backends.ipex import require_ipex

        require_ipex()  # IPEX absent: one line saying so
        raise UserError("run_accuracy_with_deepspeed.py --ipex: ipex.llm.optimize of a DeepSpeed "
                        "AutoTP model is not wired in here; drop --ipex")
    if backend != "stock" or args.kv_cache_dtype != "auto":
        raise UserError("run_accuracy_with_deepspeed.py runs transformers' own model, tensor "
                        "parallel: drop --backend/--kv-cache-dtype")
    apply_quantized_dtype(args)
    if args.quantized_model_path is not None:
        raise UserError(f"--quantized-model-path does not run tensor parallel: a saved quantized "
                        f"model {WHOLE_MODEL_REASON}, or evaluate it with "
                        "single_instance/run_accuracy.py")
    if args.low_precision_checkpoint is not None:
        raise UserError(f"--low-precision-checkpoint does not run tensor parallel: a whole-model "
                        f"checkpoint {WHOLE_MODEL_REASON}")
    scheme = scheme_from_args(args)
    if scheme is not None and scheme.method != "woq":
        raise UserError(f"{scheme.describe()} does not run tensor parallel: each rank quantizes "
                        "its slice round to nearest (--ipex-weight-only-quantization without "
                        "--gptq / --ipex-smooth-quant)")
    return scheme


def rank_main(argv: list[str] | None = None) -> int:
    """distributed/run_accuracy_with_deepspeed.py: every rank holds a slice of the model and
    scores every document (lm-eval sees one process per rank: the ranks run the same batches in
    step, as AutoTP's all-reduces need); rank 0 prints the table and writes the report."""
    from llmbench import distributed
    from llmbench.precision import check_dtype

    args = build_rank_parser().parse_args(argv)
    scheme = check_rank_args(args)
    requests = task_requests(args)
    notes = check_dtype(args.dtype)
    info = distributed.setup_environment(args.local_rank)
    is_root = info.rank == 0
    if is_root:
        announce_default(args)
    quiet_lm_eval_logging()
    manager, tasks = load_tasks(requests)  # every rank: the same documents in the same order
    comm_backend = distributed.init_process_group(info, args.dist_timeout)
    distributed.inject_failure(info)
    if info.world_size == 1:
        notes.append("one rank: nothing is tensor parallel; launch with `deepspeed "
                     "--num_accelerators N --bind_cores_to_rank "
                     "distributed/run_accuracy_with_deepspeed.py ...`")
    tp = distributed.load_autotp_model(args.model_name_or_path, args.dtype, args.config_file,
                                       info)
    notes += tp.notes
    prepared = backends.PreparedModel(model=tp.loaded.model, backend=distributed.BACKEND_NAME,
                                      details={"tp_size": info.world_size,
                                               "communication_backend": comm_backend,
                                               "load_path": tp.load_path})
    if scheme is not None or tp.checkpoint is not None:  # as the AutoTP benchmark does
        quant, scheme = distributed.quantize_rank(tp, scheme, args)
        prepared.details["quantization"] = quant.details()
        if is_root:
            print(f"quantized: {scheme.describe()}, {quant.applied}: {len(quant.qlinears)} "
                  f"projections per rank, {len(quant.left_float)} left float", flush=True)
    extra = {"distributed": {"world_size": info.world_size,
                             "communication_backend": comm_backend,
                             "load_path": tp.load_path,
                             "all_reduce": distributed.all_reduce_path(args.dtype, info)}}
    status = evaluate_and_report(args, tp.loaded, prepared, requests, manager, tasks, notes,
                                 write=is_root, extra=extra)
    distributed.barrier()
    import torch.distributed as dist

    dist.destroy_process_group()
    return status


# ---------------------------------------------------------------- comparing saved runs

DTYPE_ORDER = {"float32": 0, "bfloat16": 1, "float16": 2}


def quantization_label(quantization: Any) -> str:
    if not quantization:
        return "none"
    if isinstance(quantization, dict):
        return str(quantization.get("scheme") or quantization.get("name")
                   or json.dumps(quantization, sort_keys=True))
    return str(quantization)


def read_reports(paths: list[str]) -> list[dict[str, Any]]:
    """Every complete accuracy report in these files and folders (folders searched recursively);
    benchmark reports beside them are passed over."""
    files: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            files += sorted(path.rglob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{name}: no such file or folder")
    reports = []
    for file in files:
        try:
            report = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if (isinstance(report, dict) and report.get("schema") == ACCURACY_SCHEMA
                and report.get("status") == "complete"):
            report["_file"] = str(file)
            reports.append(report)
    if not reports:
        raise UserError(f"no accuracy results ({ACCURACY_SCHEMA} JSON) in {', '.join(paths)}")
    return reports


def accuracy_rows(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, task): the metrics lm-eval reported, by plain name."""
    rows = []
    for report in reports:
        for task, values in report["lm_eval"]["results"].items():
            metrics = {key.split(",")[0]: value for key, value in values.items()
                       if "," in key and "_stderr" not in key and isinstance(value, int | float)}
            rows.append({
                "model": report["model"]["name"],
                "dtype": report["model"]["dtype"],
                "backend": report["backend"]["name"],
                "quantization": quantization_label(report.get("quantization")),
                "task": task,
                "n": values.get("sample_len", report["lm_eval"].get("n-samples", {})
                                .get(task, {}).get("effective")),
                "metrics": metrics,
                "created": report.get("created", ""),
                "file": Path(report["_file"]).name,
            })
    rows.sort(key=lambda r: (r["model"], r["task"], r["n"] or 0, r["quantization"] != "none",
                             r["quantization"], DTYPE_ORDER.get(r["dtype"], 9),
                             r["backend"] != "stock", r["backend"], r["created"]))
    return rows


def _number(value: Any, digits: int = 4, sign: bool = False) -> str:
    if not isinstance(value, int | float):
        return ""
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def delta(metrics: dict[str, float], base: dict[str, float], name: str) -> str:
    return _number(metrics[name] - base[name], sign=True) if name in metrics and name in base \
        else ""


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """Markdown, one row per run and task; Δ columns against the float32 / stock / unquantized
    run of the same model, task and document count (the newest one, when there are several)."""
    rows = accuracy_rows(reports)
    baselines = {}
    for row in rows:  # sorted oldest first within a configuration: the newest wins
        if (row["dtype"], row["backend"], row["quantization"]) == ("float32", "stock", "none"):
            baselines[(row["model"], row["task"], row["n"])] = row

    lines = ["| model | dtype | backend | quantization | task | n | acc | Δ acc | perplexity "
             "| Δ ppl | other metrics | file |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|---|---|"]
    for row in rows:
        metrics = row["metrics"]
        base = baselines.get((row["model"], row["task"], row["n"]))
        base_metrics = base["metrics"] if base is not None and base is not row else {}
        other = ", ".join(f"{name}={_number(value)}" for name, value in sorted(metrics.items())
                          if name not in ("acc", "perplexity"))
        cells = [row["model"], row["dtype"], row["backend"], row["quantization"], row["task"],
                 row["n"] if row["n"] is not None else "", _number(metrics.get("acc")),
                 delta(metrics, base_metrics, "acc"), _number(metrics.get("perplexity")),
                 delta(metrics, base_metrics, "perplexity"), other,
                 row["file"]]
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def table_main(argv: list[str] | None = None) -> int:
    parser = flags.Parser(prog="accuracy_table.py", description=(
        "One markdown row per saved accuracy run (fp32 vs bf16 vs quantized at a glance)."))
    parser.add_argument("paths", nargs="*", default=["./saved_results"],
                        help="result JSON files or folders (default ./saved_results)")
    args = parser.parse_args(argv)
    print(comparison_table(read_reports(args.paths)), end="")
    return 0
