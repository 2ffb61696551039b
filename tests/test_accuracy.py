"""Accuracy with lm-eval through the entry points users run: run_accuracy.py, run.py
--accuracy-only and tools/accuracy_table.py, offline, on the embedded model and the shipped data."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, once_per_run, run_entry, run_in_process
from test_distributed import free_port, launch_ranks_directly

from llmbench.accuracy import single_instance, tasks
from llmbench.cli import run as dispatch
from llmbench.errors import UserError

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LIMIT = 40  # passages of the shipped file scored in the comparison with lm-eval's own HF model
BATCH = 8


def assert_one_line_error(result, needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]


def only_report(output_dir: Path) -> dict:
    reports = sorted(output_dir.glob("*.json"))
    assert len(reports) == 1, reports
    assert not list(output_dir.glob(".*")), "a temp file was left behind"
    return json.loads(reports[0].read_text())


def write_lambada(path: Path, passages: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in passages))
    return path


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory, embedded_model_dir):
    """run_accuracy.py on the embedded model and the shipped file, as a user runs it, offline
    (once per test run, shared by the xdist workers)."""
    def score(output_dir: Path):
        result = run_entry("single_instance/run_accuracy.py", "--limit", str(LIMIT),
                           "--batch-size", str(BATCH), "--output-dir", str(output_dir),
                           env=OFFLINE)
        assert result.returncode == 0, result.stderr
        return result, only_report(output_dir), output_dir

    return once_per_run(tmp_path_factory, "shipped-accuracy", score)


def test_lambada_file_is_scored_as_lm_eval_lambada_openai():
    """The generated task is lm-eval's own lambada_openai but for where the data comes from."""
    import lm_eval

    ours = tasks.lambada_task_config(tasks.LAMBADA_LOCAL)
    theirs = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "lambada"
                             / "lambada_openai.yaml").read_text())
    data_keys = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}
    assert {k: v for k, v in ours.items() if k not in data_keys} == \
        {k: v for k, v in theirs.items() if k not in data_keys}
    assert ours["task"] == "lambada_local"
    assert ours["dataset_path"] == "json"
    assert ours["dataset_kwargs"] == {"data_files": {"test": str(tasks.LAMBADA_LOCAL)}}


def test_shipped_dataset_is_well_formed():
    assert tasks.check_lambada_file(tasks.LAMBADA_LOCAL) == 300


