"""Distributed inference with DeepSpeed AutoTP: 2 ranks on this machine, launched the way the
README tells users (`DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 --bind_cores_to_rank
run.py --benchmark --autotp ...`), checked token for token against a single-instance run.

Each launch costs ~20-50 s on 2 cores (two Python start-ups per rank and the model load), so the
launches are few and short: 4 new tokens, 1 iteration, no warm-up. The very first launch on a
machine also compiles DeepSpeed's shared-memory all-reduce op (~80 s on 2 cores, cached after;
tools/build_deepspeed_ops.py does it ahead of time).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, once_per_run, run_entry

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


def launch(*args: str, env: dict[str, str] | None = None, timeout: float = 900,
           launcher: str = "deepspeed") -> subprocess.CompletedProcess[str]:
    """What the README says: DS_ACCELERATOR=cpu deepspeed --num_accelerators 2
    --bind_cores_to_rank run.py --benchmark --autotp ...". Every launch must leave none of
    DeepSpeed's shared-memory all-reduce files behind in /dev/shm (each holds RAM until reboot).

    launcher="direct": the same two ranks started the way DeepSpeed's launch.py starts them (the
    environment it gives each rank, `--local_rank=N`, each rank bound to its share of the cores
    with numactl and as many OpenMP threads), without the `deepspeed` CLI and launch.py: those
    two Python start-ups took 5 s of each 9 s launch here. The tests of what the launcher itself
    does (the README's command lines, a failing or killed rank, two hosts, the seed commands)
    keep the real one."""
    port = free_port()
    script = [str(ROOT / "run.py"), "--benchmark", "--autotp", *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    if launcher == "deepspeed":
        command = [deepspeed_launcher(), "--num_accelerators", "2", "--bind_cores_to_rank",
                   "--master_port", str(port), *script]
        # its own session, so that a hung launch is ended with every rank it started (a
        # timeout of subprocess.run kills only the launcher, leaving the ranks behind)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=full_env, cwd=ROOT,
                              start_new_session=True) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                raise
        result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    else:
        assert launcher == "direct", launcher
        result = launch_ranks_directly(script, full_env, port, timeout)
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"left in /dev/shm: {left}"
    return result


def launch_ranks_directly(script: list[str], env: dict[str, str], port: int, timeout: float,
                          world: int = 2) -> subprocess.CompletedProcess[str]:
    """`world` ranks of `python -u SCRIPT --local_rank=N ...` on this host, as launch.py starts
    them: each in a session of its own (killed whole, with its steps, when another rank fails
    or on a timeout), their output merged as the launcher's is, the first failing rank's
    status returned."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // world)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        ranks: list[subprocess.Popen] = []
        for rank in range(world):
            own = cores[rank * per_rank:(rank + 1) * per_rank] or cores
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world), "LOCAL_SIZE": str(world), "CROSS_RANK": "0",
                        "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "OMP_NUM_THREADS": str(len(own))}
            command = ["numactl", "-C", ",".join(map(str, own)), sys.executable, "-u",
                       script[0], f"--local_rank={rank}", *script[1:]]
            ranks.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, env=rank_env,
                                          cwd=ROOT, start_new_session=True))
        # As launch.py does: a rank that fails ends the others (rather than leaving them to
        # wait for it until the timeout); a timeout ends them all.
        deadline = time.monotonic() + timeout
        status = 0  # the first failing rank's own exit status
        while any(rank.poll() is None for rank in ranks):
            status = next((rank.returncode for rank in ranks if rank.returncode), 0)
            if status or time.monotonic() > deadline:
                for rank in ranks:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(rank.pid, signal.SIGKILL)
                    rank.wait()
                if not status:
                    raise subprocess.TimeoutExpired(ranks[0].args, timeout)
                break
            time.sleep(0.1)
        status = status or next((rank.returncode for rank in ranks if rank.returncode), 0)
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(ranks[0].args, status, stdout.read(), stderr.read())


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


    return generated_ids(single_instance_model(model), greedy=greedy, batch_size=batch_size)


def generated_ids(loaded, *, greedy: bool, batch_size: int = 1) -> list[list[int]]:
    """The tokens run_benchmark's generate() call makes with this loaded model, in-process."""
    import torch

    from llmbench.decoding import decoding_settings
    from llmbench.prompts import build_prompt

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
    from llmbench.cli.tools import shard_main
    from llmbench.distributed.shards import SHARD_MARKER
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
    # greedy under the real launcher; beam search with the ranks started directly
    result = launch("-m", str(tiny_shard), *mode_flags, "--batch-size", str(batch), *SHORT,
                    "--output-dir", str(tmp_path),
                    launcher="deepspeed" if mode == "greedy" else "direct")
    report = check_run(result, tmp_path, expected, mode)
    assert len(report["distributed"]["checkpoint_files"]) >= 3  # loaded shard by shard


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2 (the default model): --shard-model, then a later run from the shard


