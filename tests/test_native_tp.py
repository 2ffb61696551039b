"""`deepspeed run.py --autotp --backend native` (llmbench.backends.tensor_parallel): 2 ranks,
each holding a slice of the native model and all-reducing inside the compiled step, give the
single-instance native tokens, in fp32 and with weight-only INT8 / INT4, for multi-query
attention too (its one KV head replicated); what is not cut falls back to stock AutoTP and
says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import launch, only_report
from tiny_models import make_tiny_model

TOKENS = 32
RUN = ["--greedy", "--token-latency", "--max-new-tokens", str(TOKENS), "--num-iter", "1",
       "--num-warmup", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, embedded_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("native-tp")
    return {family: make_tiny_model(family, root / family, embedded_model_dir)
            for family in ("llama", "gpt_neox", "opt", "mixtral", "deepseek_v2", "jamba", "t5",
                           "gpt_bigcode", "falcon")}


def single_instance(model: Path, quant_flags: list[str], tokens: int = TOKENS,
                    batch: int = 1, beams: int = 1) -> list[list[int]]:
    """The tokens one native process generates for run_benchmark's default prompt (greedy, or
    beam search with `beams`), with the scheme the same quantization flags give."""
    import torch

    from llmbench import backends
    from llmbench.cli import settings_from
    from llmbench.cli.run import build_parser
    from llmbench.decoding import decoding_settings
    from llmbench.models import load_model
    from llmbench.prompts import build_prompt
    from llmbench.quant import apply
    from llmbench.quant.workflow import scheme_of

    loaded = load_model(str(model), "float32")
    seq2seq = loaded.family.seq2seq
    if quant_flags or loaded.quantized is not None:
        if loaded.quantized is not None:  # a GPTQ/AWQ folder: its own INT4 weights
            qlinears, scheme = loaded.quantized
        else:
            settings = settings_from(build_parser().parse_args(quant_flags))
            scheme = scheme_of(settings.quantization)
            qlinears = apply.quantize_rtn(loaded.model, scheme)
        native = apply.prepare_quantized(loaded, qlinears, backend="native", dtype="float32",
                                         kv_cache_dtype="auto", scheme=scheme).model
    else:
        native = backends.prepare(loaded.model, backend="native", dtype="float32",
                                  family=loaded.family.model_type).model
    prompt = build_prompt(loaded.tokenizer, loaded.config, loaded.family.model_type,
                          input_tokens=None, prompt_text=None, batch_size=batch,
                          max_new_tokens=tokens, seq2seq=seq2seq)
    _, kwargs = decoding_settings(greedy=beams == 1, sample=False, num_beams=beams,
                                  max_new_tokens=tokens, generation_config=None)
    with torch.inference_mode():
        output = native.generate(input_ids=prompt.input_ids,
                                 attention_mask=prompt.attention_mask,
                                 pad_token_id=loaded.tokenizer.pad_token_id, **kwargs)
    return output.tolist()


@pytest.mark.parametrize(("family", "quant"), [
    ("llama", []), ("gpt_neox", []), ("opt", []), ("mixtral", []),
    # latent attention (DeepSeek: query heads cut, the latent whole), Mamba layers whole on
    # every rank (Jamba), an encoder-decoder's cross-attention (T5)
    ("deepseek_v2", []), ("jamba", []), ("t5", []),
    # multi-query attention (one KV head, replicated on both ranks, which split the query heads)
    ("gpt_bigcode", []), ("falcon", ["INT8", "0"]),
    ("llama", ["INT8", "0"]), ("gpt_neox", ["INT4", "32"]), ("mixtral", ["INT8", "0"]),
    ("deepseek_v2", ["INT8", "0"])])
def test_two_ranks_native_match_one_process(tiny, tmp_path, family, quant):
    flags = (["--ipex-weight-only-quantization", "--weight-dtype", quant[0], "--group-size",
              quant[1]] if quant else [])
    result = launch("-m", str(tiny[family]), "--backend", "native", *RUN, *flags,
                    "--output-dir", str(tmp_path), timeout=600, launcher="direct")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "native-autotp x2" in result.stdout
    report = only_report(tmp_path)
    assert report["backend"]["name"] == "native"
    assert "fallback_reason" not in report["backend"]
    tp = report["backend"]["tensor_parallel"]
    assert tp["world"] == 2 and sum(tp["heads"]) == 4 and len(tp["mlp_units"]) == 2
    if family in ("gpt_bigcode", "falcon"):
        assert tp["kv_heads"] == [1, 1] and tp["kv_replicated_on_ranks"] == 2
    dist = report["distributed"]
    assert dist["ranks_agree"] is True
    assert dist["all_reduce_ms_per_token"] > 0
    # read layer by layer from the folder's safetensors; an encoder-decoder loads whole
    assert dist["load_path"] == ("whole model per rank, cut by llmbench" if family == "t5"
                                 else "meta+checkpoint, layer by layer, cut by llmbench")
    for rank in dist["ranks"]:
        # sequential blocks reduce twice per layer, parallel ones once, plus the logits
        assert rank["all_reduce_calls_per_token"] >= 2
        assert 0 < rank["weight_bytes_per_token"] < report["model"]["weight_bytes"]
    expected = single_instance(tiny[family], flags)
    assert report["generated_token_ids"] == expected
    if quant:
        assert report["backend"]["quantization"]["scheme"]["weight_dtype"] == quant[0]


@pytest.mark.parametrize("decoding", [["--greedy"], ["--num-beams", "4", "--batch-size", "5"]])
def test_query_heads_split_across_a_kv_group(tmp_path, embedded_model_dir, decoding):
    """SmolLM2's attention shape (9 query heads, 3 KV heads) over 2 ranks: 5 + 4 query heads,
    the middle KV head computed and cached on both, each rank's heads reading their KV heads
    through a map (not whole groups). Greedy runs the compiled step; beam search on 20 rows
    runs the torch-op step. The tokens are one native process's."""
    model = make_tiny_model("llama", tmp_path / "model", embedded_model_dir, hidden_size=144,
                            num_attention_heads=9, num_key_value_heads=3)
    result = launch("-m", str(model), "--backend", "native", "--token-latency",
                    "--max-new-tokens", "8", "--num-iter", "1", "--num-warmup", "0", *decoding,
                    "--output-dir", str(tmp_path / "out"), timeout=600, launcher="direct")
    assert result.returncode == 0, result.stderr[-3000:]
    report = only_report(tmp_path / "out")
    backend = report["backend"]
    assert backend["name"] == "native" and "fallback_reason" not in backend
    tp = backend["tensor_parallel"]
    assert tp["heads"] == [5, 4] and tp["kv_heads"] == [2, 2] and tp["kv_heads_on_two_ranks"] == 1
    beams = 1 if decoding == ["--greedy"] else 4
    # 1 row on the compiled step; 5 x 4 beams are past its 16 rows: the torch-op step
    assert "for up to 16 rows" in backend["decode_step"]
    assert report["distributed"]["ranks_agree"] is True
    assert report["generated_token_ids"] == single_instance(model, [], 8, batch=5 if beams > 1
                                                            else 1, beams=beams)


