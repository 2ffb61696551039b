"""Distributed inference with DeepSpeed AutoTP: 2 ranks on this machine, launched the way the
README tells users (`DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 --bind_cores_to_rank
run.py --benchmark --autotp ...`), checked token for token against a single-instance run.

Each launch costs ~20-50 s on 2 cores (two Python start-ups per rank and the model load), so the
launches are few and short: 4 new tokens, 1 iteration, no warm-up. The very first launch on a
machine also compiles DeepSpeed's shared-memory all-reduce op (~80 s on 2 cores, cached after;
tools/build_deepspeed_ops.py does it ahead of time).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_entry

NEW_TOKENS = "4"
SHORT = ["--max-new-tokens", NEW_TOKENS, "--num-iter", "1", "--num-warmup", "0",
         "--token-latency"]


def deepspeed_launcher() -> str:
    beside_python = Path(sys.executable).parent / "deepspeed"
    found = str(beside_python) if beside_python.is_file() else shutil.which("deepspeed")
    assert found, "the deepspeed launcher is not installed (pip install -r requirements.txt)"
    assert shutil.which("numactl"), "numactl is missing (--bind_cores_to_rank needs it)"
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(*args: str, env: dict[str, str] | None = None,
           timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """What the README says: DS_ACCELERATOR=cpu deepspeed --num_accelerators 2
    --bind_cores_to_rank run.py --benchmark --autotp ..."""
    command = [deepspeed_launcher(), "--num_accelerators", "2", "--bind_cores_to_rank",
               "--master_port", str(free_port()), str(ROOT / "run.py"), "--benchmark", "--autotp",
               *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=timeout)


def only_report(output_dir: Path) -> dict:
    reports = sorted(output_dir.glob("*.json"))
    assert len(reports) == 1, reports  # rank 0 writes it, nobody else
    return json.loads(reports[0].read_text())


@functools.lru_cache(maxsize=2)
def single_instance_model(model: str | None):
    from llmbench.models import load_model

    return load_model(model, "float32")


def reference_ids(model: str | None, *, greedy: bool, batch_size: int = 1) -> list[list[int]]:
    """The single-instance run's tokens: the generate() call run_benchmark makes, in-process."""
    import torch

    from llmbench.decoding import decoding_settings
    from llmbench.prompts import build_prompt

    loaded = single_instance_model(model)
    prompt = build_prompt(loaded.tokenizer, loaded.config, loaded.family.model_type,
                          input_tokens=None, prompt_text=None, batch_size=batch_size,
                          max_new_tokens=int(NEW_TOKENS))
    _, kwargs = decoding_settings(greedy=greedy, sample=False, num_beams=4,
                                  max_new_tokens=int(NEW_TOKENS), generation_config=None)
    with torch.inference_mode():
        output = loaded.model.generate(input_ids=prompt.input_ids,
                                       attention_mask=prompt.attention_mask,
                                       pad_token_id=loaded.tokenizer.pad_token_id, **kwargs)
    return output.tolist()


def check_run(result: subprocess.CompletedProcess[str], output_dir: Path,
              expected: list[list[int]], mode: str) -> dict:
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    out = result.stdout
    for line in ("---- Prompt size: 32", "Inference latency:", "First token average latency:",
                 "Average 2... latency:", "Generated tokens/s:", "Rank 0: cores",
                 "Rank 1: cores"):
        assert line in out, line
    assert out.count("---------- Summary: ----------") == 1  # rank 0 only
    report = only_report(output_dir)
    assert report["status"] == "complete"
    assert report["decoding"]["mode"] == mode
    assert report["backend"]["name"] == "deepspeed-autotp"
    dist = report["distributed"]
    assert dist["world_size"] == 2 and report["backend"]["tp_size"] == 2
    assert dist["communication_backend"] in ("gloo", "ccl")
    assert dist["load_path"] == "meta+checkpoint"
    ranks = dist["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert not set(ranks[0]["cpu_affinity"]) & set(ranks[1]["cpu_affinity"])  # bound apart
    assert all(r["omp_num_threads"] == str(len(r["cpu_affinity"])) for r in ranks)
    assert all(r["peak_rss_bytes"] > 0 for r in ranks)
    assert all(0 < r["local_weight_bytes"] < report["model"]["weight_bytes"] for r in ranks)
    # The point: every rank generated exactly the single-instance tokens.
    assert report["generated_token_ids"] == expected
    assert all(r["generated_token_ids"] == expected for r in ranks)
    assert dist["ranks_agree"] is True
    assert all(len(it["step_latencies_s"]) == int(NEW_TOKENS) for it in report["iterations"])
    markdown = next(output_dir.glob("*.md")).read_text()
    assert "| rank | host | cores |" in markdown
    return report


# ---------------------------------------------------------------------------------------------
# The tiny random llama, resharded by utils/create_shard_model.py on its own


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, embedded_model_dir) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", embedded_model_dir)