def test_embedded_model_agrees_with_lm_eval_hf_model(shipped_run, embedded_model_dir):
    """Our run (our loader, our prepared model object in HFLM) and lm-eval's own HF model built
    from the same weights give the same accuracy and perplexity on the same passages."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, report, _ = shipped_run
    ours = report["lm_eval"]["results"]["lambada_local"]
    theirs = simple_evaluate(
        model="hf", model_args=f"pretrained={embedded_model_dir},dtype=float32,device=cpu",
        tasks=[tasks.lambada_task_config(tasks.LAMBADA_LOCAL)], limit=LIMIT,
        batch_size=BATCH, log_samples=False,
        task_manager=TaskManager(include_defaults=False))["results"]["lambada_local"]
    assert ours["sample_len"] == theirs["sample_len"] == LIMIT
    assert ours["acc,none"] == pytest.approx(theirs["acc,none"], abs=1e-9)
    assert ours["perplexity,none"] == pytest.approx(theirs["perplexity,none"], rel=1e-4)
    # A small model, but a real one: it gets a fair share of last words right.
    assert 0.3 < ours["acc,none"] < 0.9
    assert 1.5 < ours["perplexity,none"] < 100


def test_report_table_and_metadata(shipped_run):
    result, report, output_dir = shipped_run
    out = result.stdout
    assert "no --tasks given: evaluating the shipped lambada_local.jsonl" in out
    assert "|lambada_local|" in out and "perplexity" in out and "acc" in out  # lm-eval's table
    assert "results: " in out and "summary: " in out
    assert report["schema"] == single_instance.ACCURACY_SCHEMA and report["status"] == "complete"
    assert report["model"]["source"] == "embedded" and report["model"]["family"] == "llama"
    assert report["model"]["dtype"] == "float32" and report["model"]["gguf_sha256"]
    assert report["backend"]["name"] == "stock"
    assert report["quantization"] is None
    assert report["limit"] == LIMIT and report["batch_size"] == BATCH
    assert report["tasks"] == [{"name": "lambada_local", "source": "lambada-file",
                                "path": str(tasks.LAMBADA_LOCAL)}]
    assert report["lm_eval_version"] == "0.4.13"
    env = report["environment"]  # the same metadata as the benchmark report
    for key in ("cpu", "cores_physical", "torch_threads", "binding", "memory_total_bytes", "os",
                "python", "packages", "git_revision", "command_line"):
        assert key in env, key
    assert env["packages"]["lm_eval"] == "0.4.13"
    markdown = next(output_dir.glob("*.md")).read_text()
    assert "|lambada_local|" in markdown and "float32" in markdown


def test_accuracy_table_compares_runs(shipped_run, tmp_path):
    """tools/accuracy_table.py: one row per run; Δ against the float32 run of the same task."""
    _, report, output_dir = shipped_run
    bf16 = json.loads(json.dumps(report))
    bf16["model"]["dtype"] = "bfloat16"
    results = bf16["lm_eval"]["results"]["lambada_local"]
    results["acc,none"] -= 0.025
    results["perplexity,none"] += 0.5
    quantized = json.loads(json.dumps(bf16))
    quantized["quantization"] = {"scheme": "woq-int8"}
    (tmp_path / "bf16.json").write_text(json.dumps(bf16))
    (tmp_path / "woq.json").write_text(json.dumps(quantized))
    (tmp_path / "benchmark.json").write_text(json.dumps({"schema": "llmbench.benchmark/1"}))
    result = run_entry("tools/accuracy_table.py", str(output_dir), str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "lambada_local" in line]
    assert len(rows) == 3
    assert "| float32 | stock | none |" in rows[0]
    assert "| bfloat16 | stock | none |" in rows[1] and "| -0.0250 |" in rows[1]
    assert "| +0.5000 |" in rows[1]
    assert "| bfloat16 | stock | woq-int8 |" in rows[2]
    assert f"| {LIMIT} | {report['lm_eval']['results']['lambada_local']['acc,none']:.4f} |" \
        in rows[0]
    empty = run_entry("tools/accuracy_table.py", str(tmp_path / "benchmark.json"))
    assert_one_line_error(empty, "no accuracy results")


def test_run_py_plans_accuracy_with_the_flags_given():
    parser = dispatch.build_parser()
    args = parser.parse_args(["--accuracy-only", "--dtype", "bfloat16", "--tasks", "a,b",
                              "--batch-size", "4", "--limit", "0.5", "--output-dir", "out"])
    [step] = dispatch.plan_steps(parser, args)
    assert step.script == "single_instance/run_accuracy.py"
    assert step.argv == ["--dtype", "bfloat16", "--batch-size", "4", "--output-dir", "out",
                         "--tasks", "a,b", "--limit", "0.5"]
    both = parser.parse_args(["--benchmark", "--accuracy-only"])
    assert [s.name for s in dispatch.plan_steps(parser, both)] == ["benchmark", "accuracy"]
    with pytest.raises(UserError, match="--tasks only applies with --accuracy-only"):
        dispatch.plan_steps(parser, parser.parse_args(["--benchmark", "--tasks", "x"]))


def test_hub_task_offline_fails_in_one_line():
    result = run_entry("single_instance/run_accuracy.py", "--tasks", "lambada_openai",
                       env=OFFLINE)
    assert_one_line_error(result, "task 'lambada_openai' needs its data set from the Hugging "
                                  "Face hub, which can't be reached")


def test_unknown_task_fails_in_one_line():
    result = run_entry("single_instance/run_accuracy.py", "--tasks", "lambada_opnai", env=OFFLINE)
    assert_one_line_error(result, "unknown lm-eval task 'lambada_opnai': did you mean "
                                  "lambada_openai")


@pytest.mark.parametrize("flag_args,needle", [
    (["--tasks-file", "missing.yaml"], "--tasks-file missing.yaml: no such file"),
    (["--limit", "0"], "--limit: must be a whole number >= 1"),
])
def test_bad_input_fails_in_one_line(flag_args, needle):
    assert_one_line_error(run_entry("single_instance/run_accuracy.py", *flag_args, env=OFFLINE),
                          needle)


@pytest.mark.parametrize("flag_args,needle", [
    (["--lambada-file", "missing.jsonl"], "--lambada-file missing.jsonl: no such file"),
    (["--lambada-file", "BAD"], "line 2 needs {\"text\""),
    (["--tasks-file", "BAD_YAML"], "cannot load task 'broken' (tasks-file): FileNotFoundError"),
    (["--tasks-file", "NO_TASK_YAML"], "defines no task"),
    (["--tasks-file", "DUP_YAML", "--lambada-file", "DUP_JSONL"],
     "two tasks are named 'lambada_dup'"),
    (["--tasks", ","], "--tasks is empty"),
])
def test_bad_task_input_is_refused_before_the_model_loads(tmp_path, flag_args, needle,
                                                         monkeypatch):
    """Through main() in-process (run_main's one-line, exit-2 path is checked above)."""
    monkeypatch.setattr(single_instance, "load_and_prepare", None)  # never reached
    bad_jsonl = write_lambada(tmp_path / "bad.jsonl", ["two words"])
    with open(bad_jsonl, "a") as handle:
        handle.write('{"passage": "no text key"}\n')
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                        f"    test: {tmp_path / 'absent.jsonl'}\noutput_type: loglikelihood\n"
                        "test_split: test\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n")
    no_task_yaml = tmp_path / "no_task.yaml"
    no_task_yaml.write_text("dataset_path: json\n")
    dup_jsonl = write_lambada(tmp_path / "dup.jsonl", ["two words"])
    dup_yaml = tmp_path / "dup.yaml"
    dup_yaml.write_text(yaml.safe_dump(tasks.lambada_task_config(dup_jsonl, "lambada_dup")))
    replace = {"BAD": str(bad_jsonl), "BAD_YAML": str(bad_yaml), "NO_TASK_YAML": str(no_task_yaml),
               "DUP_YAML": str(dup_yaml), "DUP_JSONL": str(dup_jsonl)}
    with pytest.raises(UserError, match=re.escape(needle)):
        single_instance.main([replace.get(arg, arg) for arg in flag_args])


