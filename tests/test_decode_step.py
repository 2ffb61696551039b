"""The compiled decode step (llmbench/kernels/csrc/decode_step.cpp) against the native
backend's torch-op step, which stays the reference: same logits within float tolerance and the
same tokens, for every weight format, cache dtype, beam search and the llama-like variants
(qkv bias, per-head q/k norms, fused phi3 projections, gemma's scaled embedding, (1 + w)
norms and tanh-GELU)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_model

from llmbench import kernels
from llmbench.backends import prepare
from llmbench.backends.native import BeamHistory, KVCache
from llmbench.models import load_model
from llmbench.quant.apply import install_native, quantize_rtn
from llmbench.quant.scheme import Scheme

pytestmark = pytest.mark.skipif(
    kernels.compiled() is None or not hasattr(kernels.compiled(), "DecodePlan"),
    reason="compiled kernels not built")


def native_model(folder, dtype="float32", kv="auto"):
    loaded = load_model(str(folder), dtype)
    return prepare(loaded.model, backend="native", dtype=dtype,
                   family=loaded.family.model_type, kv_cache_dtype=kv).model


def step_logits(model, compiled: bool, rows: int = 2, beams: int = 1, steps: int = 5,
                prompt: int = 7):
    """Logits of `steps` decode steps after a `prompt`-token prompt, with either step."""
    torch.manual_seed(1)
    batch = rows // beams
    ids = torch.randint(0, 200, (batch, prompt))
    cos, sin = model._rope_tables(prompt + steps + 1)
    caches = [KVCache(batch, beams, model.kv_heads, model.head_dim, prompt, steps + 1,
                      model.kv_dtype) for _ in model.layers]
    history = BeamHistory(rows, steps + 1, indirect=beams > 1, prompt_len=prompt)
    out = []
    with torch.inference_mode():
        model.prefill(ids, caches, cos, sin)
        model._bound = False
        if compiled:
            plan = model._compiled_plan()
            assert plan is not None, model._plan_note
            plan.bind([c.prompt_k for c in caches], [c.prompt_v for c in caches],
                      [c.gen_k for c in caches], [c.gen_v for c in caches], cos, sin,
                      history.table if history.indirect else None, beams)
            model._bound = True
        try:
            for step in range(steps):
                tokens = torch.randint(0, 200, (rows,))
                out.append(model.decode(tokens, caches, history, beams, cos, sin))
                if beams > 1 and step:  # shuffle the beams so the table is not the identity
                    parents = torch.arange(rows).view(batch, beams).flip(1).reshape(-1)
                    history.reorder(parents)
        finally:
            model._bound = False
    return torch.stack(out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, embedded_model_dir):
    root = tmp_path_factory.mktemp("decode_step")
    return {family: make_tiny_model(family, root / family, embedded_model_dir)
            for family in ("llama", "qwen2", "qwen3", "phi3", "gemma")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma"])
@pytest.mark.parametrize("beams", [1, 3])
def test_compiled_step_matches_torch_step(folders, family, beams):
    model = native_model(folders[family])
    rows = 2 * beams
    expected = step_logits(model, compiled=False, rows=rows, beams=beams)
    got = step_logits(model, compiled=True, rows=rows, beams=beams)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head_dim,prompt", [(24, 7), (80, 150)])
@pytest.mark.parametrize("beams", [1, 3])
def test_compiled_attention_on_every_isa(tmp_path, embedded_model_dir, head_dim, prompt, beams):
    """Each ISA path's decode attention kernels (vector bodies and d tails, the prompt's run of
    positions and the generated ones', one at a time through a beam table) against the
    torch-op step; from 128 positions on 2 threads, in chunks of positions merged after."""
    folder = make_tiny_model("llama", tmp_path / "llama", embedded_model_dir, head_dim=head_dim)
    model = native_model(folder)
    rows = 2 * beams
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = step_logits(model, compiled=False, rows=rows, beams=beams, prompt=prompt)
        got = {}
        for isa in kernels.supported_isas():
            kernels.set_isa(isa)
            try:
                got[isa] = step_logits(model, compiled=True, rows=rows, beams=beams,
                                       prompt=prompt)
            finally:
                kernels.set_isa("auto")
    finally:
        torch.set_num_threads(threads)
    for isa, logits in got.items():
        assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4), isa


@pytest.mark.parametrize("family,dtype,kv", [("llama", "bfloat16", "auto"),
                                             ("gemma", "bfloat16", "auto"),
                                             ("llama", "float32", "fp8_e5m2")])
def test_compiled_step_bf16_weights_and_fp8_cache(folders, family, dtype, kv):
    model = native_model(folders[family], dtype, kv)
    expected = step_logits(model, compiled=False, beams=2, rows=4)
    got = step_logits(model, compiled=True, beams=2, rows=4)
    # bf16 logits are rounded to bf16 on both paths: a last-bit difference before rounding
    # moves a value one bf16 step.
    tol = 1e-2 if dtype == "bfloat16" else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,rows,beams", [("float32", 136, 1), ("bfloat16", 40, 1),
                                              ("float32", 132, 2)])
def test_compiled_step_gemm_rows(folders, dtype, rows, beams):
    """Rows beyond the kernels' row limit: the compiled step hands fp32 / bf16 projections to
    torch's GEMM there, as the torch-op step's linears do (generate() binds it for up to
    kernels.SMALL_M_MAX rows; 132 fp32 / 40 bf16 rows reach the GEMM on every ISA path)."""
    model = native_model(folders["llama"], dtype)
    assert rows > kernels.STREAM_M_MAX["f32" if dtype == "float32" else "bf16"]
    expected = step_logits(model, compiled=False, rows=rows, beams=beams)
    got = step_logits(model, compiled=True, rows=rows, beams=beams)
    tol = 1e-2 if dtype == "bfloat16" else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("weight_dtype,group,sym", [("INT8", -1, True), ("INT8", -1, False),
                                                   ("INT4", 32, False), ("INT4", 128, False)])
def test_compiled_step_quantized_projections(folders, weight_dtype, group, sym):
    """INT4 group 128 pads K (64 in the tiny model) up to a whole group: the step pads too.
    Asymmetric INT8 (the CLI's default) applies its zero points after the kernel."""
    loaded = load_model(str(folders["llama"]), "float32")
    qlinears = quantize_rtn(loaded.model, Scheme("woq", weight_dtype, group, sym, "AUTO"))
    assert_compiled_step_matches(loaded, qlinears)


@pytest.mark.parametrize("sym", [True, False])
def test_compiled_step_batched_int8_activations(folders, sym):
    """--lowp-mode INT8 at more rows than int8_act.gemm_rows(): both steps quantize each row
    to int8 and sum in int32 (torch's int8 GEMM where the CPU has AMX-INT8)."""
    from llmbench.kernels import int8_act

    loaded = load_model(str(folders["llama"]), "float32")
    qlinears = quantize_rtn(loaded.model, Scheme("woq", "INT8", -1, sym, "INT8"))
    assert_compiled_step_matches(loaded, qlinears, rows=int8_act.gemm_rows() + 12)


def assert_compiled_step_matches(loaded, qlinears, rows: int = 2) -> None:
    """These projections in the loaded llama, on native: both steps give the same logits."""
    model = prepare(loaded.model, backend="native", dtype="float32", family="llama").model
    assert install_native(model, qlinears) > 0
    assert model._compiled_plan() is not None, model.runtime_details()
    expected = step_logits(model, compiled=False, rows=rows)
    got = step_logits(model, compiled=True, rows=rows)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def prefill_outputs(model, compiled: bool, batch: int = 2, beams: int = 1, prompt: int = 9):
    """The prompt's logits and every layer's prompt keys and values, with the compiled step
    bound as generate() binds it, through the C++ prefill (compiled) or the Python layers."""
    torch.manual_seed(2)
    ids = torch.randint(0, 200, (batch, prompt))
    cos, sin = model._rope_tables(prompt + 2)
    caches = model.new_caches(batch, beams, prompt, 2)
    history = BeamHistory(batch * beams, 2, indirect=beams > 1, prompt_len=prompt)
    model.use_compiled_prefill = compiled
    try:
        assert model.bind_compiled_step(caches, history, beams, cos, sin)
        assert model.compiled_prefill() == compiled
        with torch.inference_mode():
            logits = model.prefill(ids, caches, cos, sin)
    finally:
        model._bound = False
        model.use_compiled_prefill = True
    keys = torch.stack([c.prompt_k.float() for c in caches])
    values = torch.stack([c.prompt_v.float() for c in caches])
    return logits, keys, values


def assert_prefills_match(model, **kwargs) -> None:
    expected = prefill_outputs(model, compiled=False, **kwargs)
    got = prefill_outputs(model, compiled=True, **kwargs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def other_folders(tmp_path_factory, embedded_model_dir):
    root = tmp_path_factory.mktemp("prefill")
    return {family: make_tiny_model(family, root / family, embedded_model_dir)
            for family in ("gpt_neox", "opt", "mixtral", "bloom")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma", "gpt_neox",
                                    "opt", "mixtral"])
def test_compiled_prefill_matches_python_prefill(folders, other_folders, family):
    """DecodePlan.prefill (generate()'s prompt when the compiled step is bound) against the
    Python layers: the same logits and prompt caches. The families cover qkv bias, per-head
    q/k norms, fused projections, a scaled embedding and tanh-GELU, partial RoPE with a
    parallel residual (gpt_neox), learned positions and LayerNorm (opt), and experts."""
    model = native_model({**folders, **other_folders}[family])
    assert_prefills_match(model)


@pytest.mark.parametrize("kv,beams", [("fp8_e5m2", 1), ("auto", 3)])
def test_compiled_prefill_fp8_cache_and_beams(folders, kv, beams):
    assert_prefills_match(native_model(folders["llama"], kv=kv), beams=beams)


@pytest.mark.parametrize("weight_dtype,group", [("INT8", -1), ("INT4", 32)])
def test_compiled_prefill_quantized_projections(folders, weight_dtype, group):
    loaded = load_model(str(folders["llama"]), "float32")
    model = prepare(loaded.model, backend="native", dtype="float32", family="llama").model
    assert install_native(model, quantize_rtn(loaded.model,
                                              Scheme("woq", weight_dtype, group, True, "INT8"))) > 0
    assert_prefills_match(model, prompt=20)
    # longer prompts stay on the Python layers, which dequantize to torch's GEMM past the
    # quantized kernels' row limit (INT4 models keep an int8 lm_head: the int8 limit then)
    limit = model._prefill_rows
    assert limit in (kernels.STREAM_M_MAX["int8"], kernels.STREAM_M_MAX["int4"])
    assert model.compiled_prefill(limit) and not model.compiled_prefill(limit + 1)


def test_position_bias_prefills_in_python(other_folders):
    """ALiBi (bloom) is not in the C++ prefill: its prompts stay on the Python layers."""
    model = native_model(other_folders["bloom"])
    assert model._compiled_plan() is not None and not model.compiled_prefill()


@pytest.mark.parametrize("act_scale", [1e-4, 1.0])
def test_compiled_step_smoothquant_projections(folders, act_scale):
    """SmoothQuant's projections in the compiled step: int8 activations at a static scale (a
    row beyond its range runs with int16 activations: every row at 1e-4, none at 1.0), and
    float fallback projections, as StaticInt8Linear and FloatLinear compute them."""
    from llmbench.quant.linears import FloatLinear, StaticInt8Linear

    loaded = load_model(str(folders["llama"]), "float32")
    qlinears = quantize_rtn(loaded.model, Scheme("woq", "INT8", -1, True, "AUTO"))
    modules = dict(loaded.model.named_modules())
    swapped = {}
    for name, q in qlinears.items():
        if name.endswith("down_proj"):  # a fallback unit
            module = modules[name]
            swapped[name] = FloatLinear(module.weight.detach(), module.bias)
        else:
            swapped[name] = StaticInt8Linear(q.qweight, q.scales, torch.tensor([act_scale]),
                                             q.bias)
    assert_compiled_step_matches(loaded, swapped)


def test_report_names_the_decode_step(folders, tmp_path):
    from llmbench.generation import main

    assert main(["-m", str(folders["llama"]), "--backend", "native", "--greedy",
                 "--max-new-tokens", "3", "--num-iter", "1", "--num-warmup", "0",
                 "--output-dir", str(tmp_path)]) == 0
    import json

    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["backend"]["decode_step"].startswith("compiled C++ step")
    assert report["backend"]["prefill"].startswith("compiled C++ prefill")
