"""Every supported family generates, greedy and beam, through the real entry point.

The models are tiny and random (tests/tiny_models.py): what is checked is that each family
loads, builds its prompt, generates exactly the tokens asked for, is timed once per step and is
reported under the family its config names.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_entry
from tiny_models import FAMILY_TYPES, make_tiny_model

MODES = ("greedy", "beam")
NEW_TOKENS = 4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny models gain nothing from threads, and on a shared 2-core machine the spinning of
    a second OpenMP thread about doubles the CPU time of this module. Restored afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory,
                embedded_model_dir: Path) -> dict[str, Path]:
    """All tiny models, built once for the module: {model_type: folder}."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {model_type: make_tiny_model(model_type, root / model_type, embedded_model_dir)
            for model_type in FAMILY_TYPES}


def generate(model_dir: Path, output_dir: Path, mode: str) -> dict[str, Any]:
    """Run the benchmark in-process on `model_dir`; return the one JSON report it wrote."""
    from llmbench.generation import main

    argv = ["-m", str(model_dir), "--input-tokens", "8", "--max-new-tokens", str(NEW_TOKENS),
            "--num-iter", "1", "--num-warmup", "0", "--token-latency",
            "--output-dir", str(output_dir)]
    if mode == "greedy":
        argv.append("--greedy")
    assert main(argv) == 0
    reports = sorted(output_dir.glob("*.json"))
    assert len(reports) == 1, reports
    return json.loads(reports[0].read_text())


def test_every_supported_family_has_a_tiny_model() -> None:
    """Text families in tests/tiny_models.py, multimodal ones in tests/tiny_multimodal.py."""
    from tiny_multimodal import BUILDERS

    from llmbench.models import FAMILIES

    text = sorted(name for name, family in FAMILIES.items() if not family.multimodal)
    assert sorted(FAMILY_TYPES) == text
    assert sorted(BUILDERS) == sorted(set(FAMILIES) - set(text))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_family_generates(tiny_models: dict[str, Path], tmp_path: Path, model_type: str,
                          mode: str) -> None:
    report = generate(tiny_models[model_type], tmp_path, mode)
    assert report["status"] == "complete"
    assert report["model"]["family"] == model_type
    assert report["statistics"]["new_tokens_per_sequence"] == NEW_TOKENS
    assert report["decoding"]["mode"] == mode
    assert report["iterations"], "no measured iteration"
    for iteration in report["iterations"]:
        assert len(iteration["step_latencies_s"]) == NEW_TOKENS
        assert all(latency > 0 for latency in iteration["step_latencies_s"])


def test_family_comes_from_config_not_path(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    misleading = tmp_path / "opt-bloom-falcon"
    shutil.copytree(tiny_models["llama"], misleading)
    report = generate(misleading, tmp_path / "out", "greedy")
    assert report["status"] == "complete"
    assert report["model"]["family"] == "llama"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_remote_code_family_without_its_code_is_a_user_error(tmp_path: Path) -> None:
    model = tmp_path / "chatglm-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    }))
    result = run_entry("single_instance/run_generation.py", "-m", str(model),
                       "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "trust_remote_code" in lines[0]


def test_unknown_model_type_is_a_user_error(tmp_path: Path) -> None:
    model = tmp_path / "mystery"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "not_a_family"}))
    result = run_entry("single_instance/run_generation.py", "-m", str(model),
                       "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "not supported" in lines[0]
