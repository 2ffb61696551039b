"""What to evaluate and the calls into lm-eval: task names, a user's tasks file, a LAMBADA-style
JSONL scored as lambada_openai, one-line errors for what lm-eval can't load, and lm-eval's
model wrapper around the model the benchmark runs."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbench.environment import PROJECT_ROOT
from llmbench.errors import UserError
from llmbench.settings import AccuracySettings

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


def task_requests(accuracy: AccuracySettings) -> list[TaskRequest]:
    """What --tasks / --tasks-file / --lambada-file ask for, local files checked up front (before
    anything slow is loaded); with none of them, the shipped lambada_local."""
    requests = []
    for name in (accuracy.tasks or "").split(","):
        if name.strip():
            requests.append(TaskRequest(name.strip(), "lm-eval", name.strip()))
    if accuracy.tasks is not None and not requests:
        raise UserError("--tasks is empty: name lm-eval tasks, e.g. --tasks lambada_openai")
    if accuracy.tasks_file:
        path = Path(accuracy.tasks_file).expanduser()
        if not path.is_file():
            raise UserError(f"--tasks-file {accuracy.tasks_file}: no such file")
        requests.append(TaskRequest(str(path), "tasks-file", str(path.resolve()),
                                    str(path.resolve())))
    lambada = accuracy.lambada_file
    if lambada is None and not requests:
        lambada = str(LAMBADA_LOCAL)
    if lambada:
        path = Path(lambada).expanduser()
        check_lambada_file(path)
        config = lambada_task_config(path)
        requests.append(TaskRequest(config["task"], "lambada-file", config, str(path.resolve())))
    return requests


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