def test_query_heads_split_on_the_int4_groups(tmp_path, embedded_model_dir):
    """INT4 groups wider than a head (32 over 16-wide heads, as SmolLM2's 128 over 64): the
    ranks' query heads are split so that o's column cut falls on whole groups (4 + 5 heads,
    where 5 + 4 would cut a group: before, the run stopped there). The tokens are one native
    process's with the same quantization."""
    model = make_tiny_model("llama", tmp_path / "model", embedded_model_dir, hidden_size=144,
                            num_attention_heads=9, num_key_value_heads=3)
    flags = ["--ipex-weight-only-quantization", "--weight-dtype", "INT4", "--group-size", "32"]
    result = launch("-m", str(model), "--backend", "native", *RUN, *flags,
                    "--output-dir", str(tmp_path / "out"), timeout=600, launcher="direct")
    assert result.returncode == 0, result.stderr[-3000:]
    report = only_report(tmp_path / "out")
    assert report["backend"]["name"] == "native"
    assert report["backend"]["tensor_parallel"]["heads"] == [4, 5]
    assert report["generated_token_ids"] == single_instance(model, flags)


@pytest.mark.parametrize(("method", "act_order"), [("gptq_v2", False), ("awq", False),
                                                   ("gptq", True)])
def test_checkpoint_folder_two_ranks_native_match_one_process(tiny, tmp_path, method, act_order):
    """-m of a GPTQ / AWQ folder (INT4, group 32): every rank cuts its slices of the folder's
    own integers and scales; the tokens are one native process's on the same folder. With
    act-order (desc_act) each rank keeps the row-parallel projections whole, the other rank's
    input channels weighted zero."""
    from test_gptq import write_checkpoint_folder

    folder = tmp_path / method
    write_checkpoint_folder(tiny["llama"], folder, method, act_order)
    result = launch("-m", str(folder), "--backend", "native", *RUN,
                    "--output-dir", str(tmp_path / "out"), timeout=600, launcher="direct")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "native-autotp x2" in result.stdout
    assert result.stdout.count("quantized: ") == 1  # rank 0 says what the folder holds
    report = only_report(tmp_path / "out")
    assert report["backend"]["name"] == "native"
    assert "fallback_reason" not in report["backend"]
    quantization = report["backend"]["quantization"]
    assert quantization["scheme"]["method"] == method.split("_")[0]
    assert quantization["applied"].startswith("the checkpoint's INT4 weights")
    assert report["distributed"]["ranks_agree"] is True
    assert report["generated_token_ids"] == single_instance(folder, [])


