"""--backend native: same tokens as stock, every decoding mode, and loud about what it can't do."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import CORES, run_entry, run_in_process
from test_benchmark_cli import assert_one_line_error, only_report
from tiny_models import make_tiny_model

from llmbench.backends import prepare
from llmbench.generation import main as generation_main
from llmbench.models import load_model
from llmbench.prompts import build_prompt

NEW_TOKENS = 16
# prompt.json's three texts: llama reads the story, gpt_neox the essay, codegen the code.
PROMPT_TEXT_OF = ("llama", "gpt_neox", "codegen")


def prompts_for(loaded):
    return [build_prompt(loaded.tokenizer, loaded.config, family, input_tokens=32,
                         prompt_text=None, batch_size=1, max_new_tokens=NEW_TOKENS)
            for family in PROMPT_TEXT_OF]


def generate(model, prompt, **settings):
    with torch.inference_mode():
        out = model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             pad_token_id=2, **settings)
    return out[:, prompt.tokens:].tolist()


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def stock_and_native(request, embedded_model_dir):
    dtype = request.param
    stock = load_model(None, dtype)
    native = prepare(load_model(None, dtype).model, backend="native", dtype=dtype, family="llama")
    assert native.backend == "native"
    return dtype, stock, native.model


@pytest.fixture
def every_core():
    """The machine's cores as torch threads, so that the compiled step's thread-parallel paths
    run (an xdist worker has one thread: tests/conftest.py); with the `quiet` marker, no other
    test's threads compete for the cores meanwhile."""
    old = torch.get_num_threads()
    torch.set_num_threads(CORES)
    yield
    torch.set_num_threads(old)


@pytest.mark.quiet
def test_greedy_and_beam_tokens_match_stock(stock_and_native, every_core):
    """fp32: identical. bf16: stock computes in bf16, native in fp32 from bf16 weights, and the
    issue asks for the same first 16 tokens on each test prompt. Every core's threads."""
    dtype, stock, native = stock_and_native
    for prompt in prompts_for(stock):
        greedy = dict(do_sample=False, num_beams=1)
        assert generate(native, prompt, **greedy) == generate(stock.model, prompt, **greedy)
        if dtype == "float32":
            beam = dict(do_sample=False, num_beams=4)
            assert generate(native, prompt, **beam) == generate(stock.model, prompt, **beam)


def test_generate_reuses_its_caches_without_stale_entries(stock_and_native):
    """Calls of one shape share generate()'s caches (a static cache): the second and third
    prompt decode over entries the previous prompt wrote, greedy and with beams, and still give
    stock's tokens."""
    dtype, stock, native = stock_and_native
    modes = [dict(do_sample=False, num_beams=1)]
    if dtype == "float32":
        modes.append(dict(do_sample=False, num_beams=4))
    for settings in modes:
        pools = []
        for prompt in prompts_for(stock):
            assert generate(native, prompt, **settings) == generate(stock.model, prompt,
                                                                    **settings)
            pools.append(native._cache_pool[1])
        assert pools[0] is pools[1] is pools[2]


def test_native_weights_live_in_one_arena_in_step_order(stock_and_native):
    """The model the token tests above ran reads every projection and the embedding from one
    arena (llmbench.memory), layer by layer in the order a decode step reads them, the tied
    embedding and lm_head sharing one copy."""
    _, _, native = stock_and_native
    arena = native.placement["arena"]
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    pointers = [t.data_ptr() for layer in native.layers
                for t in (layer.qkv.weight, layer.o.weight, layer.gate_up.weight,
                          layer.down.weight)]
    assert all(start <= p < end for p in pointers + [native.embed.data_ptr()])
    assert pointers == sorted(pointers) and all(p % 64 == 0 for p in pointers)
    assert native.tied and native.lm_head.weight.data_ptr() == native.embed.data_ptr()
    assert native.placement["arena_bytes"] == arena.numel() >= native.weight_bytes


def test_sampling_with_top_k_1_is_greedy(stock_and_native):
    _, stock, native = stock_and_native
    prompt = prompts_for(stock)[0]
    torch.manual_seed(0)
    sampled = generate(native, prompt, do_sample=True, num_beams=1, top_k=1)
    assert sampled == generate(native, prompt, do_sample=False, num_beams=1)


