"""The example scripts' older flag names and formats (issue 19), one behaviour each, in-process:
v2.1 names map to today's flags with a one-line note, --model is unambiguous, INT8 takes groups,
--lowp-mode BF16/FP16 computes in that dtype, best_model.pt finds our saved model."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from llmbench.cli import flags
from llmbench.errors import UserError


def test_v21_names_set_todays_flags_with_a_note_and_are_not_forwarded(capsys):
    from llmbench.cli import run as dispatch

    parser = dispatch.build_parser()
    args = parser.parse_args(["--benchmark", "--ipex-weight-only-quantization",
                              "--int8-bf16-mixed", "--deployment-mode", "--jit", "--int8"])
    out = capsys.readouterr().out.splitlines()
    assert args.quant_with_amp
    assert [line.split(":")[1].strip() for line in out] == [
        "--int8-bf16-mixed", "--deployment-mode", "--jit", "--int8"]
    assert all(line.startswith("note: ") for line in out)
    steps = dispatch.plan_steps(parser, args)
    for step in steps:  # today's names only
        assert "--quant-with-amp" in step.argv
        assert not {"--int8-bf16-mixed", "--deployment-mode", "--jit", "--int8"} & set(step.argv)


@pytest.mark.parametrize("build", [
    lambda: __import__("llmbench.accuracy.single_instance", fromlist=["x"]).build_parser(),
    lambda: __import__("llmbench.accuracy.tensor_parallel", fromlist=["x"]).build_rank_parser(),
    lambda: __import__("llmbench.generation", fromlist=["x"]).build_parser(),
    lambda: __import__("llmbench.cli.tools", fromlist=["x"]).build_shard_parser(),
    lambda: __import__("llmbench.cli.gptq", fromlist=["x"]).build_parser(),
    lambda: __import__("llmbench.cli.quantize", fromlist=["x"]).build_parser(),
])
def test_model_flag_is_unambiguous_everywhere(build):
    assert build().parse_args(["--model", "some/model"]).model_name_or_path == "some/model"


def test_accuracy_only_and_benchmark_are_noted_where_they_are_the_script(capsys):
    from llmbench import generation
    from llmbench.accuracy import single_instance
    from llmbench.distributed import benchmark

    single_instance.build_parser().parse_args(["--accuracy-only"])
    generation.build_parser().parse_args(["--benchmark"])
    benchmark.build_parser().parse_args(["--benchmark"])
    out = capsys.readouterr().out
    assert out.count("note: --accuracy-only:") == 1 and out.count("note: --benchmark:") == 2


def _accuracy_args(*argv: str) -> argparse.Namespace:
    from llmbench.accuracy import single_instance

    return single_instance.build_parser().parse_args(list(argv))


def test_accuracy_dtype_int8_int4_is_weight_only_quantization():
    from llmbench.cli import settings_from

    settings = settings_from(_accuracy_args("--dtype", "int4"))
    q = settings.quantization
    assert settings.accuracy.expect_weight_dtype == "INT4"
    assert (q.ipex_weight_only_quantization, q.weight_dtype, settings.model.dtype) == (
        True, "INT4", "float32")
    assert settings.flags["dtype"] == "float32"  # the report's config says what ran
    settings = settings_from(_accuracy_args("--dtype", "int8", "--int8-bf16-mixed",
                                            "--quantized-model-path", "q"))
    assert settings.accuracy.expect_weight_dtype == "INT8"
    assert not settings.quantization.ipex_weight_only_quantization
    assert settings.model.dtype == "bfloat16"
    with pytest.raises(UserError, match="--dtype int4 contradicts --weight-dtype NF4"):
        settings_from(_accuracy_args("--dtype", "int4", "--ipex-weight-only-quantization",
                                     "--weight-dtype", "NF4"))


def test_int8_groups_quantize_save_and_load(tmp_path):
    from llmbench.quant import apply
    from llmbench.quant.linears import Int8GroupLinear
    from llmbench.quant.rtn import quantize_weight
    from llmbench.quant.scheme import Scheme

    torch.manual_seed(0)
    w, b, x = torch.randn(48, 100), torch.randn(48), torch.randn(3, 100)
    for sym in (True, False):
        scheme = Scheme("woq", "INT8", 32, sym)
        grouped = quantize_weight(w, b, scheme)
        channel = quantize_weight(w, b, Scheme("woq", "INT8", -1, sym))
        assert isinstance(grouped, Int8GroupLinear) and grouped.scales.shape == (48, 4)
        error = (grouped.dequantize() - w).abs().max()
        assert error < (channel.dequantize() - w).abs().max()
        torch.testing.assert_close(grouped(x), F.linear(x, grouped.dequantize(), b))
        path = apply.save(tmp_path / str(sym), {"proj": grouped}, scheme, {"name": "t"})
        loaded, saved_scheme, _, _ = apply.load(path)
        assert saved_scheme.group_size == 32
        torch.testing.assert_close(loaded["proj"](x), grouped(x))


@pytest.mark.parametrize("lowp_mode,dtype", [("BF16", torch.bfloat16), ("FP16", torch.float16)])
def test_lowp_mode_computes_in_bf16_fp16(lowp_mode, dtype):
    from llmbench.quant.apply import compute_description, set_compute
    from llmbench.quant.linears import LowpLinear, fuse
    from llmbench.quant.rtn import quantize_weight
    from llmbench.quant.scheme import Scheme

    torch.manual_seed(0)
    scheme = Scheme("woq", "INT4", 32, False, lowp_mode)
    parts = {n: quantize_weight(torch.randn(16, 64), None, scheme) for n in ("a", "b")}
    computing = set_compute(parts, scheme)
    assert all(isinstance(q, LowpLinear) and q.kind == f"int4-{lowp_mode.lower()}"
               for q in computing.values())
    x = torch.randn(2, 64)
    expected = F.linear(x.to(dtype), parts["a"].dequantize().to(dtype)).float()
    assert torch.equal(computing["a"](x), expected)
    assert not torch.equal(computing["a"](x), parts["a"](x))  # not the fp32 kernel
    fused = fuse(list(computing.values()))
    assert torch.equal(fused(x), torch.cat([computing["a"](x), computing["b"](x)], dim=-1))
    assert f"--lowp-mode {lowp_mode}" in compute_description(computing, scheme)


def test_best_model_pt_finds_our_saved_model(tmp_path, capsys):
    from llmbench.quant.apply import MODEL_FILE, resolve_model_path

    (tmp_path / MODEL_FILE).write_bytes(b"")
    assert resolve_model_path(tmp_path / "best_model.pt") == tmp_path / MODEL_FILE
    assert "IPEX's TorchScript best_model.pt is not made here" in capsys.readouterr().out
    with pytest.raises(UserError, match="no such file"):
        resolve_model_path(tmp_path / "other" / "best_model.pt")


def test_create_shard_model_takes_the_model_as_positional_argument():
    from llmbench.cli.tools import build_shard_parser, shard_main

    args = build_shard_parser().parse_args(["some/model", "--save-path", "x"])
    assert args.model == "some/model"
    with pytest.raises(UserError, match="two models given"):
        shard_main(["-m", "a", "b", "--save-path", "x"])


def test_run_quantization_refuses_benchmark_flags_without_benchmark():
    from llmbench.cli import quantize

    with pytest.raises(UserError, match="--num-iter only applies with --benchmark"):
        quantize.main(["--ipex-weight-only-quantization", "--num-iter", "3"])


def test_gptq_flag_needs_weight_only_and_means_int4():
    from llmbench.cli import settings_from
    from llmbench.cli.quantize import build_parser
    from llmbench.quant.workflow import scheme_of

    def scheme(*argv: str):
        return scheme_of(settings_from(build_parser().parse_args(list(argv))).quantization)

    gptq = scheme("--ipex-weight-only-quantization", "--gptq")
    assert (gptq.method, gptq.weight_dtype, gptq.group_size) == ("gptq", "INT4", 128)
    with pytest.raises(UserError, match="--gptq applies with --ipex-weight-only-quantization"):
        scheme("--gptq")


def test_compat_flags_are_defined_once():
    """Each older name lives in flags.py only (one definition of each flag)."""
    parser = flags.Parser()
    for add in (flags.add_model_flags, flags.add_quantization_flags):
        add(parser)
    names = [o for a in parser._actions for o in a.option_strings]
    assert len(names) == len(set(names))
    assert {"--int8-bf16-mixed", "--int8", "--deployment-mode", "--jit", "--model"} <= set(names)


@pytest.mark.parametrize("k,group", [(256, 32), (200, 64)])
def test_checkpoint_slices_for_autotp_are_the_checkpoints_own_weights(k, group):
    """A GPTQ folder under --autotp: each rank's slice is cut from the checkpoint's integers,
    scales and zero points, so it dequantizes to exactly the whole projection's slice."""
    from llmbench.quant.autotp import columns_of, rows_of
    from llmbench.quant.rtn import quantize_weight
    from llmbench.quant.scheme import Scheme

    torch.manual_seed(0)
    whole = quantize_weight(torch.randn(24, k), torch.randn(24), Scheme("gptq", "INT4", group,
                                                                         False))
    reference = whole.dequantize()
    rows = [5, 0, 17, 3]
    assert torch.equal(rows_of(whole, rows).dequantize(), reference[rows])
    assert torch.equal(rows_of(whole, rows).bias, whole.bias[rows])
    cut = 128 if k % 128 == 0 else 128
    for offset, width in ((0, cut), (cut, k - cut)):
        part = columns_of(whole, offset, width, "proj")
        assert part.in_features == width and part.bias is None
        assert torch.equal(part.dequantize(), reference[:, offset:offset + width])
    with pytest.raises(UserError, match="not on the checkpoint's groups"):
        columns_of(whole, group // 2, group, "proj")
    # act-order: every rank keeps the whole projection, the other ranks' channels weighted 0
    # (by their integer zero points, as GPTQ checkpoints store them)
    whole.perm = torch.randperm(k)
    whole.zeros = whole.zeros.round()
    reference = whole.dequantize()
    x = torch.randn(3, k)
    total = torch.zeros(3, 24)
    for offset, width in ((0, cut), (cut, k - cut)):
        part = columns_of(whole, offset, width, "proj")
        assert part.in_features == width and part.bias is None
        assert torch.equal(part.dequantize(), reference[:, offset:offset + width])
        total += part(x[:, offset:offset + width])
    # each rank rounds its own channels to int16 levels (the kernels' weight-only input)
    torch.testing.assert_close(total + whole.bias, whole(x), rtol=0, atol=5e-3)
    whole.zeros[0, 0] = 15.5  # a zero point no 4-bit level equals: refused
    with pytest.raises(UserError, match="act-order"):
        columns_of(whole, 0, cut, "proj")


def write_channel_int8_folder(src, dst) -> dict[str, torch.Tensor]:
    """A channel INT8 folder in meituan/DeepSeek-R1-Channel-INT8's layout made from the tiny
    float model in `src`: every linear's `weight` int8 plus `weight_scale` [N, 1], and the
    quantization_config IPEX's README has users add. Returns the dequantized weights."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    out, reference = {}, {}
    for key, tensor in state.items():
        linear = (key.endswith("proj.weight") and tensor.dim() == 2 and tensor.shape[1] >= 32)
        if not linear:
            out[key] = tensor
            continue
        scale = tensor.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        q = torch.round(tensor.float() / scale).clamp(-127, 127).to(torch.int8)
        out[key], out[key + "_scale"] = q, scale
        reference[key] = q.float() * scale
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "int8", "bits": 8, "group_size": -1}
    (dst / "config.json").write_text(json.dumps(config))
    return reference


def test_deepseek_r1_channel_int8_folder_loads_and_runs(tmp_path, embedded_model_dir, capsys):
    """The DeepSeek-R1 channel-INT8 format on a tiny random deepseek_v3: -m of the folder runs
    its int8 weights as they are (our per-channel Int8Linear), with the examples' flags."""
    from tiny_models import make_tiny_model

    from llmbench.generation import main as generation_main
    from llmbench.models import load_model
    from llmbench.quant.linears import Int8Linear

    tiny = make_tiny_model("deepseek_v3", tmp_path / "tiny", embedded_model_dir)
    folder = tmp_path / "DeepSeek-R1-Channel-INT8"
    reference = write_channel_int8_folder(tiny, folder)
    loaded = load_model(str(folder), "float32")
    qlinears, scheme = loaded.quantized
    assert (scheme.method, scheme.weight_dtype, scheme.group_size) == ("int8", "INT8", -1)
    assert qlinears and all(isinstance(q, Int8Linear) for q in qlinears.values())
    for name, linear in qlinears.items():
        assert torch.equal(linear.dequantize(), reference[f"{name}.weight"])
    status = generation_main(["-m", str(folder), "--ipex-weight-only-quantization",
                              "--weight-dtype", "INT8", "--greedy", "--token-latency",
                              "--num-iter", "1", "--num-warmup", "0", "--max-new-tokens", "2",
                              "--input-tokens", "8", "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert status == 0 and "Inference latency:" in out
    assert "holds int8 INT8 per-channel sym weights: they are used as they are" in out
