"""--backend native for every family llmbench.backends.blocks describes.

Each family's tiny random model (tests/tiny_models.py, plus the layouts a family has more than
one of: Falcon-40B's new decoder architecture, NeoX's sequential residual, multi-head
GPTBigCode, parallel StableLM with biases) must give stock's tokens exactly in fp32, greedy and
beam, from both the compiled C++ step and the torch-op step; bf16 must stay close to stock
bf16; weight-only INT8 and INT4 must run native (no fallback) with the same tokens as stock
running the same quantized weights, through the entry points users run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_entry, run_in_process
from tiny_models import make_tiny_model

from llmbench.backends import blocks, prepare
from llmbench.models import load_model
from llmbench.quant import apply
from llmbench.quant.scheme import MIN_IN_FEATURES, Scheme

# name -> (model_type, config overrides)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    **{family: (family, {}) for family in (
        "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gptj", "codegen", "gpt_neox",
        "falcon", "opt", "bloom", "gpt_bigcode", "mpt", "stablelm", "phi", "mixtral")},
    "falcon-40b-layout": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon-mha-sequential": ("falcon", {"multi_query": False, "parallel_attn": False,
                                         "bias": True}),
    "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "gpt_bigcode-mha": ("gpt_bigcode", {"multi_query": False}),
    "stablelm-parallel-bias": ("stablelm", {"use_parallel_residual": True,
                                            "use_qkv_bias": True}),
    # DeepSeek: MLA with and without q's bottleneck, interleaved and rotate-half RoPE, softmax
    # greedy / group-limited and sigmoid group-limited (top-2 group scores) routing.
    # (kv_lora_rank 32: wide enough for kv_b to be quantized, so that its absorbed matrices
    # come from the dequantized weights.)
    "deepseek_v2": ("deepseek_v2", {"kv_lora_rank": 32}),
    "deepseek_v2-group-limited-no-q-rank": ("deepseek_v2", {
        "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1,
        "q_lora_rank": None, "kv_lora_rank": 32}),
    "deepseek_v3": ("deepseek_v3", {"n_group": 2, "topk_group": 1, "kv_lora_rank": 32}),
    "deepseek_v3-rotate-half": ("deepseek_v3", {"rope_interleave": False, "kv_lora_rank": 32}),
    # jamba: mamba + dense MLP, attention + experts; then a mamba layer with experts.
    "jamba": ("jamba", {}),
    "jamba-mamba-experts": ("jamba", {"num_hidden_layers": 4, "expert_layer_period": 3,
                                      "expert_layer_offset": 2}),
    # T5's decoder (ReLU MLP, tied, scaled logits) and Flan-T5's (gated GELU, untied).
    "t5": ("t5", {}),
    "t5-flan": ("t5", {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}),
}
NEW_TOKENS = 12
PROMPT = torch.tensor([[1, 4500, 301, 22000, 7, 812, 16000, 90, 3000, 41000, 5, 2222]])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("native-families")
    return {name: make_tiny_model(model_type, root / name, embedded_model_dir, **overrides)
            for name, (model_type, overrides) in MODELS.items()}


def generate(model: Any, beams: int = 1) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, num_beams=beams, pad_token_id=2)
    # (an encoder-decoder's output is the decoder's: its start token, then the new ones)
    return out[:, 1 if model.config.is_encoder_decoder else PROMPT.shape[1]:].tolist()


def native_of(folder: Path, dtype: str = "float32") -> Any:
    loaded = load_model(str(folder), dtype)
    prepared = prepare(loaded.model, backend="native", dtype=dtype,
                       family=loaded.family.model_type)
    assert prepared.backend == "native", prepared.details.get("fallback_reason")
    return prepared


def test_every_native_family_is_tested() -> None:
    # Whisper's decoder, Llama-3.2-Vision's text model and GIT's text decoder are the language
    # models of multimodal models: tests/test_multimodal.py runs them native.
    multimodal = {"whisper", "mllama_text_model", "git"}
    assert {model_type for model_type, _ in MODELS.values()} == (set(blocks.NATIVE_FAMILIES)
                                                                 - multimodal)


@pytest.mark.parametrize("name", MODELS)
def test_native_fp32_tokens_are_stocks(tiny: dict[str, Path], name: str) -> None:
    stock = load_model(str(tiny[name]), "float32").model
    native = native_of(tiny[name]).model
    assert native.runtime_details()["decode_step"].startswith("compiled C++ step")
    greedy = generate(stock)
    assert generate(native) == greedy
    assert generate(native, beams=4) == generate(stock, beams=4)
    native.use_compiled_step = False  # the torch-op reference step, same tokens
    assert generate(native) == greedy


@pytest.mark.parametrize("name", ["gptj", "gpt_neox", "falcon-40b-layout", "opt", "bloom",
                                  "gpt_bigcode", "mpt", "phi", "stablelm", "codegen",
                                  "deepseek_v3", "jamba"])
def test_native_bf16_prefill_close_to_stock_bf16(tiny: dict[str, Path], name: str) -> None:
    """Stock computes in bf16, native in fp32 from the same bf16 weights: on random weights
    their greedy paths part at near-ties, so the logits are compared (bf16's step is 2^-8)."""
    stock = load_model(str(tiny[name]), "bfloat16").model
    native = native_of(tiny[name], "bfloat16").model
    with torch.inference_mode():
        expected = stock(input_ids=PROMPT).logits[0, -1].float()
        caches = native.new_caches(1, 1, PROMPT.shape[1], 1)
        cos, sin = native._rope_tables(PROMPT.shape[1] + 1)
        got = native.prefill(PROMPT, caches, cos, sin)[0]
    assert float((got - expected).abs().max()) < 0.03 * float(expected.abs().max())
    assert len(generate(native)[0]) == NEW_TOKENS


@pytest.mark.parametrize("weight_dtype,group", [("INT8", -1), ("INT4", 32)])
@pytest.mark.parametrize("name", [name for name in MODELS  # llama's cousins: test_quantization
                                  if name not in ("mistral", "qwen2", "qwen3", "phi3", "gemma")])
def test_native_quantized_runs_native_with_stocks_tokens(tiny: dict[str, Path], name: str,
                                                         weight_dtype: str, group: int) -> None:
    """The same quantized projections, fused and reordered into the native model (through
    blocks' sources) and swapped into stock's nn.Linear modules, give the same tokens."""
    scheme = Scheme("woq", weight_dtype, group, weight_dtype == "INT4")
    stock_tokens, native = quantized_on_both(tiny[name], scheme)
    layers = native.model.layers
    projections = 1 + sum(len(layer.projections(i)) + (layer.w_uk is not None)  # + MLA's kv_b
                          for i, layer in enumerate(layers))
    # (Mamba's dt_proj is dt_rank wide: too narrow to quantize in the tiny jamba, kept float.)
    projections -= sum(1 for layer in layers
                       if layer.mamba is not None and layer.mamba.dt_rank < MIN_IN_FEATURES)
    assert native.details["quantization"]["native_projections_replaced"] == projections
    assert native.model.runtime_details()["decode_step"].startswith("compiled C++ step")
    assert generate(native.model) == stock_tokens


def quantized_on_both(folder: Path, scheme: Scheme) -> tuple[list[list[int]], Any]:
    """One set of quantized projections, run by stock (swapped modules): its tokens; and put
    into the native model (fused, rows reordered through blocks' sources): the prepared model."""
    qlinears = apply.quantize_rtn(load_model(str(folder), "float32").model, scheme)
    prepared = {}
    for backend in ("stock", "native"):
        prepared[backend] = apply.prepare_quantized(
            load_model(str(folder), "float32"), qlinears, backend=backend, dtype="float32",
            kv_cache_dtype="auto", scheme=scheme)
        assert prepared[backend].backend == backend
    return generate(prepared["stock"].model), prepared["native"]


@pytest.mark.parametrize("weight_dtype,group,lowp", [("INT8", 32, "AUTO"), ("INT4", 32, "BF16")])
@pytest.mark.parametrize("name", ["codegen", "falcon-40b-layout"])
def test_reordered_layouts_keep_every_quantized_format(tiny: dict[str, Path], name: str,
                                                       weight_dtype: str, group: int,
                                                       lowp: str) -> None:
    """INT8 groups and --lowp-mode BF16 (projections without a compiled kernel, so the torch-op
    step runs, and says so) through the row reordering of CodeGen's and Falcon-40B's fused
    QKV: stock's tokens."""
    scheme = Scheme("woq", weight_dtype, group, weight_dtype == "INT4", lowp)
    stock_tokens, native = quantized_on_both(tiny[name], scheme)
    assert "has no compiled kernel" in native.model.runtime_details()["decode_step"]
    assert generate(native.model) == stock_tokens


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_moe_reads_only_the_routed_experts(tiny: dict[str, Path], name: str) -> None:
    """A decode step of a sequence reads top_k of the experts: the bytes per token (and so the
    floor) count those, not all of them (and DeepSeek's shared experts and absorbed kv_b)."""
    native = native_of(tiny[name]).model
    routing = native.block.experts
    assert (routing.count, routing.top_k) == (4, 2)
    every = native.lm_head.nbytes + sum(
        getattr(owner, attr).nbytes for i, layer in enumerate(native.layers)
        for _, owner, attr in layer.projections(i))
    every += sum(layer.router.nbytes for layer in native.layers if layer.router is not None)
    every += sum(layer.w_uk.nbytes + layer.w_uv.nbytes for layer in native.layers
                 if layer.w_uk is not None)
    moe_layers = [layer for layer in native.layers if layer.experts]
    expert = moe_layers[0].experts[0]
    per_expert = expert.gate_up.nbytes + expert.down.nbytes
    unread = len(moe_layers) * (routing.count - routing.top_k) * per_expert
    assert native.weight_bytes == every - unread


def only_report(folder: Path) -> dict[str, Any]:
    reports = [p for p in folder.glob("*.json") if not p.name.startswith("best_model")]
    assert len(reports) == 1, reports
    return json.loads(reports[0].read_text())


@pytest.mark.parametrize("name,extra", [
    ("falcon-40b-layout", []),
    ("codegen", ["--ipex-weight-only-quantization", "--weight-dtype", "INT4",
                 "--group-size", "32"]),
    ("bloom", ["--ipex-weight-only-quantization", "--weight-dtype", "INT8"]),
    ("mixtral", ["--ipex-weight-only-quantization", "--weight-dtype", "INT4",
                 "--group-size", "32"]),
    ("deepseek_v3", ["--ipex-weight-only-quantization", "--weight-dtype", "INT8"]),
    ("jamba", ["--ipex-weight-only-quantization", "--weight-dtype", "INT4", "--group-size",
               "32"]),
    ("t5-flan", ["--ipex-weight-only-quantization", "--weight-dtype", "INT8"]),
])
def test_run_py_benchmark_runs_native(tiny: dict[str, Path], tmp_path: Path, name: str,
                                      extra: list[str]) -> None:
    """run.py --benchmark --backend native (quantizing first when asked): as a user starts it
    for the float model; with quantization, its main and steps in this process (the same
    flags each step gets, without 2-3 s of imports per step)."""
    run = run_in_process if extra else run_entry
    result = run("run.py", "--benchmark", "-m", str(tiny[name]), "--backend", "native",
                 "--greedy", "--token-latency", "--input-tokens", "8", "--max-new-tokens", "4",
                 "--num-iter", "1", "--num-warmup", "0", "--output-dir", str(tmp_path), *extra)
    assert result.returncode == 0, result.stderr
    assert "First token average latency" in result.stdout
    report = only_report(tmp_path)
    backend = report["backend"]
    assert backend["name"] == "native" and "fallback_reason" not in backend
    assert backend["decode_step"].startswith("compiled C++ step")
    if name.startswith("deepseek"):
        assert backend["block"]["latent"]["kv_rank"] == 32
    # Every projection quantized: lm_head + 2 layers x (4; mixtral 2 + 4 experts x 2;
    # deepseek [q_a kv_a], q_b, o, kv_b, then dense gate_up and down or 4 experts x 2 + shared 2).
    # jamba: mamba in_proj, x_proj, out_proj (dt_proj, 8 wide, stays float) + dense MLP 2;
    # attention 2 + 4 experts x 2.
    # t5-flan: 2 layers x (qkv, o, cross q, cross kv, cross o, gate_up, down) + lm_head.
    replaced = {"mixtral": 21, "deepseek_v3": 21, "jamba": 16, "t5-flan": 15}.get(name, 9)
    if extra:
        assert backend["quantization"]["native_projections_replaced"] == replaced


def test_unimplemented_setting_falls_back_loudly(tiny: dict[str, Path], tmp_path: Path,
                                                 embedded_model_dir: Path) -> None:
    """OPT-350M's post-norm blocks are outside the step: stock runs, and the report says why."""
    folder = make_tiny_model("opt", tmp_path / "opt-post-norm", embedded_model_dir,
                             do_layer_norm_before=False)
    loaded = load_model(str(folder), "float32")
    prepared = prepare(loaded.model, backend="native", dtype="float32", family="opt")
    assert prepared.backend == "stock"
    assert "post-norm" in prepared.details["fallback_reason"]
    assert "STOCK" in prepared.details["fallback_reason"]


def test_jamba_mamba_state_carries_through_decode(tiny: dict[str, Path]) -> None:
    """Random init leaves the Mamba mixers' share of the logits small (~0.003): scale their
    output projections up so that their conv windows and SSM states decide the tokens, then
    native (prefill, single steps, beam reorders of the states) must still give stock's."""
    import copy

    stock = load_model(str(tiny["jamba-mamba-experts"]), "float32").model
    with torch.no_grad():
        for layer in stock.model.layers:
            if hasattr(layer, "mamba"):
                layer.mamba.out_proj.weight.mul_(40.0)
                layer.mamba.in_proj.weight.mul_(8.0)
    native = prepare(copy.deepcopy(stock), backend="native", dtype="float32",
                     family="jamba").model
    with torch.inference_mode():
        expected = stock(input_ids=PROMPT).logits[0, -1]
        got = native.prefill(PROMPT, native.new_caches(1, 1, PROMPT.shape[1], 1),
                             *native._rope_tables(PROMPT.shape[1] + 1))[0]
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    greedy, beam = generate(stock), generate(stock, beams=4)
    for compiled in (True, False):  # the compiled step's Mamba layer, then the torch-op one
        native.use_compiled_step = compiled
        assert native.runtime_details()["decode_step"].startswith(
            "compiled C++ step" if compiled else "python step")
        assert generate(native) == greedy
        assert generate(native, beams=4) == beam


@pytest.mark.parametrize("weight_dtype", [None, "INT8", "INT4"])
@pytest.mark.parametrize("name", ["t5", "t5-flan"])
def test_t5_decoder_logits_are_stocks_step_by_step(tiny: dict[str, Path], name: str,
                                                    weight_dtype: str | None) -> None:
    """Random T5s repeat one token, so tokens alone prove little: the native decoder's logits
    at every position of a forced decoder sequence (encoder once, then prefill of the start
    token and single steps, compiled and torch-op) must be stock's, float and quantized (the
    encoder quantized in both)."""
    from llmbench.backends.native import BeamHistory

    if weight_dtype is None:
        stock = load_model(str(tiny[name]), "float32").model
        native = native_of(tiny[name]).model
    else:
        scheme = Scheme("woq", weight_dtype, 32 if weight_dtype == "INT4" else -1, False)
        qlinears = apply.quantize_rtn(load_model(str(tiny[name]), "float32").model, scheme)
        stock, native = (apply.prepare_quantized(
            load_model(str(tiny[name]), "float32"), qlinears, backend=backend, dtype="float32",
            kv_cache_dtype="auto", scheme=scheme).model for backend in ("stock", "native"))
        assert any(name.startswith("encoder.") for name in qlinears)
    forced = torch.tensor([[0, 500, 9000, 77, 3000, 12000, 45, 800]])
    with torch.inference_mode():
        expected = stock(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT),
                         decoder_input_ids=forced).logits[0]
    for compiled in (True, False):
        with torch.inference_mode():
            caches = native.new_caches(1, 1, 1, forced.shape[1])
            native.attach_cross_kv(caches, native._encode(PROMPT, None))
            cos, sin = native._rope_tables(forced.shape[1] + 1)
            history = BeamHistory(1, forced.shape[1], indirect=False, prompt_len=1)
            got = [native.prefill(forced[:, :1], caches, cos, sin)[0]]
            if compiled:
                assert native.bind_compiled_step(caches, history, 1, cos, sin)
            got += [native.decode(forced[:, t], caches, history, 1, cos, sin)[0]
                    for t in range(1, forced.shape[1])]
            native._bound = False
        # Quantized: the same integers, but fused projections and other row counts take other
        # kernel paths (summation orders): 3.5e-5 of the largest logit measured; a bug is O(1).
        tolerance = 1e-5 if weight_dtype is None else 1e-3
        torch.testing.assert_close(torch.stack(got), expected, rtol=0,
                                   atol=tolerance * float(expected.abs().max()))