def test_fp8_kv_cache(embedded_model_dir, tmp_path):
    assert generation_main(["--backend", "native", "--kv-cache-dtype", "fp8_e5m2", "--greedy",
                            "--token-latency", "--max-new-tokens", "8", "--num-iter", "1",
                            "--num-warmup", "0", "--output-dir", str(tmp_path)]) == 0
    report = only_report(tmp_path)
    assert report["backend"]["name"] == "native"
    assert report["backend"]["kv_cache_dtype"] == "float8_e5m2"
    assert report["statistics"]["new_tokens_per_sequence"] == 8


def test_run_py_native_same_text_as_stock_and_reports_kernels(embedded_model_dir, tmp_path):
    texts = {}
    for backend in ("stock", "native"):
        out = tmp_path / backend
        result = run_in_process("run.py", "--benchmark", "--backend", backend, "--greedy",
                                "--token-latency", "--max-new-tokens", "12", "--batch-size", "2",
                                "--num-iter", "1", "--num-warmup", "1", "--output-dir", str(out))
        assert result.returncode == 0, result.stderr
        report = only_report(out)
        assert report["backend"]["name"] == backend
        texts[backend] = report["generated_text"]
    assert texts["native"] == texts["stock"]
    assert report["backend"]["kernels"] in ("avx512vnni", "avx512", "avx2", "generic",
                                            "torch-fallback")
    assert report["backend"]["weight_bytes_per_token"] > 0
    placement = report["backend"]["weight_placement"]  # what the kernel really gave
    assert placement["arena_bytes"] >= report["backend"]["weight_bytes_per_token"]
    assert 0 <= placement["huge_page_bytes"] <= placement["arena_bytes"]
    assert placement["thp_mode"] in ("always", "madvise", "never")


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "phi3", "gemma"])
def test_other_llama_like_families_match_stock(family, embedded_model_dir, tmp_path):
    folder = make_tiny_model(family, tmp_path / family, embedded_model_dir)
    stock = load_model(str(folder), "float32")
    native = prepare(load_model(str(folder), "float32").model, backend="native",
                     dtype="float32", family=family).model
    prompt = build_prompt(stock.tokenizer, stock.config, family, input_tokens=12,
                          prompt_text=None, batch_size=2, max_new_tokens=NEW_TOKENS)
    for settings in (dict(do_sample=False, num_beams=1), dict(do_sample=False, num_beams=3)):
        assert generate(native, prompt, **settings) == generate(stock.model, prompt, **settings)


def test_uncovered_family_runs_stock_and_says_so(embedded_model_dir, tmp_path):
    # Falcon's ALiBi variant: a setting the native block description does not implement.
    folder = make_tiny_model("falcon", tmp_path / "falcon-alibi", embedded_model_dir, alibi=True)
    out = tmp_path / "out"
    assert generation_main(["-m", str(folder), "--backend", "native", "--greedy",
                            "--max-new-tokens", "2", "--num-iter", "1", "--num-warmup", "0",
                            "--output-dir", str(out)]) == 0
    report = json.loads(next(out.glob("*.json")).read_text())
    assert report["backend"]["name"] == "stock"
    assert report["backend"]["requested"] == "native"
    assert any("this run is STOCK" in note for note in report["notes"])


@pytest.mark.parametrize("args,needle", [
    (["--backend", "native", "--generation-config", "repetition_penalty=1.2"],
     "not implemented: repetition_penalty"),
    (["--backend", "native", "--dtype", "float16"], "runs float32 and bfloat16 weights"),
    (["--kv-cache-dtype", "fp8_e5m2"], "needs --backend native"),
    (["--ipex", "--backend", "native"], "--ipex contradicts --backend native"),
])
def test_native_refuses_what_it_does_not_do(args, needle, embedded_model_dir, tmp_path):
    result = run_entry("single_instance/run_generation.py", *args, "--max-new-tokens", "2",
                       "--num-iter", "1", "--num-warmup", "0", "--output-dir", str(tmp_path))
    assert_one_line_error(result, needle)


