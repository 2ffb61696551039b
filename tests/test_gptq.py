"""INT4 checkpoints made elsewhere (GPTQ / AWQ folders, --low-precision-checkpoint) and our GPTQ
(utils/run_gptq.py). The checkpoints are built here from a tiny llama with packing code of the
tests' own (numpy, written from the layouts' descriptions), so the loader is checked against the
layouts, not against itself."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import run_entry, run_in_process
from test_benchmark_cli import assert_one_line_error
from tiny_models import make_tiny_model

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # bits 4j of an AWQ word hold output channel AWQ_ORDER[j]
GROUP = 32
BENCH = ["--greedy", "--max-new-tokens", "4", "--num-iter", "1", "--num-warmup", "0"]


# ---- the tests' own quantizer and packers --------------------------------------------------

def rtn_with_g_idx(w: torch.Tensor, g_idx: torch.Tensor, groups: int):
    """Asymmetric 4-bit round to nearest, integer zeros in 1..15 (what GPTQ v1 can store):
    q [N, K], scales [G, N], zeros [G, N] (ints) for the grouping g_idx [K]."""
    n, k = w.shape
    scales, zeros = torch.empty(groups, n), torch.empty(groups, n)
    q = torch.empty(n, k, dtype=torch.int64)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        block = w[:, cols]
        lo, hi = block.min(dim=1).values.clamp(max=0), block.max(dim=1).values.clamp(min=0)
        s = ((hi - lo) / 15).clamp_min(1e-6).half().float()
        z = torch.round(-lo / s).clamp(1, 15)
        q[:, cols] = torch.round(block / s[:, None] + z[:, None]).clamp(0, 15).long()
        scales[g], zeros[g] = s, z
    return q, scales, zeros


def dequantized(q, scales, zeros, g_idx):
    return (q.float() - zeros[g_idx].t()) * scales[g_idx].t()


def pack(values: np.ndarray, axis: int, order=tuple(range(8))) -> np.ndarray:
    """8 values of 4 bits per uint32 word along `axis`; bits 4j hold the value at position
    order[j] of each 8. Returned as int32 (the checkpoints' dtype)."""
    values = np.moveaxis(values.astype(np.uint32), axis, 0)
    words = np.zeros((values.shape[0] // 8, *values.shape[1:]), dtype=np.uint32)
    for j in range(8):
        words |= (values[order[j]::8] & 0xF) << np.uint32(4 * j)
    return np.ascontiguousarray(np.moveaxis(words, 0, axis)).view(np.int32)


def layout_tensors(method: str, q, scales, zeros, g_idx) -> dict[str, torch.Tensor]:
    if method == "awq":  # qweight [K, N/8], qzeros [G, N/8], interleaved output channels
        return {"qweight": torch.from_numpy(pack(q.t().numpy(), 1, AWQ_ORDER)),
                "qzeros": torch.from_numpy(pack(zeros.long().numpy(), 1, AWQ_ORDER)),
                "scales": scales.half()}
    stored = zeros.long() - (1 if method == "gptq" else 0)  # v1 stores zero - 1
    return {"qweight": torch.from_numpy(pack(q.t().numpy(), 0)),
            "qzeros": torch.from_numpy(pack(stored.numpy(), 1)),
            "scales": scales.half(), "g_idx": g_idx.int()}


def quantize_model(folder, method: str, act_order: bool = False):
    """The tiny model's decoder projections in `method`'s layout: (tensors by key, the float
    state with the dequantized weights in place, module names)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    out, reference = {}, dict(state)
    names = sorted(key[: -len(".weight")] for key in state
                   if ".layers." in key and key.endswith("_proj.weight"))
    gen = torch.Generator().manual_seed(1)
    for name in names:
        w = state[f"{name}.weight"].float()
        k = w.shape[1]
        g_idx = torch.arange(k) // GROUP
        if act_order:  # groups over a permutation of the channels, as act-order writes them
            g_idx = torch.empty(k, dtype=torch.int64).index_copy_(
                0, torch.randperm(k, generator=gen), torch.arange(k) // GROUP)
        q, scales, zeros = rtn_with_g_idx(w, g_idx, k // GROUP)
        for key, tensor in layout_tensors(method, q, scales, zeros, g_idx).items():
            out[f"{name}.{key}"] = tensor
        reference[f"{name}.weight"] = dequantized(q, scales, zeros, g_idx)
    return out, reference, names


def write_checkpoint_folder(src, dst, method: str, act_order: bool = False):
    """A Hugging Face GPTQ/AWQ folder made from the tiny float model in `src`; returns the
    float state dict holding the dequantized weights (the reference)."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tensors, reference, names = quantize_model(src, method, act_order)
    floats = {k: v for k, v in reference.items() if k[: -len(".weight")] not in names}
    save_file({**floats, **tensors}, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    if method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                         "zero_point": True, "version": "gemm"}
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                         "desc_act": act_order, "sym": False,
                                         "checkpoint_format": method}
    (dst / "config.json").write_text(json.dumps(config))
    return reference


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, embedded_model_dir):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), embedded_model_dir)