@pytest.fixture(scope="module")
def embedded_shard_run(tmp_path_factory, embedded_model_dir):
    """One launch per test run (shared by the xdist workers): --shard-model on the embedded
    model, the shard under --output-dir."""
    def shard_and_run(output_dir: Path):
        result = launch("--shard-model", "--max-shard-size", "200MB", "--greedy", *SHORT,
                        "--output-dir", str(output_dir))
        return result, output_dir

    return once_per_run(tmp_path_factory, "embedded-shard-run", shard_and_run)


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
    result = launch("-m", str(shard), *SHORT, "--output-dir", str(tmp_path), launcher="direct")
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
    from llmbench.cli.run import build_parser, plan_steps

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
    # The examples' `--autotp --ipex` (issue 19): without IPEX, one line saying so.
    (["--benchmark", "--autotp", "--ipex"], "Intel Extension for PyTorch does not import here"),
])
def test_run_py_refuses_distributed_flags_that_would_do_nothing(args, needle):
    result = run_entry("run.py", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_local_size_is_set_for_launchers_that_do_not(monkeypatch):
    """torchrun sets LOCAL_WORLD_SIZE, not LOCAL_SIZE: DeepSpeed's shm op then segfaulted."""
    from llmbench.distributed.ranks import setup_environment

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

    from llmbench.distributed.ranks import RankInfo, guard_shm_all_reduce

    backend = SimpleNamespace(shm_comm_op=object(), shm_vector_kernel_level=1)
    monkeypatch.setattr(comm, "cdb", backend)
    guard_shm_all_reduce(RankInfo(rank=0, world_size=2, local_rank=0, local_size=2))
    assert backend.shm_vector_kernel_level == 1
    guard_shm_all_reduce(RankInfo(rank=0, world_size=4, local_rank=0, local_size=2))
    assert backend.shm_vector_kernel_level == 0


def test_init_inference_pitfalls_are_refused():
    import torch

    from llmbench.distributed.model import init_autotp
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

    from llmbench.distributed.model import meta_load_problem
    from llmbench.distributed.shards import weight_files

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
    from llmbench.distributed.shards import shard_folder_name
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


# ---------------------------------------------------------------------------------------------
# Weight-only quantization per rank (llmbench.quant.autotp)

WOQ_GROUP = 32  # divides every row-parallel slice of the model below: whole-model groups


@pytest.fixture(scope="module")
def tiny_llama_128(tmp_path_factory, embedded_model_dir) -> Path:
    """A tiny llama wide enough (hidden 128) that DeepSpeed's 64-channel grains give each of the
    2 ranks a slice of every row-parallel layer, lm_head included, and with weights large
    enough (initializer_range 0.08) that INT4 changes its greedy tokens (at the default 0.02
    float, INT8 and INT4 all generate the same ones, which would test nothing)."""
    from tiny_models import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny128") / "llama",
                           embedded_model_dir, hidden_size=128, initializer_range=0.08)


@pytest.fixture(scope="module")
def woq_autotp_run(tiny_llama_128, tmp_path_factory):
    """One 2-rank launch of the real command, shared by the assertions below."""
    output_dir = tmp_path_factory.mktemp("woq_autotp")
    result = launch("-m", str(tiny_llama_128), "--greedy", *SHORT,
                    "--ipex-weight-only-quantization", "--weight-dtype", "INT4",
                    "--group-size", str(WOQ_GROUP), "--output-dir", str(output_dir),
                    launcher="direct")
    return result, output_dir


class SlicedRowParallel:
    """Reference for a row-parallel projection quantized per rank: each slice of the input
    channels quantized on its own (quantize_weight, the code every rank runs), the partial
    products summed, as the ranks' all-reduce does."""

    kind = "reference"

    def __init__(self, weight, widths, scheme) -> None:
        from llmbench.quant.rtn import quantize_weight

        self.parts, offset = [], 0
        for width in widths:
            if width:
                self.parts.append((offset, quantize_weight(weight[:, offset:offset + width],
                                                           None, scheme)))
            offset += width
        self.out_features, self.in_features = weight.shape

    def __call__(self, x):
        return sum(part(x[..., start:start + part.in_features].contiguous())
                   for start, part in self.parts)


@functools.lru_cache(maxsize=1)
def woq_float_model(model_dir: Path):
    from llmbench.models import load_model

    return load_model(str(model_dir), "float32")