def test_kernels_forced_onto_avx2_prefill_bf16_as_an_avx2_cpu(tmp_path):
    """LLMBENCH_KERNELS_ISA=avx2 on a CPU with bf16 math stands for a CPU without it: the bf16
    prefill widens the weights for the fp32 kernels (the compiled prefill an AVX2 CPU runs),
    and the report says the kernels were forced."""
    from llmbench import kernels
    from llmbench.environment import has_native_bf16

    if not has_native_bf16() or "avx2" not in kernels.supported_isas():
        pytest.skip("needs a CPU with bf16 math and the avx2 kernels")
    result = run_entry("run.py", "--benchmark", "--dtype", "bfloat16", "--backend", "native",
                       "--greedy", "--input-tokens", "32", "--max-new-tokens", "2",
                       "--num-iter", "1", "--num-warmup", "0", "--output-dir", str(tmp_path),
                       env={"LLMBENCH_KERNELS_ISA": "avx2"})
    assert result.returncode == 0, result.stderr[-3000:]
    backend = only_report(tmp_path)["backend"]
    assert backend["kernels"] == "avx2"
    assert backend["prefill_matmul"] == ("fp32 GEMM on weights widened from bf16 (kernels forced "
                                         "onto avx2)")


def test_kernels_forced_onto_avx2_run_int8_prefills_as_a_cpu_without_amx():
    """LLMBENCH_KERNELS_ISA=avx2 on a CPU with AMX-INT8: dynamic int8 activations past the
    kernels' rows go to the fp32 GEMM on the integer values (what a CPU without AMX-INT8 runs),
    not to this CPU's AMX torch._int_mm, and the report's compute line says the kernels were
    forced."""
    import subprocess

    from llmbench import kernels
    from llmbench.environment import has_int8_matmul

    if not has_int8_matmul() or "avx2" not in kernels.supported_isas():
        pytest.skip("needs a CPU with AMX-INT8 and the avx2 kernels")
    probe = ("from llmbench.kernels import int8_act; "
             "print(int8_act.INT8_GEMM, int8_act.gemm_rows()); print(int8_act.describe())")
    for forced, gemm in (("avx2", "False"), ("", "True")):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                env={**os.environ, "LLMBENCH_KERNELS_ISA": forced}, check=True)
        flag, describe = result.stdout.splitlines()
        assert flag.split()[0] == gemm, (forced, result.stdout)
        assert ("(kernels forced onto avx2)" in describe) == (forced == "avx2"), describe


@pytest.mark.parametrize("bf16_gemm", [True, False])
def test_bf16_prefill_either_way_matches_stock_bf16(bf16_gemm, embedded_model_dir, monkeypatch):
    """Both bf16 prefill paths (bf16 GEMM where the CPU has bf16 math, fp32 on widened weights
    elsewhere) give stock bf16's greedy tokens, whichever this machine picks by default."""
    import llmbench.backends.native as native_backend

    monkeypatch.setattr(native_backend, "BF16_PREFILL_GEMM", bf16_gemm)
    stock = load_model(None, "bfloat16")
    prepared = prepare(load_model(None, "bfloat16").model, backend="native", dtype="bfloat16",
                       family="llama")
    assert prepared.details["prefill_matmul"].startswith("bf16 GEMM" if bf16_gemm else "fp32")
    linear = prepared.model.layers[0].qkv
    x = torch.randn(40, linear.weight.shape[1])
    expected = (torch.nn.functional.linear(x.bfloat16(), linear.weight).float() if bf16_gemm
                else torch.nn.functional.linear(x, linear.weight.float()))
    # (the AMX-BF16 tiles, where they run, sum in another order than torch's bf16 GEMM: a sum
    # on a bf16 rounding boundary may round to the neighbouring bf16 value)
    tolerance = dict(rtol=2 ** -7, atol=1e-6) if bf16_gemm else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x), expected, **tolerance)
    greedy = dict(do_sample=False, num_beams=1)
    for prompt in prompts_for(stock):
        assert generate(prepared.model, prompt, **greedy) == generate(stock.model, prompt,
                                                                      **greedy)