def test_run_py_accuracy_only_with_a_tasks_file_and_a_lambada_file(tmp_path, embedded_model_dir):
    """run.py --accuracy-only runs run_accuracy.py with a user's own lm-eval YAML (a group of two
    tasks on local JSON: multiple choice and a word's log-likelihood) and a user's own
    LAMBADA-format file, in one run; a failing step's exit status is passed on."""
    data = tmp_path / "colors.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in [
        {"question": "The sky on a clear day is", "choices": ["blue", "green"], "label": 0},
        {"question": "Fresh grass is", "choices": ["red", "green"], "label": 1},
    ]))
    common = f"""    dataset_path: json
    dataset_kwargs:
      data_files:
        test: {data}
    test_split: test
    doc_to_text: "{{{{question}}}}"
    metric_list:
      - metric: acc
        aggregation: mean
        higher_is_better: true
"""
    task_yaml = tmp_path / "colors.yaml"
    task_yaml.write_text(f"""group: colors_local
task:
  - task: colors_choice
    output_type: multiple_choice
    doc_to_choice: "{{{{choices}}}}"
    doc_to_target: label
{common}  - task: colors_word
    output_type: loglikelihood
    doc_to_target: "{{{{' ' + choices[label]}}}}"
{common}aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
""")
    passages = write_lambada(tmp_path / "my passages.jsonl", [
        "She opened the door and let the cat out into the garden",
        "He poured a cup of hot tea and added a spoon of sugar",
    ])
    result = run_entry("run.py", "--accuracy-only", "--tasks-file", str(task_yaml),
                       "--lambada-file", str(passages), "--output-dir", str(tmp_path / "out"),
                       env=OFFLINE)
    assert result.returncode == 0, result.stderr
    assert "running accuracy:" in result.stdout and "run_accuracy.py" in result.stdout
    assert "no --tasks given" not in result.stdout
    assert "colors_local" in result.stdout and "lambada_my_passages" in result.stdout
    report = only_report(tmp_path / "out")
    results = report["lm_eval"]["results"]
    assert set(results) == {"colors_local", "colors_local::colors_choice",
                            "colors_local::colors_word", "lambada_my_passages"}, set(results)
    assert results["colors_local::colors_choice"]["sample_len"] == 2
    assert 0 <= results["colors_local"]["acc,none"] <= 1
    assert results["lambada_my_passages"]["sample_len"] == 2
    assert results["lambada_my_passages"]["perplexity,none"] > 1
    assert [(t["name"], t["source"]) for t in report["tasks"]] == [
        ("colors_local", "tasks-file"), ("lambada_my_passages", "lambada-file")]

    failed = run_entry("run.py", "--accuracy-only", "--lambada-file", str(tmp_path / "none.jsonl"))
    assert failed.returncode == 2
    assert "error: --lambada-file" in failed.stderr
    assert "error: step 'accuracy' failed with exit status 2" in failed.stderr