def woq_reference_ids(model_dir: Path, weight_dtype: str | None, group: int,
                      lm_head_widths: list[int] | None = None) -> list[list[int]]:
    """Greedy tokens of a single-instance model quantized with the single-instance code
    (apply.quantize_rtn); lm_head_widths: its lm_head quantized slice by slice instead, as the
    ranks do (its INT8 per-channel scales then cover a slice, not the whole row)."""
    from llmbench.quant import apply
    from llmbench.quant.scheme import Scheme

    loaded = copy.copy(woq_float_model(model_dir))
    loaded.model = copy.deepcopy(loaded.model)  # quantizing swaps its modules
    if weight_dtype is not None:
        scheme = Scheme("woq", weight_dtype, group, False)
        qlinears = apply.quantize_rtn(loaded.model, scheme)
        if lm_head_widths is not None:
            qlinears["lm_head"] = SlicedRowParallel(loaded.model.lm_head.weight, lm_head_widths,
                                                    apply.projection_scheme(scheme, True))
        apply.install_hf(loaded.model, qlinears)
    return generated_ids(loaded, greedy=True)


@pytest.mark.slow
def test_woq_int4_two_ranks_match_quantizing_each_slice(woq_autotp_run, tiny_llama_128):
    result, output_dir = woq_autotp_run
    report = only_report(output_dir)
    quant = report["backend"]["quantization"]
    widths = quant["row_parallel_slice_widths"]
    # DeepSpeed's split of this model: every slice a multiple of the group (so o_proj and
    # down_proj have the whole model's groups), and lm_head cut in two.
    assert widths == {"model.layers.*.self_attn.o_proj": [64, 64],
                      "model.layers.*.mlp.down_proj": [64, 64], "lm_head": [64, 64]}
    expected = woq_reference_ids(tiny_llama_128, "INT4", WOQ_GROUP, widths["lm_head"])
    # The comparison can tell schemes apart: float and another grouping generate otherwise.
    assert expected != woq_reference_ids(tiny_llama_128, None, WOQ_GROUP)
    assert expected != woq_reference_ids(tiny_llama_128, "INT4", 64, widths["lm_head"])
    check_run(result, output_dir, expected, "greedy")


@pytest.mark.slow
def test_woq_autotp_report_says_what_ran(woq_autotp_run):
    result, output_dir = woq_autotp_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("quantized: woq INT4 group 32 asym, quantized per rank after sharding: "
            "15 projections per rank (10 column, 4 row, 1 lm_head), 0 left float") in result.stdout
    report = only_report(output_dir)
    quant = report["backend"]["quantization"]
    assert quant["scheme"] == {"method": "woq", "weight_dtype": "INT4", "group_size": WOQ_GROUP,
                               "sym": False, "lowp_mode": "AUTO", "lm_head": True, "extra": {},
                               "act_quant_mode": "PER_BATCH_SYM"}
    assert quant["description"] == "woq INT4 group 32 asym"
    assert quant["applied"] == "quantized per rank after sharding"
    assert quant["formats"] == ["int4", "int8"]  # the lm_head INT8 per channel, as single
    assert quant["quantized_projections_per_rank"] == 15
    assert quant["float_projections_per_rank"] == 0
    assert quant["splits_per_rank"] == {"column": 10, "row": 4, "lm_head": 1, "whole": 0}
    assert quant["row_parallel_scales"].startswith(
        "the per-channel scales of 1 row-parallel projection(s) cover each rank's slice")
    ranks = report["distributed"]["ranks"]
    for record in ranks:
        assert record["quantized_projections"] == 15 and record["float_projections"] == 0
        # Local weights are the quantized slices plus the float embedding and norms.
        assert 0 < record["quantized_weight_bytes"] < record["local_weight_bytes"]
    # GB/s is over what all ranks read per token: their quantized slices (and norms), not the
    # fp32 model; each rank's fp32 input embedding (untied, whole on every rank) is not read.
    embedding = 49152 * 128 * 4
    per_token = sum(r["local_weight_bytes"] - embedding for r in ranks)
    assert quant["weight_bytes_per_token"] == per_token
    assert report["backend"]["weight_bytes_per_token"] == per_token
    assert report["model"]["decode_weight_bytes"] == per_token  # as single-instance sets it
    assert per_token < report["model"]["weight_bytes"] / 6
    stats = report["statistics"]
    next_mean = stats["next_token_latency_s"]["mean"]
    assert stats["decode_weight_read_gb_per_s"] == pytest.approx(per_token / next_mean / 1e9)
    markdown = next(output_dir.glob("*.md")).read_text()
    assert "Quantization: woq INT4 group 32 asym, quantized per rank after sharding;" in markdown
    assert "| quantized / float projections |" in markdown and " 15 / 0 |" in markdown


