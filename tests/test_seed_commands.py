"""Every command line of the Xeon LLM example READMEs (tests/seed_commands.txt, both versions),
tried as a new user would, with the model swapped for a local one and short settings appended.

How each line is checked (the table printed at the end says which, line by line; run with
`pytest -s tests/test_seed_commands.py` to see it):
- `run`: the command runs in this process through the script's own main() (run.py's steps too:
  its subprocess launcher is replaced by an in-process call, so the flags each step gets are
  the ones run.py builds) and must exit 0 with its summary lines. Lines that are the same
  command once parsed (the READMEs' "general command" and "example" pairs) run once.
- `launched`: two representative `deepspeed` lines run under the real launcher (2 ranks), each
  in a test of its own (test_readme_deepspeed_line_launched): a GPTQ INT4 folder under AutoTP
  with --lowp-mode BF16, and distributed accuracy with weight-only INT8 (AutoTP weight-only
  INT8 with --shard-model is launched in tests/test_distributed.py).
- `parsed`: every other `deepspeed` line is checked the way its ranks start: run.py's own
  planning (which refuses what can't run, before any launch) and the rank script's checks
  (llmbench.cli.rank_settings,
  llmbench.accuracy.tensor_parallel.check_rank_args) on its flags.
- `needs IPEX`: lines with --ipex where Intel Extension for PyTorch does not import here must
  exit 2 with one `error:` line saying so (one such line also runs as a real process).
- Multimodal lines (--input-mode / --image-url / --audio) run like the others with -m a tiny
  random model of their family (tests/tiny_multimodal.py) and the project's sample image and
  audio for australia.jpg / Trailer.wav; `--input-tokens` is not appended (a multimodal prompt
  is --prompt). Phi-4-multimodal lines are `not loadable here` (its image processor needs
  torchvision, whose PyPI build does not load with the CPU torch: docs/multimodal.md).

What is substituted, and why: -m/--model becomes a tiny random llama (a tiny GPTQ folder for
the INT4 checkpoint paths, the pre-sharded tiny model for shard paths); --output-dir and the
saved_results paths become one scratch folder (the READMEs' flow: quantize there, then read
best_model.pt from there); `--tasks <lm-eval task>` becomes `--lambada-file` of the shipped
offline passages (the same scoring as lambada_openai; the hub is not reachable in tests);
`OMP_NUM_THREADS=.. numactl ..` prefixes are dropped (they bind the READMEs' 56-core machine);
`run_<MODEL_ID>_quantization.py` is single_instance/run_quantization.py. Appended: --num-iter 1
--num-warmup 0 --max-new-tokens 2 --input-tokens 8 (benchmarks), --limit 2 (accuracy),
--calib-iters 2 --calib-len 32 (SmoothQuant/GPTQ calibration), --nsamples 2 --seqlen 32
--skip-rtn (utils/run_gptq.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, call, run_entry, run_step_here
from tiny_models import make_tiny_model

SEEDS = ROOT / "tests" / "seed_commands.txt"
LAMBADA = str(ROOT / "llmbench" / "data" / "lambada_local.jsonl")
SHORT_BENCH = ["--num-iter", "1", "--num-warmup", "0", "--max-new-tokens", "2",
               "--input-tokens", "8"]
IPEX_ABSENT = "Intel Extension for PyTorch does not import here"
MULTIMODAL = ("--input-mode", "--image-url", "--audio")
SAMPLE_IMAGE = str(ROOT / "llmbench" / "data" / "sample_image.png")
SAMPLE_AUDIO = str(ROOT / "llmbench" / "data" / "sample_audio.wav")
PHI4 = "Phi-4-multimodal"
SCRIPTS = {
    "run.py": "run.py",
    "run_accuracy.py": "single_instance/run_accuracy.py",
    "run_accuracy_with_deepspeed.py": "distributed/run_accuracy_with_deepspeed.py",
    "run_generation_with_deepspeed.py": "distributed/run_generation_with_deepspeed.py",
    "create_shard_model.py": "utils/create_shard_model.py",
    "run_gptq.py": "utils/run_gptq.py",
    "run_quantization.py": "single_instance/run_quantization.py",
}
# What a successful run prints, per script.
SUMMARY = {
    "run.py": ("Inference latency:",),
    "distributed/run_generation_with_deepspeed.py": ("Inference latency:",),
    "single_instance/run_quantization.py": ("saved:", "Inference latency:"),
    "single_instance/run_accuracy.py": ("results:",),
    "distributed/run_accuracy_with_deepspeed.py": ("results:",),
    "utils/create_shard_model.py": ("shard:",),
    "utils/run_gptq.py": ("saved:",),
}
LAUNCHED = ("2.1.1.8 WoQ INT4 GPTQ distributed", "2.1.2.2 distributed accuracy WoQ")
# Lines refused on purpose, with the one-line message they must give (none at present).
REFUSED: dict[str, str] = {}


def ipex_imports() -> bool:
    try:
        import intel_extension_for_pytorch  # type: ignore[import-not-found]  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Seed:
    number: int
    readme: str
    section: str
    text: str
    launcher: str = "python"  # or "deepspeed"
    script: str = ""
    argv: list[str] = field(default_factory=list)
    how: str = ""  # run | launched | parsed | needs IPEX | not loadable here
    result: str = "not checked"
    ok: bool = False


def read_seeds() -> list[Seed]:
    seeds = []
    for line in SEEDS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            readme, section, text = (part.strip() for part in line.split("|", 2))
            seeds.append(Seed(len(seeds) + 1, readme, section, text))
    return seeds


# ---- normalisation ---------------------------------------------------------------------------


def model_for(value: str, paths: dict[str, Path]) -> str:
    upper = value.upper()
    if "VISION" in upper:
        return str(paths["mllama"])
    if "GPTQ" in upper or "INT4_CKPT" in upper:
        return str(paths["gptq"])
    if "SHARD" in upper or "LOCAL_LLAMA" in upper:
        return str(paths["shard"])
    return str(paths["tiny"])


def normalise(seed: Seed, paths: dict[str, Path]) -> None:
    """Fill seed.launcher/script/argv from the README text (see the module docstring)."""
    text = re.sub(r"`[^`]*`", "127.0.0.1", seed.text)  # --master_addr `hostname -I | ...`
    text = re.sub(r"\{TASK_NAME\}|<TASK_NAME>", "lambada_openai", text)
    text = text.replace("<int8 or int4>", "int8")
    text = re.sub(r"<path to [^<>]*>", "QCONFIG", text)
    text = re.sub(r"<([^<>]*)>", lambda m: re.sub(r"\W+", "_", m.group(1)), text)
    words = shlex.split(text)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # OMP_NUM_THREADS=56
        words.pop(0)
    if words[0] == "numactl":  # binding for the READMEs' machine
        words = words[words.index("python"):]
    seed.launcher = words[0]
    script_at = next(i for i, w in enumerate(words) if w.endswith(".py"))
    name = re.sub(r"^run_.*_quantization\.py$", "run_quantization.py", Path(words[script_at]).name)
    seed.script = SCRIPTS[name]
    args = words[script_at + 1:]
    out: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        if word in ("-m", "--model", "--model-name-or-path", "--model-id") and value:
            out += ["-m", model_for(value, paths)]
            i += 2
            continue
        if word == "--save-path" and value:
            out += [word, str(paths["work"] / Path(value).name)]
        elif word == "--output-dir" and value:
            out += [word, str(paths["saved"])]
        elif word in ("--quantized-model-path", "--low-precision-checkpoint") and value:
            out += [word, str(paths["saved"] / Path(value).name)]
        elif word == "--qconfig-summary-file" and value:
            out += [word, str(paths["work"] / "qconfig.json")]
        elif word == "--image-url" and value:
            out += [word, SAMPLE_IMAGE]
        elif word == "--audio" and value:
            out += [word, SAMPLE_AUDIO]
        elif word == "--tasks" and value:
            out += ["--lambada-file", LAMBADA]
        elif not word.startswith("-") and seed.script == "utils/create_shard_model.py":
            out.append(model_for(word, paths))  # the positional model of the v2.1 line
            i += 1
            continue
        else:
            out.append(word)
            i += 1
            continue
        i += 2
    seed.argv = out + appended(seed.script, out)


def appended(script: str, argv: list[str]) -> list[str]:
    extra: list[str] = []
    benchmark = (script in ("run.py", "distributed/run_generation_with_deepspeed.py")
                 or "--benchmark" in argv) and "--accuracy-only" not in argv
    if benchmark and script not in ("single_instance/run_accuracy.py",
                                    "distributed/run_accuracy_with_deepspeed.py"):
        multimodal = any(flag in argv for flag in MULTIMODAL)
        extra += SHORT_BENCH[:-2] if multimodal else SHORT_BENCH  # not --input-tokens
    if script.endswith(("run_accuracy.py", "run_accuracy_with_deepspeed.py")):
        extra += ["--limit", "2"]
    if "--ipex-smooth-quant" in argv or "--gptq" in argv:
        extra += ["--calib-iters", "2", "--calib-len", "32"]
    if script == "utils/run_gptq.py":
        extra += ["--nsamples", "2", "--seqlen", "32", "--skip-rtn"]
    return extra


# ---- running ---------------------------------------------------------------------------------


@pytest.fixture
def in_process_steps(monkeypatch):
    """run.py (and run_quantization.py --benchmark) run their steps here, not as subprocesses."""
    from llmbench import steps

    monkeypatch.setattr(steps, "run_step", run_step_here)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def judge(seed: Seed, status: int, out: str, err: str) -> None:
    errors = error_lines(err)
    if seed.how == "needs IPEX":
        seed.ok = status == 2 and len(errors) == 1 and IPEX_ABSENT in errors[0]
        seed.result = f"exit {status}: {errors[0][:90] if errors else err[-200:]}"
        return
    wanted = list(SUMMARY[seed.script])
    if seed.script == "single_instance/run_quantization.py":
        if "--quantized-model-path" in seed.argv:
            wanted.remove("saved:")  # it only benchmarks the saved model
        if "--benchmark" not in seed.argv:
            wanted.remove("Inference latency:")
    missing = [line for line in wanted if line not in out]
    seed.ok = status == 0 and not missing
    seed.result = (f"exit 0, printed {', '.join(wanted)}" if seed.ok else
                   f"exit {status}; missing {missing}; {(errors or [err[-300:]])[0]}")


def priority(seed: Seed) -> int:
    """Order the README flow needs: GPTQ (its step 1 wants an empty saved_results), shards,
    benchmarks (INT8 weight-only last, so saved_results holds INT8 for the accuracy lines),
    then accuracy."""
    if seed.script == "utils/run_gptq.py":
        return 0
    if seed.script == "single_instance/run_quantization.py":
        return 1
    if seed.script == "utils/create_shard_model.py":
        return 2
    if seed.script == "run.py":
        int8 = ("--ipex-weight-only-quantization" in seed.argv and "--gptq" not in seed.argv
                and "INT4" not in seed.argv and "GPTQ" not in " ".join(seed.argv).upper())
        return 4 if int8 else 3
    return 5


def parse_check(seed: Seed) -> tuple[int, str, str]:
    """A deepspeed line checked as its ranks start (see the module docstring)."""
    from llmbench.accuracy import tasks, tensor_parallel
    from llmbench.cli import rank_settings, settings_from
    from llmbench.cli import run as dispatch
    from llmbench.distributed import benchmark
    from llmbench.errors import UserError

    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if seed.script == "run.py":
                parser = dispatch.build_parser()
                steps = dispatch.plan_steps(parser, parser.parse_args(seed.argv))
                rank_step = steps[-1]
                rank_parser = benchmark.build_parser()
                rank_settings(rank_parser, rank_parser.parse_args(rank_step.argv))
                print(f"planned: {', '.join(step.name for step in steps)}")
            elif seed.script == "distributed/run_generation_with_deepspeed.py":
                parser = benchmark.build_parser()
                rank_settings(parser, parser.parse_args(seed.argv))
            else:
                settings = settings_from(tensor_parallel.build_rank_parser().parse_args(seed.argv))
                tensor_parallel.check_rank_args(settings)
                tasks.task_requests(settings.accuracy)
        except UserError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            status = 2
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
    return status, out.getvalue(), err.getvalue()


def launch(seed: Seed) -> tuple[int, str, str]:
    from test_distributed import deepspeed_launcher, free_port

    port = free_port()
    command = [deepspeed_launcher(), "--num_accelerators", "2", "--bind_cores_to_rank",
               "--master_port", str(port), str(ROOT / seed.script), *seed.argv]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"left in /dev/shm: {left}"
    return result.returncode, result.stdout, result.stderr


def table(seeds: list[Seed]) -> str:
    lines = ["| # | README | section | checked | result |", "|--:|---|---|---|---|"]
    for seed in seeds:
        mark = "ok" if seed.ok else "FAIL"
        lines.append(f"| {seed.number} | {seed.readme} | {seed.section} | {seed.how} | "
                     f"{mark}: {seed.result} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def seed_paths(tmp_path_factory, embedded_model_dir):
    work = tmp_path_factory.mktemp("seeds")
    tiny = make_tiny_model("llama", work / "tiny-llama", embedded_model_dir)
    from test_gptq import write_checkpoint_folder

    gptq = work / "Llama-GPTQ"
    write_checkpoint_folder(tiny, gptq, "gptq")
    saved = work / "saved_results"
    from tiny_multimodal import make_tiny_multimodal

    mllama = make_tiny_multimodal("mllama", work / "tiny-mllama", embedded_model_dir)
    return {"work": work, "tiny": tiny, "gptq": gptq, "saved": saved, "mllama": mllama,
            "shard": saved / "llama_local_shard"}


def classified(paths: dict[str, Path], has_ipex: bool) -> list[Seed]:
    """Every seed line, normalised to `paths`, with how it is checked."""
    seeds = read_seeds()
    for seed in seeds:
        if PHI4 in seed.text:
            seed.how, seed.ok = "not loadable here", True
            seed.result = "Phi-4-multimodal's processor needs torchvision (docs/multimodal.md)"
            continue
        normalise(seed, paths)
        ipex = "--ipex" in seed.argv or "--backend ipex" in " ".join(seed.argv)
        if ipex and not has_ipex:
            seed.how = "needs IPEX"
        elif seed.launcher == "deepspeed":
            seed.how = "launched" if seed.section in LAUNCHED else "parsed"
        else:
            seed.how = "run"
    return seeds


@pytest.mark.parametrize("section", LAUNCHED)
def test_readme_deepspeed_line_launched(seed_paths, section, tmp_path):
    """The `launched` lines, each under the real launcher (2 ranks), in a test of its own so
    that they run beside the in-process lines, with their own saved_results (the GPTQ line of
    the in-process flow wants its saved_results empty) and shard."""
    paths = {**seed_paths, "work": tmp_path, "saved": tmp_path / "saved_results",
             "shard": tmp_path / "saved_results" / "llama_local_shard"}
    (seed,) = [s for s in classified(paths, ipex_imports()) if s.section == section]
    if seed.how != "launched":
        pytest.skip(f"{section}: {seed.how} here")
    if "-m" in seed.argv and seed.argv[seed.argv.index("-m") + 1] == str(paths["shard"]):
        status, _, err = call("utils/create_shard_model.py", ["-m", str(seed_paths["tiny"]),
                                                               "--save-path", str(paths["shard"])])
        assert status == 0, err
    status, out, err = launch(seed)
    judge(seed, status, out, err)
    assert seed.ok, seed.result


def test_every_readme_command_line(seed_paths, in_process_steps, capsys, monkeypatch):
    monkeypatch.chdir(seed_paths["work"])  # relative defaults (./saved_results) land there
    has_ipex = ipex_imports()
    seeds = classified(seed_paths, has_ipex)
    assert len(seeds) == 118  # 117 lines; the [INT8|BF16] one is listed once per choice

    done: dict[tuple[Any, ...], Seed] = {}
    for seed in sorted(seeds, key=priority):
        if seed.how in ("not loadable here",):
            continue
        if seed.how in ("launched",):
            continue
        if priority(seed) == 5 and not seed_paths["shard"].exists():
            status, _, err = call("utils/create_shard_model.py",
                                  ["-m", str(seed_paths["tiny"]), "--save-path",
                                   str(seed_paths["shard"])])
            assert status == 0, err  # what the READMEs' --shard-model step leaves there
        key = (seed.how, seed.launcher, seed.script, tuple(seed.argv))
        if key in done:
            first = done[key]
            seed.ok, seed.result = first.ok, f"same command as #{first.number}: {first.result}"
            continue
        done[key] = seed
        if seed.launcher == "deepspeed":
            status, out, err = parse_check(seed)
            if seed.section in REFUSED:
                errors = error_lines(err)
                seed.how = "refused (not built yet)"
                seed.ok = status == 2 and len(errors) == 1 and REFUSED[seed.section] in errors[0]
                seed.result = f"exit {status}: {(errors or [err[-200:]])[0][:110]}"
                continue
            if seed.how == "parsed":  # checked, not run: exit 0 means the ranks would start
                seed.ok = status == 0
                seed.result = ("checks pass: " + out.strip().splitlines()[-1][:60]
                               if seed.ok and out.strip() else
                               f"exit {status}: {(error_lines(err) or [err[-200:]])[0]}")
                continue
        else:
            status, out, err = call(seed.script, seed.argv)
        judge(seed, status, out, err)

    for seed in seeds:
        if seed.how == "launched":
            seed.ok, seed.result = True, "2 ranks: test_readme_deepspeed_line_launched"

    # One IPEX line as a real process: the whole of stderr is the one line.
    if not has_ipex:
        ipex_seed = next(s for s in seeds if s.how == "needs IPEX" and s.script == "run.py")
        result = run_entry(ipex_seed.script, *ipex_seed.argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and IPEX_ABSENT in lines[0], \
            result.stderr

    report = table(seeds)
    with capsys.disabled():
        print("\n" + report)
    failed = [f"#{s.number} {s.section}: {s.result}" for s in seeds if not s.ok]
    assert not failed, "\n".join(failed)