def test_entry_script_is_executable():
    assert os.access(ROOT / "single_instance" / "run_accuracy.py", os.X_OK)
    assert os.access(ROOT / "tools" / "accuracy_table.py", os.X_OK)


def test_tensor_parallel_accuracy_agrees_with_single_instance(shipped_run, tmp_path):
    """distributed/run_accuracy_with_deepspeed.py on two AutoTP ranks scores the same passages
    as the single-instance run the same way; rank 0 alone writes the report."""
    # The ranks started as DeepSpeed's launch.py starts them (the seed-command test launches a
    # distributed accuracy line under the real launcher).
    script = [str(ROOT / "distributed" / "run_accuracy_with_deepspeed.py"),
              "--limit", str(LIMIT), "--batch-size", str(BATCH), "--output-dir", str(tmp_path)]
    result = launch_ranks_directly(script, {**os.environ, **OFFLINE, "DS_ACCELERATOR": "cpu"},
                                   free_port(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("|lambada_local|") == 1  # one table: rank 0's
    report = only_report(tmp_path)
    assert report["backend"]["name"] == "deepspeed-autotp"
    assert report["distributed"]["world_size"] == 2
    ours = report["lm_eval"]["results"]["lambada_local"]
    single = shipped_run[1]["lm_eval"]["results"]["lambada_local"]
    assert ours["sample_len"] == single["sample_len"] == LIMIT
    assert ours["acc,none"] == pytest.approx(single["acc,none"], abs=1e-9)
    assert ours["perplexity,none"] == pytest.approx(single["perplexity,none"], rel=1e-4)


def test_run_py_quantizes_then_scores_the_quantized_model(tmp_path, embedded_model_dir):
    """run.py --ipex-weight-only-quantization --accuracy-only: step 1 saves the quantized model,
    step 2 scores that model (not the float one), and the report names the scheme."""
    from tiny_models import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "tiny", embedded_model_dir)
    out = tmp_path / "out"
    result = run_in_process("run.py", "-m", str(model), "--ipex-weight-only-quantization",
                            "--weight-dtype", "INT8", "--accuracy-only", "--limit", "4",
                            "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "best_model.safetensors").is_file()
    report = json.loads(next(out.glob("*-accuracy.json")).read_text())
    assert "INT8" in json.dumps(report["quantization"])
    assert report["config"]["quantized_model_path"] == str(out / "best_model.safetensors")