def reference_logits(folder, state, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    with torch.inference_mode():
        return model(input_ids=ids).logits


# ---- GPTQ / AWQ folders ------------------------------------------------------------------

@pytest.mark.parametrize("method,act_order", [("gptq", True), ("gptq_v2", False),
                                              ("awq", False)])
def test_checkpoint_folder_matches_dequantized_reference(tmp_path, tiny_llama, method,
                                                         act_order):
    """-m of a GPTQ (v1 act-order, v2) or AWQ folder: our int4 projections compute the
    dequantized checkpoint, on both backends."""
    from llmbench.models import load_model
    from llmbench.quant import apply

    folder = tmp_path / method
    state = write_checkpoint_folder(tiny_llama, folder, method, act_order)
    ids = torch.tensor([[1, 500, 600, 700, 800, 900, 1000, 1100]])
    expected = reference_logits(tiny_llama, state, ids)
    loaded = load_model(str(folder), "float32")
    qlinears, scheme = loaded.quantized
    assert len(qlinears) == 14 and scheme.method == method.split("_")[0]
    assert scheme.group_size == GROUP and scheme.extra["desc_act"] == act_order
    assert all(q.kind == "int4" and (q.perm is not None) == act_order for q in qlinears.values())
    prepared = apply.prepare_quantized(loaded, qlinears, backend="stock", dtype="float32",
                                       kv_cache_dtype="auto", scheme=scheme)
    with torch.inference_mode():
        got = prepared.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)
    greedy = expected.argmax(-1)
    loaded = load_model(str(folder), "float32")
    native = apply.prepare_quantized(loaded, loaded.quantized[0], backend="native",
                                     dtype="float32", kv_cache_dtype="auto",
                                     scheme=loaded.quantized[1])
    assert native.backend == "native"
    out = native.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                num_beams=1, pad_token_id=2)
    assert out[0, ids.shape[1]] == greedy[0, -1]