def test_run_py_forwards_woq_flags_to_the_ranks():
    from llmbench.cli import autotp_scheme, settings_from
    from llmbench.cli.run import build_parser, plan_steps
    from llmbench.distributed.benchmark import build_parser as rank_parser

    parser = build_parser()
    args = parser.parse_args(["--benchmark", "--autotp", "--greedy", "--local_rank=0",
                              "--ipex-weight-only-quantization", "--weight-dtype", "INT4",
                              "--group-size", "64", "--woq-sym-quant-weight"])
    (step,) = plan_steps(parser, args)  # no quantize-and-save step: the ranks quantize
    assert step.script == "distributed/run_generation_with_deepspeed.py"
    for flag in ("--ipex-weight-only-quantization", "--woq-sym-quant-weight", "--local_rank"):
        assert flag in step.argv, flag
    assert "--quantized-model-path" not in step.argv
    ranks = rank_parser()
    rank_args = ranks.parse_args(step.argv)
    scheme = autotp_scheme(ranks, rank_args, settings_from(rank_args))
    assert (scheme.method, scheme.weight_dtype, scheme.group_size, scheme.sym) == (
        "woq", "INT4", 64, True)


@pytest.mark.parametrize("extra,needle", [
    (["--ipex-smooth-quant"], "--ipex-smooth-quant does not run with --autotp"),
    (["--ipex-weight-only-quantization", "--quantized-model-path", "q/best_model.safetensors"],
     "a saved quantized model is not split per rank; quantize per rank with "
     "--ipex-weight-only-quantization"),
    (["--low-precision-checkpoint", "gptq.safetensors"],
     "a whole-model checkpoint is not split per rank"),
    (["--ipex-weight-only-quantization", "--alpha", "0.7"],
     "--alpha does not apply with --autotp: it is a SmoothQuant setting"),
    (["--weight-dtype", "INT4"], "--weight-dtype only applies with --ipex-weight-only-quant"),
    # What scheme_of refuses everywhere is refused here too.
    (["--ipex-weight-only-quantization", "--weight-dtype", "INT4", "--group-size", "48"],
     "--group-size 48 is not allowed"),
    (["--ipex-weight-only-quantization", "--weight-dtype", "FP8", "--group-size", "64"],
     "quantizes per output channel only"),
    (["--ipex-weight-only-quantization", "--weight-dtype", "NF4", "--lowp-mode", "INT8"],
     "runs int8 activations against INT8 or INT4 weights"),
])
def test_autotp_quantization_refusals(extra, needle):
    """run.py refuses before the launch; the rank script (launched directly) refuses alike,
    before joining the process group."""
    from llmbench.cli.run import build_parser, plan_steps
    from llmbench.distributed import benchmark
    from llmbench.errors import UserError

    parser = build_parser()
    with pytest.raises(UserError) as run_py:
        plan_steps(parser, parser.parse_args(["--benchmark", "--autotp", "--greedy", *extra]))
    assert needle in str(run_py.value)
    with pytest.raises(UserError) as rank:
        benchmark.main(["--greedy", *extra])
    assert str(rank.value) == str(run_py.value)


def test_run_py_refuses_smooth_quant_under_autotp_in_one_line():
    result = run_entry("run.py", "--benchmark", "--autotp", "--ipex-smooth-quant")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: --ipex-smooth-quant does not run with --autotp"), lines


def toy_tp_model(lm_head_rank: int = 1):
    """A rank's model as AutoTP leaves it, with DeepSpeed's own layer classes but no process
    group (mp_group None: no collective)."""
    import torch
    from deepspeed.module_inject import layers as ds

    class ToyTP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(300, 128)
            self.column = ds.LinearLayer(torch.nn.Linear(128, 96), mp_group=None)
            self.row = ds.LinearAllreduce(torch.nn.Linear(128, 128), None)
            self.whole = torch.nn.Linear(128, 64)
            self.narrow = torch.nn.Linear(16, 8)  # < MIN_IN_FEATURES: float, as single-instance
            head = torch.nn.Linear(256, 300, bias=False)
            self.head_weight = head.weight.detach().clone()
            self.lm_head = ds.LmHeadLinearAllreduce(head, None)
            # As rank `lm_head_rank` of 2 would hold it: its half of the input channels.
            self.lm_head.weight.data = self.head_weight[:, 128 * lm_head_rank:][:, :128].clone()
            self.lm_head._partition_sizes = (128, 128)
            self.lm_head.tp_index = lm_head_rank

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.lm_head

    return ToyTP()