@pytest.mark.parametrize(("family", "flags"), [
    ("llama", ["--dtype", "bfloat16", "--ipex-weight-only-quantization", "--weight-dtype",
               "INT8"]),
    ("mixtral", ["--dtype", "bfloat16", "--ipex-weight-only-quantization", "--weight-dtype",
                 "INT4", "--group-size", "32"]),
    ("llama", ["--dtype", "bfloat16"])])
def test_layer_by_layer_load_is_the_whole_load(tmp_path, embedded_model_dir, family, flags):
    """Read layer by layer (each layer quantized from fp32 as it is read, its float parts in
    bf16, then cut) the ranks hold exactly what loading the whole model first gives them:
    the same tokens in bf16 with INT8 / INT4 (a tied lm_head quantized from fp32, a MoE
    router left in bf16), with less memory per rank."""
    overrides = {"tie_word_embeddings": True} if family == "llama" else {}
    model = make_tiny_model(family, tmp_path / "model", embedded_model_dir, **overrides)
    reports = {}
    for load in ("layers", "whole"):
        out = tmp_path / load
        result = launch("-m", str(model), "--backend", "native", *RUN, *flags,
                        "--output-dir", str(out), timeout=600, launcher="direct",
                        env={"LLMBENCH_TP_LOAD": load})
        assert result.returncode == 0, result.stderr[-3000:]
        reports[load] = only_report(out)
    layers, whole = reports["layers"], reports["whole"]
    assert layers["distributed"]["load_path"] == "meta+checkpoint, layer by layer, cut by llmbench"
    assert whole["distributed"]["load_path"] == "whole model per rank, cut by llmbench"
    assert "loading the whole model on every rank: LLMBENCH_TP_LOAD=whole" in whole["notes"]
    assert layers["generated_token_ids"] == whole["generated_token_ids"]
    for key in ("tensor_parallel", "weight_bytes_per_token", "decode_step"):
        assert layers["backend"][key] == whole["backend"][key], key
    if "--weight-dtype" in flags:
        quant = layers["backend"]["quantization"]
        for key in ("scheme", "formats", "quantized_projections", "native_projections_replaced"):
            assert quant[key] == whole["backend"]["quantization"][key], key
    assert [r["local_weight_bytes"] for r in layers["distributed"]["ranks"]] == [
        r["local_weight_bytes"] for r in whole["distributed"]["ranks"]]