def test_checkpoint_folder_bad_bits_and_shapes_one_line_error(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "gptq"
    write_checkpoint_folder(tiny_llama, folder, "gptq")
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.scales"
    tensors[key] = tensors[key][:, :32].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    result = run_entry("single_instance/run_generation.py", "-m", str(folder), *BENCH,
                       "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(result, key)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    from llmbench.errors import UserError
    from llmbench.models import load_model

    with pytest.raises(UserError, match="3-bit"):
        load_model(str(folder), "float32")


# ---- --low-precision-checkpoint ------------------------------------------------------------

def write_low_precision(tiny_llama, path, method: str, metadata: bool):
    from safetensors.torch import save_file

    tensors, state, _ = quantize_model(tiny_llama, method)
    meta = ({"quant_method": method.split("_")[0], "bits": "4", "group_size": str(GROUP),
             "checkpoint_format": method} if metadata else None)
    save_file(tensors, str(path), metadata=meta)
    return tensors, state


@pytest.mark.parametrize("method,metadata", [("gptq", False), ("awq", True)])
def test_low_precision_checkpoint_roundtrip(tmp_path, tiny_llama, method, metadata):
    """The file's projections, put into the float model of -m, compute the dequantized
    checkpoint (method and group size from the metadata, or inferred from the shapes)."""
    from llmbench.models import load_model
    from llmbench.quant import apply
    from llmbench.quant.checkpoint import load_low_precision

    path = tmp_path / "ckpt.safetensors"
    _, state = write_low_precision(tiny_llama, path, method, metadata)
    loaded = load_model(str(tiny_llama), "float32")
    qlinears, scheme = load_low_precision(str(path), loaded.model)
    assert scheme.method == method and scheme.group_size == GROUP
    apply.install_hf(loaded.model, qlinears)
    ids = torch.tensor([[1, 500, 600, 700, 800]])
    with torch.inference_mode():
        got = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(got, reference_logits(tiny_llama, state, ids), rtol=1e-4,
                               atol=2e-4)


def test_run_py_low_precision_checkpoint_two_steps_and_mismatch(tmp_path, tiny_llama):
    from safetensors.torch import save_file

    path = tmp_path / "ckpt.safetensors"
    tensors, _ = write_low_precision(tiny_llama, path, "gptq", metadata=True)
    out = tmp_path / "out"
    command = ["run.py", "-m", str(tiny_llama), "--ipex-weight-only-quantization",
               "--weight-dtype", "INT4", "--low-precision-checkpoint", str(path), "--benchmark",
               *BENCH, "--output-dir", str(out)]
    result = run_in_process(*command)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "best_model.json").read_text())
    assert meta["scheme"]["method"] == "gptq" and len(meta["layout"]) == 14
    report = json.loads(next(p for p in out.glob("*.json") if p.name != "best_model.json")
                        .read_text())
    assert report["status"] == "complete"
    assert report["backend"]["quantization"]["scheme"]["method"] == "gptq"

    bad_key = "model.layers.0.self_attn.k_proj.qweight"
    tensors[bad_key] = tensors[bad_key][:, :8].contiguous()
    save_file(tensors, str(path))
    bad_out = tmp_path / "bad"
    result = run_entry("single_instance/run_quantization.py", "-m", str(tiny_llama),
                       "--low-precision-checkpoint", str(path), "--skip-quality",
                       "--output-dir", str(bad_out))
    assert_one_line_error(result, f"{bad_key} has shape [8, 8], this model needs [8, 32]")
    assert not bad_out.exists() or not any(bad_out.iterdir())


# ---- our GPTQ ----------------------------------------------------------------------------

