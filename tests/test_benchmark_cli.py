"""The generation benchmark through the entry points users run: run.py and run_generation.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_entry

from llmbench.generation import main as generation_main


def only_report(output_dir: Path) -> dict:
    reports = sorted(output_dir.glob("*.json"))
    assert len(reports) == 1, reports
    assert not list(output_dir.glob(".*")), "a temp file was left behind"
    return json.loads(reports[0].read_text())


def assert_one_line_error(result, needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]


def test_run_py_benchmark_embedded_model(tmp_path, embedded_model_dir):
    """The README's main job, shortened: run.py --benchmark on the embedded model."""
    result = run_entry("run.py", "--benchmark", "--token-latency", "--greedy",
                       "--input-tokens", "40", "--max-new-tokens", "6", "--num-iter", "2",
                       "--num-warmup", "1", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "---- Prompt size: 40" in out
    for line in ("Inference latency:", "First token average latency:", "Average 2... latency:",
                 "P50 2... latency:", "P90 2... latency:", "P99 2... latency:",
                 "Stddev 2... latency:", "Generated tokens/s:", "Model load:", "Peak RSS:"):
        assert line in out, line
    report = only_report(tmp_path)
    assert report["status"] == "complete"
    assert report["model"]["family"] == "llama"
    assert report["model"]["source"] == "embedded"
    assert report["model"]["gguf_sha256"]
    assert report["prompt"]["tokens"] == 40
    assert report["config"]["num_iter"] == 2 and report["config"]["num_warmup"] == 1
    assert len(report["warmup_seconds"]) == 1  # warm-up ran and is kept apart
    assert len(report["iterations"]) == 2
    assert all(len(it["step_latencies_s"]) == 6 for it in report["iterations"])
    stats = report["statistics"]
    assert stats["next_token_latency_s"]["count"] == 2 * 5
    assert stats["first_token_latency_s"]["count"] == 2
    assert report["peak_rss_bytes"] > 0
    env = report["environment"]
    for key in ("cpu", "cores_physical", "torch_threads", "binding", "memory_total_bytes", "os",
                "python", "packages", "git_revision", "command_line"):
        assert key in env, key
    assert env["packages"]["torch"].startswith("2.13")
    markdown = next(tmp_path.glob("*.md")).read_text()
    assert "next token" in markdown and "peak RSS" in markdown


@pytest.mark.parametrize("mode_flags,mode", [(["--greedy"], "greedy"), ([], "beam"),
                                             (["--sample"], "sample")])
def test_token_latencies_add_up_and_token_count_is_exact(tmp_path, embedded_model_dir, mode_flags,
                                                         mode):
    new_tokens = 8
    status = generation_main(["--token-latency", *mode_flags, "--max-new-tokens", str(new_tokens),
                              "--num-iter", "2", "--num-warmup", "1", "--batch-size", "2",
                              "--output-dir", str(tmp_path)])
    assert status == 0
    report = only_report(tmp_path)
    assert report["decoding"]["mode"] == mode
    for iteration in report["iterations"]:
        steps = iteration["step_latencies_s"]
        assert len(steps) == new_tokens == iteration["new_tokens"]
        # The per-step clock covers the whole generate() call but for its last bookkeeping.
        assert sum(steps) == pytest.approx(iteration["seconds"], rel=0.03)
    assert report["statistics"]["new_tokens_per_sequence"] == new_tokens


def test_streaming_prints_tokens(tmp_path, embedded_model_dir, capsys):
    assert generation_main(["--greedy", "--streaming", "--max-new-tokens", "4", "--num-iter", "1",
                            "--num-warmup", "0", "--output-dir", str(tmp_path)]) == 0
    report = only_report(tmp_path)
    assert report["generated_text"][0].strip() in capsys.readouterr().out


def test_profile_writes_table_and_trace(tmp_path, embedded_model_dir, capsys):
    assert generation_main(["--greedy", "--profile", "--max-new-tokens", "2", "--num-iter", "1",
                            "--num-warmup", "0", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out
    report = json.loads(next(tmp_path.glob("*-greedy.json")).read_text())
    assert Path(report["profile_trace"]).is_file()


def test_prompt_text_and_generation_config(tmp_path, embedded_model_dir):
    assert generation_main(["--prompt", "The capital of France is", "--sample",
                            "--generation-config", "temperature=0.5,top_k=5",
                            "--max-new-tokens", "3", "--num-iter", "1", "--num-warmup", "0",
                            "--output-dir", str(tmp_path)]) == 0
    report = only_report(tmp_path)
    assert report["prompt"]["source"] == "--prompt"
    assert report["prompt"]["tokens"] == 5
    assert report["decoding"]["generate_kwargs"]["temperature"] == 0.5
    assert report["decoding"]["generate_kwargs"]["top_k"] == 5


def test_bfloat16_runs_and_says_if_emulated(tmp_path, embedded_model_dir):
    from llmbench.environment import has_native_bf16

    assert generation_main(["--dtype", "bfloat16", "--greedy", "--max-new-tokens", "2",
                            "--num-iter", "1", "--num-warmup", "0",
                            "--output-dir", str(tmp_path)]) == 0
    report = only_report(tmp_path)
    assert report["model"]["dtype"] == "bfloat16"
    assert report["model"]["weight_bytes"] == 2 * report["model"]["parameters"]
    assert any("emulated" in note for note in report["notes"]) == (not has_native_bf16())


def test_a_dtype_the_cpu_cannot_run_is_refused(monkeypatch, embedded_model_dir):
    from llmbench import precision
    from llmbench.errors import UserError

    def no_kernels(dtype):
        raise RuntimeError(f"no {dtype} kernel")

    monkeypatch.setattr(precision, "probe_dtype", no_kernels)
    with pytest.raises(UserError, match="--dtype float16 can't run on this CPU"):
        generation_main(["--dtype", "float16"])


def test_ipex_never_silently_runs_something_else(tmp_path, embedded_model_dir):
    import importlib.util

    if importlib.util.find_spec("intel_extension_for_pytorch") is not None:
        pytest.skip("IPEX is installed here; this test checks the refusal where it is not")
    result = run_entry("run.py", "--benchmark", "--ipex", "--greedy", "--max-new-tokens", "2",
                       "--num-iter", "1", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    # run.py checks IPEX before starting a step: one line, nothing loaded (issue 19)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Intel Extension for PyTorch does not import" in lines[0], lines
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("args,needle", [
    (["-m", "/nonexistent/model-folder"], "no such model file or folder"),
    (["-m", "nonexistent-org/nonexistent-model"], "cannot load model 'nonexistent-org/"),
    (["--streaming"], "--streaming needs one beam"),
    (["--streaming", "--greedy", "--batch-size", "2"], "--streaming needs one beam"),
    (["--num-iter", "0"], "--num-iter: must be >= 1"),
    (["--dtype", "int3"], "invalid choice: 'int3'"),
    (["--generation-config", "temprature=0.5"], "unknown generation setting 'temprature'"),
    (["--generation-config", "max_new_tokens=5"], "use --max-new-tokens"),
    (["--prompt", "hi", "--input-tokens", "40"], "pass only one"),
    (["--input-tokens", "9000", "--greedy"], "exceeds the model's context of 8192"),
    (["--greedy", "--sample"], "not allowed with argument"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, embedded_model_dir, tmp_path):
    result = run_entry("single_instance/run_generation.py", *args, "--output-dir", str(tmp_path))
    assert_one_line_error(result, needle)


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"this is not a model")
    result = run_entry("single_instance/run_generation.py", "-m", str(bogus))
    assert_one_line_error(result, "not a GGUF model")


def test_run_py_passes_a_failed_step_on(tmp_path):
    result = run_entry("run.py", "--benchmark", "-m", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "error: no such model file or folder" in result.stderr
    assert "error: step 'benchmark' failed with exit status 2" in result.stderr


def test_run_py_with_nothing_to_run():
    assert_one_line_error(run_entry("run.py", "--greedy"), "nothing to run")


def test_config_file_overrides_the_model_config(tmp_path, embedded_model_dir):
    """--config-file keys go over config.json, and may replace an unsupported (remote-code)
    model_type by a native one, as utils/model_config/ does for old falcon checkpoints."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for item in embedded_model_dir.iterdir():
        (model_dir / item.name).symlink_to(item)
    (model_dir / "config.json").unlink()
    config = json.loads((embedded_model_dir / "config.json").read_text())
    config["model_type"] = "SomeRemoteCodeName"  # what the file below replaces
    (model_dir / "config.json").write_text(json.dumps(config))
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    out = tmp_path / "out"
    assert generation_main(["-m", str(model_dir), "--config-file", str(override), "--greedy",
                            "--max-new-tokens", "2", "--num-iter", "1", "--num-warmup", "0",
                            "--output-dir", str(out)]) == 0
    report = only_report(out)
    assert report["model"]["family"] == "llama"
    # 30 layers of 3.54M parameters each are gone.
    assert report["model"]["parameters"] < 135_000_000 - 25 * 3_500_000
    result = run_entry("single_instance/run_generation.py", "-m", str(model_dir))
    assert_one_line_error(result, "model type 'SomeRemoteCodeName' is not supported")


def test_num_beams_and_seed_reach_generate(tmp_path, embedded_model_dir):
    assert generation_main(["--num-beams", "2", "--seed", "7", "--max-new-tokens", "2",
                            "--num-iter", "1", "--num-warmup", "0",
                            "--output-dir", str(tmp_path)]) == 0
    report = only_report(tmp_path)
    assert report["decoding"]["mode"] == "beam"
    assert report["decoding"]["generate_kwargs"]["num_beams"] == 2
    assert report["config"]["seed"] == 7