def test_a_checkpoint_cut_short_stops_every_rank_in_one_line(tmp_path, embedded_model_dir):
    """A safetensors file cut short (a copy interrupted): the layer-by-layer load says which
    file and by how much, on one line per rank, and the run exits non-zero."""
    model = make_tiny_model("llama", tmp_path / "model", embedded_model_dir)
    weights = next(model.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    result = launch("-m", str(model), "--backend", "native", *RUN,
                    "--output-dir", str(tmp_path / "out"), timeout=600, launcher="direct")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "is cut short" in line]
    assert errors and all(line.startswith("error: rank ") for line in errors), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_what_is_not_native_falls_back_loudly(tmp_path, embedded_model_dir):
    """An activation the native step lacks (quick_gelu in a llama): stock AutoTP runs, and the
    console and the report say why."""
    model = make_tiny_model("llama", tmp_path / "model", embedded_model_dir,
                            hidden_act="quick_gelu")
    result = launch("-m", str(model), "--backend", "native", *RUN[:3], "4", *RUN[4:],
                    "--output-dir", str(tmp_path / "out"), timeout=600, launcher="direct")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "activation quick_gelu is not implemented" in result.stdout
    report = only_report(tmp_path / "out")
    assert report["backend"]["name"] == "deepspeed-autotp"
    assert report["backend"]["requested"] == "native"
    assert "this run is STOCK transformers" in report["backend"]["fallback_reason"]
    assert report["distributed"]["ranks_agree"] is True