@pytest.fixture(scope="module")
def tiny_shard(tiny_llama, tmp_path_factory) -> Path:
    """utils/create_shard_model.py alone: -m and --save-path, small files."""
    save_path = tmp_path_factory.mktemp("shards") / "tiny_shard"
    result = run_entry("utils/create_shard_model.py", "-m", str(tiny_llama), "--save-path",
                       str(save_path), "--max-shard-size", "5MB")
    assert result.returncode == 0, result.stderr
    assert f"shard: {save_path}" in result.stdout
    return save_path


def test_create_shard_model_alone(tiny_shard, tiny_llama, tmp_path):
    from llmbench.distributed import SHARD_MARKER, shard_main
    from llmbench.errors import UserError

    files = sorted(tiny_shard.glob("*.safetensors"))
    assert len(files) >= 3, files  # resharded into small files
    assert all(path.stat().st_size < 14 * 2**20 for path in files)
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json", SHARD_MARKER):
        assert (tiny_shard / name).is_file(), name
    assert not list(tiny_shard.parent.glob(".*staging*"))
    marker = json.loads((tiny_shard / SHARD_MARKER).read_text())
    assert marker["family"] == "llama" and marker["files"] == [p.name for p in files]
    # The same shard again is reused; a different one is never written over it.
    assert shard_main(["-m", str(tiny_llama), "--save-path", str(tiny_shard),
                       "--max-shard-size", "5MB"]) == 0
    with pytest.raises(UserError, match="already holds a shard"):
        shard_main(["-m", str(tiny_llama), "--save-path", str(tiny_shard)])
    # Without --save-path: --output-dir/<family>_local_shard, the family from config.model_type.
    assert shard_main(["-m", str(tiny_llama), "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "llama_local_shard" / SHARD_MARKER).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode_flags,mode,batch", [(["--greedy"], "greedy", 1),
                                                   ([], "beam", 2)])
def test_tiny_model_two_ranks_match_single_instance(tiny_shard, tmp_path, mode_flags, mode,
                                                    batch):
    expected = reference_ids(str(tiny_shard), greedy=mode == "greedy", batch_size=batch)
    result = launch("-m", str(tiny_shard), *mode_flags, "--batch-size", str(batch), *SHORT,
                    "--output-dir", str(tmp_path))
    report = check_run(result, tmp_path, expected, mode)
    assert len(report["distributed"]["checkpoint_files"]) >= 3  # loaded shard by shard


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2 (the default model): --shard-model, then a later run from the shard


@pytest.fixture(scope="module")
def embedded_shard_run(tmp_path_factory, embedded_model_dir):
    output_dir = tmp_path_factory.mktemp("embedded")
    result = launch("--shard-model", "--max-shard-size", "200MB", "--greedy", *SHORT,
                    "--output-dir", str(output_dir))
    return result, output_dir


@pytest.mark.slow
def test_embedded_model_shard_model_greedy(embedded_shard_run):
    result, output_dir = embedded_shard_run
    expected = reference_ids(None, greedy=True)
    shard = output_dir / "llama_local_shard"  # <family>_local_shard under --output-dir
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(shard.glob("*.safetensors"))) >= 3
    assert "shard: local rank 1 waits for local rank 0" in result.stdout  # written once
    report = check_run(result, output_dir, expected, "greedy")
    assert report["model"]["path"] == str(shard)


@pytest.mark.slow
def test_later_run_from_the_shard_beam(embedded_shard_run, tmp_path):
    _, output_dir = embedded_shard_run
    shard = output_dir / "llama_local_shard"
    assert shard.is_dir()
    expected = reference_ids(None, greedy=False)
    result = launch("-m", str(shard), *SHORT, "--output-dir", str(tmp_path))
    check_run(result, tmp_path, expected, "beam")


# ---------------------------------------------------------------------------------------------
# A failing rank fails the run


@pytest.mark.slow
def test_a_failing_rank_fails_the_whole_run(tiny_shard, tmp_path):
    start = time.monotonic()
    result = launch("-m", str(tiny_shard), "--greedy", *SHORT, "--output-dir", str(tmp_path),
                    env={"LLMBENCH_FAIL_RANK": "1"}, timeout=300)
    assert result.returncode != 0
    reasons = [line for line in result.stderr.splitlines() if line.startswith("error: rank 1:")]
    assert reasons == ["error: rank 1: failure injected on purpose (LLMBENCH_FAIL_RANK=1)"]
    assert time.monotonic() - start < 200  # rank 0 did not wait for its timeout
    assert "Summary" not in result.stdout


# ---------------------------------------------------------------------------------------------
# Fast checks, in-process