@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_beats_round_to_nearest_on_its_calibration_inputs(act_order, static_groups):
    """The algorithm on one linear: with correlated inputs (as activations are), GPTQ's output
    error on the calibration inputs is well below round to nearest on the same 4-bit grid, and
    the result survives the GPTQ checkpoint layout exactly. Static groups stay in channel
    order even with act-order (no input permutation at run time)."""
    from llmbench.quant.checkpoint import gptq_linear, gptq_tensors
    from llmbench.quant.gptq import GPTQSettings, gptq_quantize, group_params

    torch.manual_seed(0)
    n, k, group = 64, 256, 64
    x = torch.randn(2048, k) @ (torch.randn(k, k) / k**0.5 + torch.eye(k))
    x[:, :8] *= 10  # a few outlier channels, as LLM activations have
    w = torch.randn(n, k) * 0.05
    hessian = 2 * x.t() @ x / x.shape[0]
    result = gptq_quantize(w, hessian, GPTQSettings(group_size=group, act_order=act_order,
                                                    static_groups=static_groups))
    rtn = torch.empty_like(w)
    for g in range(k // group):
        cols = slice(g * group, (g + 1) * group)
        s, z = group_params(w[:, cols], sym=False, clip_search=True)
        q = torch.clamp(torch.round(w[:, cols] / s[:, None]) + z[:, None], 0, 15)
        rtn[:, cols] = (q - z[:, None]) * s[:, None]
    error_gptq = float((x @ (w - result.dequantized).t()).norm())
    error_rtn = float((x @ (w - rtn).t()).norm())
    print(f"act_order={act_order}: output error GPTQ {error_gptq:.3f}, RTN {error_rtn:.3f}",
          file=sys.stderr)
    assert error_gptq < 0.8 * error_rtn
    assert bool((result.q >= 0).all() and (result.q <= 15).all())
    assert sorted(torch.bincount(result.g_idx).tolist()) == [group] * (k // group)
    if static_groups:
        assert torch.equal(result.g_idx, torch.arange(k) // group)
    tensors = gptq_tensors(result.q, result.zeros, result.scales, result.g_idx, None)
    linear = gptq_linear(tensors, k, n, "proj", "test")
    torch.testing.assert_close(linear.dequantize(), result.dequantized, rtol=0, atol=1e-6)


def test_run_gptq_end_to_end_then_benchmark(tmp_path, tiny_llama):
    """utils/run_gptq.py on the tiny model (few samples): its folder runs in the benchmark and
    its gptq_checkpoint.safetensors through --low-precision-checkpoint."""
    from llmbench.models import load_model
    from llmbench.quant.checkpoint import load_low_precision

    out = tmp_path / "gptq"
    result = run_entry("utils/run_gptq.py", "-m", str(tiny_llama), "--nsamples", "4",
                       "--seqlen", "32", "--group-size", "32", "--act-order",
                       "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "gptq" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["desc_act"] is True
    assert not list(tmp_path.glob(".gptq.*"))  # no staging folder left
    bench_out = tmp_path / "bench"
    result = run_in_process("run.py", "--benchmark", "-m", str(out), "--backend", "native", *BENCH,
                       "--output-dir", str(bench_out))
    assert result.returncode == 0, result.stderr
    report = json.loads(next(bench_out.glob("*.json")).read_text())
    q = report["backend"]["quantization"]
    assert report["status"] == "complete" and report["backend"]["name"] == "native"
    assert q["checkpoint"] == {"method": "gptq", "bits": 4, "group_size": GROUP,
                               "desc_act": True, "checkpoint_format": "gptq"}
    assert q["native_projections_replaced"] == 8  # 2 layers x (qkv, o, gate_up, down)
    # The same projections through --low-precision-checkpoint on the float model.
    folder_model = load_model(str(out), "float32")
    float_model = load_model(str(tiny_llama), "float32").model
    qlinears, scheme = load_low_precision(str(out / "gptq_checkpoint.safetensors"), float_model)
    assert scheme.extra["settings_from"] == "metadata" and scheme.extra["desc_act"] is True
    for name, linear in folder_model.quantized[0].items():
        torch.testing.assert_close(qlinears[name].dequantize(), linear.dequantize())


def test_scale_tuning_lowers_kl_with_integers_fixed(tiny_llama):
    """tune_scales after GPTQ: the KL to the float model on the tuning windows falls, the
    integers and zero points stay GPTQ's, the scales are fp16 values, the student gets plain
    linears back holding the new dequantized weights, and the checkpoint layout round-trips."""
    import copy

    from llmbench.models import load_model
    from llmbench.quant.checkpoint import gptq_linear, gptq_tensors
    from llmbench.quant.gptq import GPTQSettings, quantize_model
    from llmbench.quant.scale_tuning import ScaleTuning, _kl_to_teacher, tune_scales

    student = load_model(str(tiny_llama), "float32").model
    teacher = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(0)
    vocab = student.config.vocab_size
    calib = torch.randint(0, vocab, (4, 32), generator=generator)
    windows = torch.randint(0, vocab, (8, 32), generator=generator)
    results = quantize_model(student, calib, GPTQSettings(group_size=GROUP, act_order=True),
                             log=lambda _line: None)
    before = {name: (r.q.clone(), r.zeros.clone(), r.scales.clone())
              for name, r in results.items()}

    def kl() -> float:
        with torch.no_grad():
            return float(_kl_to_teacher(student(input_ids=windows).logits,
                                        teacher(input_ids=windows).logits))

    kl_gptq = kl()
    trainable = [p.requires_grad for p in student.parameters()]
    stats = tune_scales(student, teacher, results, windows, ScaleTuning(epochs=3, lr=1e-2),
                        log=lambda _line: None)
    kl_tuned = kl()
    print(f"KL to float: GPTQ {kl_gptq:.5f}, tuned {kl_tuned:.5f}", file=sys.stderr)
    assert kl_tuned < 0.9 * kl_gptq
    assert stats["kl_last_epoch"] < stats["kl_first_epoch"]
    modules = dict(student.named_modules())
    changed = 0
    for name, result in results.items():
        q, zeros, scales = before[name]
        assert torch.equal(result.q, q) and torch.equal(result.zeros, zeros)
        assert torch.equal(result.scales, result.scales.half().float())
        changed += int(not torch.equal(result.scales, scales))
        assert type(modules[name]) is torch.nn.Linear
        assert torch.equal(modules[name].weight, result.dequantized)
        n, k = result.q.shape
        linear = gptq_linear(gptq_tensors(result.q, result.zeros, result.scales, result.g_idx,
                                          None), k, n, name, "test")
        torch.testing.assert_close(linear.dequantize(), result.dequantized, rtol=0, atol=1e-6)
    assert changed == len(results)
    assert [p.requires_grad for p in student.parameters()] == trainable


def test_run_gptq_tune_scales_end_to_end(tmp_path, tiny_llama):
    """utils/run_gptq.py --tune-scales: the tuned row is printed, the folder's config records
    the tuning, and the folder loads as a GPTQ checkpoint."""
    from llmbench.models import load_model

    out = tmp_path / "gptq"
    result = run_in_process("utils/run_gptq.py", "-m", str(tiny_llama), "--nsamples", "4",
                       "--seqlen", "32", "--group-size", "32", "--act-order", "--static-groups",
                       "--skip-rtn", "--tune-scales", "--tune-epochs", "1",
                       "--tune-nsamples", "4", "--tune-lr", "0.01", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "scale tuning epoch 1/1" in result.stdout
    assert re.search(r"^ +tuned ", result.stdout, re.MULTILINE), result.stdout
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    tuning = qconfig["scale_tuning"]
    assert (tuning["epochs"], tuning["nsamples"], tuning["seqlen"], tuning["lr"]) == (1, 4, 32,
                                                                                      0.01)
    assert tuning["kl_first_epoch"] > 0
    assert load_model(str(out), "float32").quantized[0]


def test_run_gptq_refuses_bad_flags(tmp_path):
    result = run_entry("utils/run_gptq.py", "--wbits", "3", "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(result, "--wbits 3")
    assert not (tmp_path / "o").exists()
    result = run_entry("utils/run_gptq.py", "--dataset", str(tmp_path / "missing.jsonl"),
                       "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(result, "missing.jsonl: no such file")
    assert not (tmp_path / "o").exists()
    result = run_entry("utils/run_gptq.py", "--tune-epochs", "3", "--output-dir",
                       str(tmp_path / "o"))
    assert_one_line_error(result, "--tune-epochs needs --tune-scales")
    result = run_entry("utils/run_gptq.py", "--tune-scales", "--tune-lr", "2", "--output-dir",
                       str(tmp_path / "o"))
    assert_one_line_error(result, "--tune-lr 2.0")
    assert not (tmp_path / "o").exists()


def test_run_gptq_static_groups_end_to_end(tmp_path, tiny_llama):
    """utils/run_gptq.py --act-order --static-groups: the folder records static_groups, and its
    projections load without an input permutation (groups in channel order)."""
    from llmbench.models import load_model

    out = tmp_path / "gptq"
    result = run_in_process("utils/run_gptq.py", "-m", str(tiny_llama), "--nsamples", "4",
                       "--seqlen", "32", "--group-size", "32", "--act-order", "--static-groups",
                       "--skip-rtn", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "static-groups True" in result.stdout
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["static_groups"] is True and qconfig["desc_act"] is True
    linears = load_model(str(out), "float32").quantized[0]
    assert linears and all(linear.perm is None for linear in linears.values())