def test_two_hosts_talk_over_tcp(tiny, tmp_path):
    """Two "machines" on two loopback addresses, each started by DeepSpeed's launcher in its
    ssh-free mode (--no_ssh --node_rank N with one hostfile): one rank each, so DeepSpeed's
    shared-memory all-reduce is off and the ranks all-reduce through gloo over TCP; the tokens
    are one native process's."""
    import os
    import subprocess

    from test_distributed import deepspeed_launcher, free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo"}
    nodes = [subprocess.Popen(
        [deepspeed_launcher(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
         "--master_addr", "127.0.0.1", "--master_port", str(port), "--num_accelerators", "1",
         str(Path(__file__).resolve().parent.parent / "run.py"), "--benchmark", "--autotp",
         "--backend", "native", "-m", str(tiny["llama"]), *RUN[:3], "8", *RUN[4:],
         "--output-dir", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for n in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    report = only_report(tmp_path / "out")
    dist = report["distributed"]
    assert dist["launcher_env"]["LOCAL_SIZE"] == "1" and dist["launcher_env"]["CROSS_SIZE"] == "2"
    assert [r["node_rank"] for r in dist["ranks"]] == [0, 1]
    assert all("gloo" in r["all_reduce"] and "shared-memory" not in r["all_reduce"]
               for r in dist["ranks"])
    assert dist["ranks_agree"] is True
    assert report["generated_token_ids"] == single_instance(tiny["llama"], [], 8)


def test_a_rank_killed_mid_run_ends_every_rank(tiny, tmp_path):
    """Rank 1 SIGKILLs itself at its 3rd decoding step (LLMBENCH_FAIL_RANK=1@3) while rank 0
    waits in the shared-memory all-reduce inside the compiled step: rank 0's watchdog ends it
    within seconds (well inside --dist-timeout), and its report says which rank failed."""
    import time

    start = time.monotonic()
    result = launch("-m", str(tiny["llama"]), "--backend", "native", *RUN, "--dist-timeout",
                    "120", "--output-dir", str(tmp_path), env={"LLMBENCH_FAIL_RANK": "1@3"},
                    timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    report = only_report(tmp_path)
    assert report["status"] == "failed"
    assert report["error"].startswith("rank 1 (pid")
    assert "Summary" not in result.stdout


@pytest.mark.parametrize("quant", [[], ["--ipex-weight-only-quantization", "--weight-dtype",
                                          "INT8"]], ids=["fp32", "int8"])
def test_a_slice_refused_on_one_rank_sends_every_rank_to_stock(tmp_path, embedded_model_dir,
                                                               quant):
    """Experts of 8 units leave rank 1 none to take: only rank 1 refuses its slice, and every
    rank must then take the stock path together (one rank on each would wait for the other's
    collectives forever). With INT8 the ranks share each weight's clipping search through an
    all-reduce, so rank 1 goes on quantizing every layer before it says no."""
    model = make_tiny_model("deepseek_v2", tmp_path / "model", embedded_model_dir,
                            moe_intermediate_size=8)
    result = launch("-m", str(model), "--backend", "native", *RUN[:3], "2", *RUN[4:], *quant,
                    "--output-dir", str(tmp_path / "out"), timeout=600, launcher="direct")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is too narrow for 2 ranks" in result.stdout
    report = only_report(tmp_path / "out")
    assert report["backend"]["name"] == "deepspeed-autotp"
    assert report["distributed"]["ranks_agree"] is True


def test_attention_split_shares_out_heads():
    """Which KV and query heads each rank takes (no model: the arithmetic alone)."""
    from types import SimpleNamespace

    from llmbench.backends.blocks import Unsupported
    from llmbench.backends.tensor_parallel import attention_split, check, kv_map

    def native(heads, kv_heads, latent=None):
        return SimpleNamespace(heads=heads, kv_heads=kv_heads,
                               block=SimpleNamespace(latent=latent))

    # (first KV head, KV heads, first query head, query heads) per rank
    # SmolLM2: 5 + 4 query heads, KV head 1 on both ranks; the local KV head of each query head
    assert attention_split(native(9, 3), 2, False) == [(0, 2, 0, 5), (1, 2, 5, 4)]
    assert [kv_map(native(9, 3), s) for s in attention_split(native(9, 3), 2, False)] == [
        [0, 0, 0, 1, 1], [0, 1, 1, 1]]
    # whole groups where the heads allow: the usual grouping, no map
    assert attention_split(native(8, 4), 2, False) == [(0, 2, 0, 4), (2, 2, 4, 4)]
    assert kv_map(native(8, 4), (0, 2, 0, 4)) is None
    # cross-attention keeps whole KV heads per rank (2 + 1 here)
    assert attention_split(native(9, 3), 2, True) == [(0, 2, 0, 6), (2, 1, 6, 3)]
    # MQA: replicated
    assert attention_split(native(4, 1), 2, False) == [(0, 1, 0, 2), (0, 1, 2, 2)]
    assert attention_split(native(8, 2), 4, False) == [(0, 1, 0, 2), (0, 1, 2, 2),
                                                       (1, 1, 4, 2), (1, 1, 6, 2)]
    assert attention_split(native(4, 4, latent=object()), 2, False) == [(0, 1, 0, 2),
                                                                        (0, 1, 2, 2)]
    # Falcon-7B
    assert attention_split(native(71, 1), 2, False) == [(0, 1, 0, 36), (0, 1, 36, 35)]
    # INT4 groups of 128 in o over 64-wide heads: boundaries at even heads (4 + 5, not 5 + 4)
    assert attention_split(native(9, 3), 2, False, 2) == [(0, 2, 0, 4), (1, 2, 4, 5)]
    assert attention_split(native(3, 3), 2, False, 2) == [(0, 2, 0, 2), (2, 1, 2, 1)]
    assert attention_split(native(2, 2), 2, False, 2) == [(0, 1, 0, 1), (1, 1, 1, 1)]  # too few
    for heads, kv_heads, world in ((4, 3, 6), (8, 3, 4), (2, 1, 4)):
        with pytest.raises(Unsupported):
            check(native(heads, kv_heads), world)
    check(native(4, 1), 2)
    check(native(71, 1), 2)