def test_run_py_plans_shard_then_benchmark(tiny_llama, tmp_path):
    from llmbench.dispatch import build_parser, plan_steps

    parser = build_parser()
    args = parser.parse_args(["--benchmark", "--autotp", "--shard-model", "-m", str(tiny_llama),
                              "--greedy", "--output-dir", str(tmp_path), "--local_rank=1"])
    shard, bench = plan_steps(parser, args)
    save_path = str(tmp_path / "llama_local_shard")
    assert (shard.name, shard.script) == ("shard", "utils/create_shard_model.py")
    assert shard.argv[:2] == ["--save-path", save_path] and "--local_rank" in shard.argv
    assert bench.script == "distributed/run_generation_with_deepspeed.py"
    assert bench.argv[:2] == ["-m", save_path]
    assert "--greedy" in bench.argv and "--local_rank" in bench.argv
    assert "--autotp" not in bench.argv and "--shard-model" not in bench.argv


@pytest.mark.parametrize("args,needle", [
    (["--benchmark", "--shard-model"], "--shard-model only applies with --autotp"),
    (["--benchmark", "--local_rank=0"], "without --autotp"),
    (["--autotp"], "pass --benchmark"),
    (["--benchmark", "--autotp", "--max-shard-size", "1GB"], "only applies with --shard-model"),
    (["--benchmark", "--autotp", "--ipex"], "--backend stock"),
])
def test_run_py_refuses_distributed_flags_that_would_do_nothing(args, needle):
    result = run_entry("run.py", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_local_size_is_set_for_launchers_that_do_not(monkeypatch):
    """torchrun sets LOCAL_WORLD_SIZE, not LOCAL_SIZE: DeepSpeed's shm op then segfaulted."""
    from llmbench.distributed import setup_environment

    for name in ("LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    info = setup_environment()
    assert (info.rank, info.world_size, info.local_size) == (1, 4, 2)
    assert os.environ["LOCAL_SIZE"] == "2"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name)
    monkeypatch.delenv("MASTER_PORT")
    info = setup_environment()  # no launcher: one rank
    assert (info.rank, info.world_size, info.local_size) == (0, 1, 1)
    assert os.environ["MASTER_PORT"].isdigit()


def test_shm_all_reduce_is_off_when_ranks_span_machines(monkeypatch):
    from deepspeed.comm import comm

    from llmbench.distributed import RankInfo, guard_shm_all_reduce

    backend = SimpleNamespace(shm_comm_op=object(), shm_vector_kernel_level=1)
    monkeypatch.setattr(comm, "cdb", backend)
    guard_shm_all_reduce(RankInfo(rank=0, world_size=2, local_rank=0, local_size=2))
    assert backend.shm_vector_kernel_level == 1
    guard_shm_all_reduce(RankInfo(rank=0, world_size=4, local_rank=0, local_size=2))
    assert backend.shm_vector_kernel_level == 0


def test_init_inference_pitfalls_are_refused():
    import torch

    from llmbench.distributed import init_autotp
    from llmbench.errors import UserError

    real = torch.nn.Linear(2, 2)
    with pytest.raises(AssertionError, match="meta device"):
        init_autotp(real, world_size=2, dtype=torch.float32, checkpoint_json="ckpt.json")
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2)
    with pytest.raises(AssertionError, match="one rank"):
        init_autotp(meta, world_size=1, dtype=torch.float32, checkpoint_json="ckpt.json")
    with pytest.raises(UserError, match="can't be loaded back on CPU"):
        init_autotp(real, world_size=2, dtype=torch.float32, checkpoint_json=None,
                    options={"save_mp_checkpoint_path": "/tmp/x"})


def test_meta_loading_needs_a_checkpoint_that_covers_the_model(tiny_llama, tmp_path):
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmbench.distributed import meta_load_problem, weight_files

    config = AutoConfig.from_pretrained(tiny_llama)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    files = weight_files(tiny_llama)
    assert meta_load_problem(model, files) is None
    partial = load_file(str(files[0]))
    partial.pop("model.norm.weight")
    save_file(partial, str(tmp_path / "model.safetensors"))
    assert "model.norm.weight" in meta_load_problem(model, [tmp_path / "model.safetensors"])


def test_shard_folder_is_named_by_family():
    from llmbench.distributed import shard_folder_name
    from llmbench.models import FAMILIES

    for model_type in FAMILIES:
        assert shard_folder_name(model_type) == f"{model_type}_local_shard"
    assert shard_folder_name(None) == "model_local_shard"


def test_run_scaling_builds_the_multi_node_launch(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    script = str(ROOT / "tools" / "run_scaling.sh")
    result = subprocess.run([script, str(hostfile), "lo", "2", "-m", "some/model", "--greedy"],
                            capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1]
    for part in (f"--hostfile {hostfile}", "--num_accelerators 2", "--bind_cores_to_rank",
                 "--master_addr 127.0.0.1", "run.py --benchmark --autotp -m some/model --greedy"):
        assert part in command, part
    assert "GLOO_SOCKET_IFNAME" in result.stdout
    bad = subprocess.run([script, str(hostfile), "no-such-interface", "2"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: run_scaling.sh: network")