def test_quantize_autotp_swaps_deepspeed_layers_for_quantized_ones():
    import torch

    from llmbench.quant import autotp
    from llmbench.quant.rtn import quantize_weight
    from llmbench.quant.scheme import Scheme

    model = toy_tp_model()
    scheme = Scheme("woq", "INT4", 32, False)
    head_scheme = Scheme("woq", "INT8", -1, True)  # 4-bit: the lm_head INT8 per channel
    x = torch.randn(1, 3, 128)
    column = quantize_weight(model.column.weight, model.column.bias, scheme)
    row = quantize_weight(model.row.weight, None, scheme)
    row_bias = model.row.bias.detach().clone()
    whole = quantize_weight(model.whole.weight, model.whole.bias, scheme)
    head = quantize_weight(model.head_weight[:, 128:], None, head_scheme)
    narrow = model.narrow.weight.detach().clone()
    result = autotp.quantize_autotp(model, scheme)
    assert result.splits == {"column": "column", "row": "row", "whole": "whole",
                             "lm_head": "lm_head"}
    assert result.left_float == {"narrow": "16 input features < 32"}
    assert model.narrow.weight is not None and torch.equal(model.narrow.weight, narrow)
    torch.testing.assert_close(model.column(x), column(x), rtol=0, atol=0)
    torch.testing.assert_close(model.row(x), row(x) + row_bias, rtol=0, atol=0)  # bias after
    torch.testing.assert_close(model.whole(x), whole(x), rtol=0, atol=0)
    wide = torch.randn(1, 3, 256)  # lm_head gets the whole hidden state, cuts its half
    torch.testing.assert_close(model.lm_head(wide), head(wide[..., 128:].contiguous()), rtol=0,
                               atol=0)
    details = result.details()
    assert details["formats"] == ["int4", "int8"]
    assert details["row_parallel_slice_widths"] == {"row": [128], "lm_head": [128, 128]}
    assert "1 row-parallel projection(s)" in details["row_parallel_scales"]  # the lm_head's
    floats = sum(p.numel() * 4 for p in model.parameters())
    assert autotp.weight_bytes(model) == floats + result.nbytes
    assert result.nbytes == sum(q.nbytes for q in (column, row, whole, head))
    assert autotp.decode_weight_bytes(model) == autotp.weight_bytes(model) - 300 * 128 * 4


def test_quantize_autotp_refuses_other_deepspeed_layers():
    import torch
    from deepspeed.module_inject import layers as ds

    from llmbench.errors import UserError
    from llmbench.quant import autotp
    from llmbench.quant.scheme import Scheme

    model = toy_tp_model()
    model.row = ds.LinearAllreduceWithReplicatedInput(torch.nn.Linear(128, 128), None)
    with pytest.raises(UserError, match="row is DeepSpeed's LinearAllreduceWithReplicatedInput, "
                                        "which llmbench can't quantize per rank"):
        autotp.quantize_autotp(model, Scheme("woq", "INT8", -1, True))
    assert isinstance(model.column, ds.LinearLayer)  # refused before anything was swapped


def test_row_slices_that_split_a_group_are_refused():
    """SmolLM2 on 2 ranks: o_proj's 576 input channels split 384/192 (by its 3 kv heads),
    lm_head's 320/256 (64-channel grains); groups of 128 would not be the whole model's."""
    from llmbench.errors import UserError
    from llmbench.quant.autotp import Projection, check_row_groups
    from llmbench.quant.scheme import Scheme

    projections = [
        Projection("model.layers.0.self_attn.o_proj", object(), "row", 576, (384, 192), 0),
        Projection("model.layers.0.mlp.down_proj", object(), "row", 1536, (768, 768), 0),
        Projection("lm_head", object(), "lm_head", 576, (320, 256), 0)]
    with pytest.raises(UserError) as refused:
        check_row_groups(projections, Scheme("woq", "INT4", 128, False), output=None)
    assert str(refused.value) == (
        "--group-size 128: the row-parallel slices of model.layers.0.self_attn.o_proj are "
        "384/192 input channels wide, and 192 is not a multiple of 128, so a rank's groups would "
        "not be the whole model's; use --group-size 64")
    check_row_groups(projections, Scheme("woq", "INT4", 64, False), output=None)
    # The lm_head of a 4-bit scheme is INT8 per channel: any slice width is fine for it.
    check_row_groups(projections[2:], Scheme("woq", "INT4", 128, False),
                     output=projections[2].module)
