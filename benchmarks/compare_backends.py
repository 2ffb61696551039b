#!/usr/bin/env python3
"""Every backend and precision side by side, in one run, on the same model, prompt, tokens and
threads: first-token and next-token latency, tokens/s, weight-read GB/s, % of the machine's read
bandwidth (measured here, first), and the ratio to stock fp32.

Run by hand on a quiet machine (nothing else busy: two cores measure contention otherwise):

    python benchmarks/compare_backends.py                      # embedded SmolLM2-135M
    python benchmarks/compare_backends.py --model tinyllama-1b # random weights, TinyLlama shape
    python benchmarks/compare_backends.py --model gptj-shape   # any FAMILY-shape in FAMILY_SHAPES

Writes the table as markdown and JSON into --output-dir (benchmarks/results by default), as
compare-MODEL-MACHINE.md/.json: one baseline per model and kind of machine, replaced by the next
run (git keeps the earlier ones).

Each config runs in a process of its own (--same-process: all in this one), so that no config
measures the memory another one left behind: native bf16 decode measured 13.8 ms/token alone
and 15.3 ms right after native fp32 in the same process.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llmbench import kernels  # noqa: E402
from llmbench.atomic import save_png, write_text  # noqa: E402
from llmbench.backends import prepare  # noqa: E402
from llmbench.bench import run_benchmark  # noqa: E402
from llmbench.cli.flags import Parser, non_negative_int, positive_int  # noqa: E402
from llmbench.environment import (  # noqa: E402
    HELD_ISA_ENV,
    collect_environment,
    held_isa_text,
    hold_isa,
    machine_slug,
)
from llmbench.memory import huge_page_buffer, huge_page_bytes  # noqa: E402
from llmbench.models import cache_root, load_model  # noqa: E402
from llmbench.prompts import Prompt, build_prompt  # noqa: E402
from llmbench.report import compute_statistics  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import llamacpp  # noqa: E402

# (name, backend, dtype, extra prepare() settings)
CONFIGS = {
    "stock-fp32": ("stock", "float32", {}),
    "stock-bf16": ("stock", "bfloat16", {}),
    "native-fp32": ("native", "float32", {}),
    "native-bf16": ("native", "bfloat16", {}),
    "native-bf16-fp8kv": ("native", "bfloat16", {"kv_cache_dtype": "fp8_e5m2"}),
    # The same backend with every decode step as torch ops instead of the compiled step
    # (llmbench/kernels/csrc/decode_step.cpp): what per-op Python/dispatch overhead costs.
    "native-fp32-torchstep": ("native", "float32", {"compiled_step": False}),
    "native-bf16-torchstep": ("native", "bfloat16", {"compiled_step": False}),
    "ipex-fp32": ("ipex", "float32", {}),
    # Weight-only quantization (llmbench.quant, round to nearest) on our int8 / int4 kernels; the
    # 4-bit schemes keep lm_head at int8. "woq" is (weight dtype, group size, symmetric[,
    # lowp mode[, act quant mode]]); -lowp is --lowp-mode INT8, activations in int8 per row
    # symmetric unless the config names another --act-quant-mode.
    "native-int8": ("native", "float32", {"woq": ("INT8", -1, True)}),
    "native-int8-lowp": ("native", "float32", {"woq": ("INT8", -1, True, "INT8")}),
    "native-int8-lowp-icblock": ("native", "float32",
                                 {"woq": ("INT8", -1, True, "INT8", "PER_BATCH_IC_BLOCK")}),
    "native-int4-lowp": ("native", "float32", {"woq": ("INT4", 128, False, "INT8")}),
    "native-int4": ("native", "float32", {"woq": ("INT4", 128, False)}),
    "native-int4-g32": ("native", "float32", {"woq": ("INT4", 32, False)}),
    "stock-int8": ("stock", "float32", {"woq": ("INT8", -1, True)}),
}
# TinyLlama-1.1B's shape, random weights: big enough that per-token overheads don't hide the
# kernels. Its vocab (32000) is smaller than the SmolLM2 tokenizer used for the prompt, so the
# prompt's ids are taken modulo the vocab.
TINYLLAMA_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)


def read_bandwidth_gb_per_s(gib: float = 1.0, repeats: int = 7) -> dict[str, float]:
    """How fast this machine streams a large tensor from memory, medians over `repeats`:
    summing an fp32 tensor (torch.sum), and a batch-1 fp32 linear over a weight of the same size
    through our kernels (when built; with software prefetch, which one core of some CPUs needs
    to keep enough reads in flight); each on torch's ordinary allocation and, where the OS puts
    it there, on 2 MiB pages as the native backend's weights are (llmbench.memory). The floor
    uses the fastest, so that no config can beat its floor by reading smarter than the probe
    did."""
    nbytes = int(gib * 2**30)
    rates = _probe_rates(torch.ones(nbytes // 4), repeats, "")
    buffer, _ = huge_page_buffer(nbytes)
    data = buffer.view(torch.float32).fill_(1.0)  # pages are placed on first touch
    if huge_page_bytes(buffer):  # else the OS gave ordinary pages: measured above already
        rates.update(_probe_rates(data, repeats, ", 2 MiB pages"))
    return rates


def _probe_rates(data: torch.Tensor, repeats: int, label: str) -> dict[str, float]:
    probes = {"torch.sum": lambda: data.sum()}
    if kernels.available():
        weight = data.view(-1, 4096)
        x = torch.ones(4096)
        probes["kernels GEMV"] = lambda: kernels.linear_f32(x, weight)
    rates = {}
    for name, probe in probes.items():
        probe()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            probe()
            times.append(time.perf_counter() - start)
        rates[name + label] = data.numel() * 4 / statistics.median(times) / 1e9
    return rates


# A real model's layer shape per family (hidden size, heads, MLP width, vocab of the model named;
# the smallest of that family in the validated-model tables where we know it), random weights,
# with as many layers as make about FAMILY_SHAPE_BYTES of fp32 weights (at least one: a 7B-class
# layer alone is 0.8 GB). The embedding and lm_head come on top.
FAMILY_SHAPE_BYTES = 0.5e9
FAMILY_SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gptj": ("GPT-J-6B", "gptj", dict(n_embd=4096, n_head=16, n_inner=16384, rotary_dim=64,
                                       vocab_size=50400, n_positions=2048)),
    "gpt_neox": ("Dolly-v2-3B / Pythia-2.8B", "gpt_neox", dict(
        hidden_size=2560, num_attention_heads=32, intermediate_size=10240, vocab_size=50280,
        rotary_pct=0.25, max_position_embeddings=2048)),
    "falcon": ("Falcon-7B", "falcon", dict(hidden_size=4544, num_attention_heads=71,
                                           multi_query=True, parallel_attn=True, bias=False,
                                           vocab_size=65024, ffn_hidden_size=18176)),
    "falcon40b": ("Falcon-40B (new decoder architecture), 4544 wide", "falcon", dict(
        hidden_size=4544, num_attention_heads=71, num_kv_heads=1,
        new_decoder_architecture=True, bias=False, vocab_size=65024, ffn_hidden_size=18176)),
    "opt": ("OPT-1.3B", "opt", dict(hidden_size=2048, word_embed_proj_dim=2048,
                                    num_attention_heads=32, ffn_dim=8192, vocab_size=50272,
                                    max_position_embeddings=2048)),
    "bloom": ("BLOOM-1b7", "bloom", dict(hidden_size=2048, n_head=16, vocab_size=250880)),
    "codegen": ("CodeGen-2B", "codegen", dict(n_embd=2560, n_head=32, n_inner=10240,
                                              rotary_dim=64, vocab_size=51200, n_positions=2048,
                                              n_ctx=2048)),
    "gpt_bigcode": ("StarCoder", "gpt_bigcode", dict(n_embd=6144, n_head=48, n_inner=24576,
                                                     multi_query=True, vocab_size=49152,
                                                     n_positions=8192)),
    "mpt": ("MPT-7B", "mpt", dict(d_model=4096, n_heads=32, expansion_ratio=4,
                                  vocab_size=50432, max_seq_len=2048)),
    "stablelm": ("StableLM-2-1.6B", "stablelm", dict(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=5632, vocab_size=100352, partial_rotary_factor=0.25,
        use_qkv_bias=True, max_position_embeddings=4096)),
    "phi": ("Phi-2", "phi", dict(hidden_size=2560, num_attention_heads=32,
                                 intermediate_size=10240, vocab_size=51200,
                                 partial_rotary_factor=0.4, max_position_embeddings=2048)),
    # 8 of the real 64 routed experts, every layer sparse: a token reads the router, its top 6
    # experts and the 2 shared ones either way, so the per-token bytes are the real model's.
    "deepseek_v2": ("DeepSeek-V2-Lite (8 of 64 routed experts)", "deepseek_v2", dict(
        hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        moe_intermediate_size=1408, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=0, intermediate_size=10944,
        vocab_size=102400, max_position_embeddings=4096)),
    # Both of 2 experts: a token reads 2 experts of Mixtral-8x7B's layer either way.
    "mixtral": ("Mixtral-8x7B (2 of 8 experts)", "mixtral", dict(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_local_experts=2, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=4096)),
    # Jamba-v0.1's widths in two layers, the two kinds a token of it passes through (its 8-layer
    # period has one attention + dense MLP layer among Mamba layers, every other MLP 2-of-16
    # experts): attention + dense MLP, then Mamba + experts, both of 2 experts routed.
    # 3.8 GB of fp32 weights a token; the layer count is fixed here, not from the byte budget.
    "jamba": ("Jamba-v0.1 (attention + dense, Mamba + 2 of 16 experts)", "jamba", dict(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_experts=2, num_experts_per_tok=2, vocab_size=65536,
        num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
        mamba_dt_rank=256, use_mamba_kernels=False, max_position_embeddings=4096)),
    "t5": ("Flan-T5-XL", "t5", dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32,
                                    vocab_size=32128, feed_forward_proj="gated-gelu",
                                    tie_word_embeddings=False)),
}


def random_family_shape(key: str, tokenizer_dir: Path) -> Path:
    """Build (once, cached) a random-weight model with FAMILY_SHAPES[key]'s layer shape."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    real, model_type, shape = FAMILY_SHAPES[key]
    auto_class = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    folder = cache_root() / f"random-{key}-shape"
    if (folder / "config.json").is_file():
        fit_tokenizer(folder, shape["vocab_size"])
        return folder
    layers_key = _layers_key(model_type)
    if layers_key in shape:  # a shape whose layers differ in kind names its own layer count
        layers = shape[layers_key]
        print(f"building a random-weight {real}-shaped {model_type} model, {layers} layers "
              "(once)...", flush=True)
    else:
        one_layer = auto_class.from_config(AutoConfig.for_model(
            model_type, **shape, **{layers_key: 1}), dtype=torch.float32)
        outside = {id(p) for name, p in one_layer.named_parameters()
                   if not any(f".{key}.0." in name for key in ("h", "layers", "blocks", "block"))}
        layer_bytes = sum(p.numel() * 4 for p in one_layer.parameters() if id(p) not in outside)
        layers = max(1, round(FAMILY_SHAPE_BYTES / layer_bytes))
        del one_layer
        print(f"building a random-weight {real}-shaped {model_type} model, {layers} layer(s) of "
              f"{layer_bytes / 1e9:.2f} GB (once)...", flush=True)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**shape, layers_key: layers},
                                  bos_token_id=1, eos_token_id=2)
    auto_class.from_config(config, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    fit_tokenizer(folder, shape["vocab_size"])
    return folder


def fit_tokenizer(folder: Path, vocab_size: int) -> None:
    """A shape whose vocabulary is smaller than the SmolLM2 tokenizer's (T5's 32128, Mixtral's
    32000) gets a word-level tokenizer over prompt.json's words instead, so that run.py, which
    tokenizes the prompt itself (benchmarks/native_tp.py runs it), never feeds the embedding an
    id past its end. (This script's own runs fold the ids into the vocabulary: measure_loaded.)"""
    import json

    tokenizer_file = folder / "tokenizer.json"
    if len(json.loads(tokenizer_file.read_text())["model"]["vocab"]) <= vocab_size:
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = json.loads((ROOT / "prompt.json").read_text())
    words = sorted({w for text in _strings(texts) for w in text.split()})
    specials = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2 as the shapes' configs say
    vocab = {token: i for i, token in enumerate(specials + words[:vocab_size - len(specials)])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    print(f"{folder.name}: word-level tokenizer of {len(vocab)} prompt.json words (its "
          f"vocabulary of {vocab_size} is smaller than SmolLM2's)", flush=True)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _layers_key(model_type: str) -> str:
    return {"gptj": "n_layer", "codegen": "n_layer", "gpt_bigcode": "n_layer", "bloom": "n_layer",
            "mpt": "n_layers", "t5": "num_layers"}.get(model_type, "num_hidden_layers")


def random_tinyllama(tokenizer_dir: Path) -> Path:
    """Build (once, cached) a random-weight model of TinyLlama-1.1B's shape."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = cache_root() / "random-tinyllama-1.1b"
    if (folder / "config.json").is_file():
        return folder
    print("building a random-weight TinyLlama-1.1B-shaped model (once)...", flush=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA_SHAPE, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def resolve_model(name: str) -> str | None:
    if name == "smollm2":
        return None
    if name == "tinyllama-1b" or name.removesuffix("-shape") in FAMILY_SHAPES:
        from llmbench.models import materialize_gguf, resolve_source

        tokenizer_dir = Path(materialize_gguf(resolve_source(None))[0].path)
        if name == "tinyllama-1b":
            return str(random_tinyllama(tokenizer_dir))
        return str(random_family_shape(name.removesuffix("-shape"), tokenizer_dir))
    return name  # any -m value


def load_config(model_arg: str | None, config_name: str) -> tuple[Any, Any]:
    """The model loaded and prepared as CONFIGS[config_name] says: (loaded, prepared)."""
    backend, dtype, extra = CONFIGS[config_name]
    loaded = load_model(model_arg, dtype)
    extra = dict(extra)
    woq = extra.pop("woq", None)
    compiled_step = extra.pop("compiled_step", True)
    if woq is not None:
        from llmbench.quant import apply
        from llmbench.quant.scheme import Scheme

        scheme = Scheme("woq", *woq[:4], **({"act_quant_mode": woq[4]} if len(woq) > 4 else {}))
        prepared = apply.prepare_quantized(loaded, apply.quantize_rtn(loaded.model, scheme),
                                           backend=backend, dtype=dtype, scheme=scheme,
                                           kv_cache_dtype=extra.get("kv_cache_dtype", "auto"))
    else:
        prepared = prepare(loaded.model, backend=backend, dtype=dtype,
                           family=loaded.family.model_type, **extra)
    loaded.model = prepared.model
    if hasattr(prepared.model, "use_compiled_step"):
        prepared.model.use_compiled_step = compiled_step
    return loaded, prepared


def measure_llamacpp(model_arg: str | None, config_name: str, args: argparse.Namespace
                     ) -> dict[str, Any]:
    """A llamacpp-* config: the embedded GGUF's weights in llama.cpp, same prompt ids."""
    import llamacpp

    from llmbench.models import embedded_gguf_path

    if model_arg is not None:
        raise RuntimeError("llama.cpp rows are measured on the embedded model (--model smollm2)")
    kind, dtype = llamacpp.CONFIGS[config_name]
    source = embedded_gguf_path()
    model_file = llamacpp.converted(source, cache_root() / "llamacpp", kind)
    loaded = load_model(None, "float32")
    prompt = build_prompt(loaded.tokenizer, loaded.config, loaded.family.model_type,
                          input_tokens=args.input_tokens, prompt_text=None, batch_size=1,
                          max_new_tokens=args.max_new_tokens)
    ids = prompt.input_ids[0].tolist()
    timed = llamacpp.measure(model_file, ids, args.max_new_tokens, args.num_iter,
                             args.num_warmup, torch.get_num_threads())
    weight_bytes = llamacpp.tensor_bytes(model_file)
    next_s = timed["next_token_ms"] / 1000
    total_s = timed["first_token_ms"] / 1000 + next_s * (args.max_new_tokens - 1)
    return {
        "config": config_name, "backend": "llama.cpp", "dtype": dtype,
        "backend_details": {"kernels": f"llama-cpp-python {timed['version']}, {kind} GGUF "
                            "from the embedded model's dequantized weights"},
        "first_token_ms": timed["first_token_ms"], "next_token_ms": timed["next_token_ms"],
        "next_token_mean_ms": timed["next_token_mean_ms"],
        "tokens_per_s": args.max_new_tokens / total_s, "weight_bytes": weight_bytes,
        "gb_per_s": weight_bytes / next_s / 1e9,
        "text": loaded.tokenizer.decode(timed["tokens"])[:80],
    }


def measure(model_arg: str | None, config_name: str, args: argparse.Namespace) -> dict[str, Any]:
    if config_name in llamacpp.CONFIGS:
        return measure_llamacpp(model_arg, config_name, args)
    loaded, prepared = load_config(model_arg, config_name)
    result = measure_loaded(loaded, prepared, config_name, args)
    del loaded, prepared
    gc.collect()
    return result


def measure_loaded(loaded: Any, prepared: Any, config_name: str, args: argparse.Namespace,
                   batch_size: int = 1) -> dict[str, Any]:
    """One config's first/next-token latencies on `batch_size` copies of the prompt."""
    dtype = CONFIGS[config_name][1]
    runtime = getattr(prepared.model, "runtime_details", dict)()
    prompt = build_prompt(loaded.tokenizer, loaded.config, loaded.family.model_type,
                          input_tokens=args.input_tokens, prompt_text=None,
                          batch_size=batch_size, max_new_tokens=args.max_new_tokens)
    vocab = loaded.config.vocab_size
    prompt = Prompt(prompt.input_ids % vocab, prompt.attention_mask, prompt.text, prompt.tokens,
                    prompt.source)
    run = run_benchmark(prepared.model, loaded.tokenizer, prompt,
                        {"do_sample": False, "num_beams": 1,
                         "max_new_tokens": args.max_new_tokens,
                         "min_new_tokens": args.max_new_tokens},
                        seq2seq=loaded.family.seq2seq, num_iter=args.num_iter,
                        num_warmup=args.num_warmup,
                        token_latency=True, streaming=False, profile=False, seed=0)
    weight_bytes = prepared.details.get("weight_bytes_per_token", loaded.decode_weight_bytes)
    stats = compute_statistics(run, batch_size, weight_bytes)
    result = {
        "config": config_name, "backend": prepared.backend, "dtype": dtype,
        "backend_details": {**prepared.details, **runtime},
        "first_token_ms": stats["first_token_latency_s"]["p50"] * 1000,
        "next_token_ms": stats["next_token_latency_s"]["p50"] * 1000,
        "next_token_mean_ms": stats["next_token_latency_s"]["mean"] * 1000,
        "tokens_per_s": stats["generated_tokens_per_s"],
        "weight_bytes": weight_bytes,
        "gb_per_s": weight_bytes / stats["next_token_latency_s"]["p50"] / 1e9,
        "text": run.generated_text[0][:80],
    }
    if batch_size > 1:
        result["batch_size"] = batch_size
    return result


ROW_MARK = "compare_backends row: "


def measure_isolated(model_arg: str | None, config_name: str, args: argparse.Namespace
                     ) -> dict[str, Any]:
    """measure() in a child process of this script; its row comes back on stdout."""
    command = [sys.executable, __file__, "--one-config", config_name,
               "--model-path", model_arg or "", "--input-tokens", str(args.input_tokens),
               "--max-new-tokens", str(args.max_new_tokens), "--num-iter", str(args.num_iter),
               "--num-warmup", str(args.num_warmup)]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(ROW_MARK):
            return json.loads(line[len(ROW_MARK):])
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"config": config_name, "error": f"child exited {done.returncode}: {last}"[:120]}


def measure_or_error(model_arg: str | None, config_name: str, args: argparse.Namespace
                     ) -> dict[str, Any]:
    try:
        return measure(model_arg, config_name, args)
    except Exception as exc:  # e.g. ipex not importable: shown in the table, not hidden
        return {"config": config_name, "error": " ".join(str(exc).split())[:120]}


def llamacpp_peer(config: str) -> str:
    """The llama.cpp config of the same weight precision (int8: q8_0, every int4: q4_0)."""
    _, dtype, extra = CONFIGS.get(config, ("", "", {}))
    woq = extra.get("woq")
    if woq:
        return "llamacpp-q8_0" if woq[0] == "INT8" else "llamacpp-q4_0"
    return {"float32": "llamacpp-f32", "bfloat16": "llamacpp-bf16"}.get(dtype, "")


def table(rows: list[dict[str, Any]], bandwidth: float) -> str:
    base = next((r for r in rows if r["config"] == "stock-fp32"), None)
    peers = {r["config"]: r for r in rows if r["config"] in llamacpp.CONFIGS and "error" not in r}
    lines = ["| config | ran as | first token ms | next token ms | tokens/s | GB/s | % of read BW "
             "| floor ms | x floor | first vs stock fp32 | next vs stock fp32 "
             + ("| first vs llama.cpp | next vs llama.cpp |" if peers else "|"),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if peers else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | not run: {r['error']} |"
                         + " |" * (11 if peers else 9))
            continue
        floor_ms = r["weight_bytes"] / bandwidth / 1e6
        first = f"{base['first_token_ms'] / r['first_token_ms']:.2f}x" if base else "-"
        nxt = f"{base['next_token_ms'] / r['next_token_ms']:.2f}x" if base else "-"
        if peers:  # > 1: faster than llama.cpp at the same weight precision
            peer = peers.get(llamacpp_peer(r["config"]))
            if peer and r["backend"] != "llama.cpp":
                nxt += (f" | {peer['first_token_ms'] / r['first_token_ms']:.2f}x | "
                        f"{peer['next_token_ms'] / r['next_token_ms']:.2f}x")
            else:
                nxt += " | - | -"
        details = r["backend_details"]
        how = [details.get("kernels", "transformers")]
        step = details.get("decode_step", "")
        if step:
            how.append("compiled step" if step.startswith("compiled") else "python step")
        placement = details.get("weight_placement") or {}
        if placement.get("arena_bytes"):
            share = (placement.get("huge_page_bytes") or 0) / placement["arena_bytes"]
            how.append(f"weights {share:.0%} on 2 MiB pages")
        ran_as = f"{r['backend']} ({', '.join(how)})"
        lines.append(f"| {r['config']} | {ran_as} | {r['first_token_ms']:.1f} | "
                     f"{r['next_token_ms']:.2f} | {r['tokens_per_s']:.1f} | {r['gb_per_s']:.1f} | "
                     f"{100 * r['gb_per_s'] / bandwidth:.0f}% | {floor_ms:.2f} | "
                     f"{r['next_token_ms'] / floor_ms:.2f} | {first} | {nxt} |")
    return "\n".join(lines)


def plot_bars(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """First-token and next-token latency per config, side by side (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(ok) + 1.5), sharey=True)
    names = [r["config"] for r in ok]
    for ax, key, label in ((axes[0], "first_token_ms", "first token ms"),
                           (axes[1], "next_token_ms", "next token ms")):
        ax.barh(names, [r[key] for r in ok],
                color=["tab:orange" if r["backend"] == "llama.cpp" else
                       "tab:gray" if r["backend"] == "stock" else "tab:blue" for r in ok])
        ax.set_xlabel(label)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
    return path


def main() -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (embedded), tinyllama-1b (random weights), FAMILY-shape "
                        f"(random weights, a real model's layer shape; FAMILY one of "
                        f"{', '.join(FAMILY_SHAPES)}), or any -m value")
    default_configs = ",".join(c for c in CONFIGS if c != "native-bf16-fp8kv")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, from: {', '.join(CONFIGS)}, "
                        f"{', '.join(llamacpp.CONFIGS)} (llama.cpp rows: only where "
                        "llama-cpp-python is installed, on --model smollm2; by default then)")
    parser.add_argument("--input-tokens", type=positive_int, default=32)
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--num-iter", type=positive_int, default=5)
    parser.add_argument("--num-warmup", type=non_negative_int, default=1)
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--same-process", action="store_true",
                        help="measure every config in this process instead of one child each")
    parser.add_argument("--plot", action="store_true",
                        help="also write a PNG: first- and next-token bars per config")
    parser.add_argument("--isa", choices=sorted(HELD_ISA_ENV),
                        help="hold every library to this ISA, this process and every config "
                        "(llmbench.environment.HELD_ISA_ENV; llama.cpp rows run the build on "
                        "PYTHONPATH, see docs/performance.md)")
    parser.add_argument("--one-config", help=argparse.SUPPRESS)  # a child's single config
    parser.add_argument("--model-path", help=argparse.SUPPRESS)  # the child's resolved model
    args = parser.parse_args()
    hold_isa(args.isa)
    if args.one_config:
        row = measure_or_error(args.model_path or None, args.one_config, args)
        print(ROW_MARK + json.dumps(row, default=str), flush=True)
        return 0
    if args.configs is None:
        with_llamacpp = llamacpp.available() and args.model == "smollm2"
        args.configs = default_configs + (",".join(["", *llamacpp.CONFIGS])
                                          if with_llamacpp else "")
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS and c not in llamacpp.CONFIGS]
    if unknown:
        parser.error(f"unknown configs: {', '.join(unknown)}")

    model_arg = resolve_model(args.model)
    probes = read_bandwidth_gb_per_s()
    bandwidth = max(probes.values())
    probe_text = ", ".join(f"{name} {rate:.1f}" for name, rate in probes.items())
    print(f"read bandwidth (GB/s, {torch.get_num_threads()} threads): {probe_text}", flush=True)
    rows = []
    for name in configs:
        if args.same_process:
            row = measure_or_error(model_arg, name, args)
        else:
            row = measure_isolated(model_arg, name, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "backend_details"}), flush=True)
    markdown = (f"# compare_backends: {args.model}, {args.input_tokens} in / "
                f"{args.max_new_tokens} out, greedy, batch 1, {torch.get_num_threads()} threads\n\n"
                f"Read bandwidth measured first: {bandwidth:.1f} GB/s, the faster of "
                f"{probe_text} GB/s. Each config in "
                f"{'this one process' if args.same_process else 'a process of its own'}. "
                "Latencies are medians "
                f"over {args.num_iter} iterations after {args.num_warmup} warm-up. floor = "
                "weight bytes per token / read bandwidth."
                + (f" {held_isa_text(args.isa)}." if args.isa else "")
                + "\n\n" + table(rows, bandwidth) + "\n")
    print(markdown)
    out = Path(args.output_dir)
    held = f"-{args.isa}" if args.isa else ""
    # replaces the baseline of the same model, machine and held ISA
    stem = f"compare-{args.model.replace('/', '_')}-{machine_slug()}{held}"
    write_text(out / f"{stem}.md", markdown)
    write_text(out / f"{stem}.json", json.dumps(
        {"model": args.model, "bandwidth_gb_per_s": bandwidth,
         "bandwidth_probes_gb_per_s": probes, "rows": rows,
         "settings": vars(args), "environment": collect_environment()}, indent=1, default=str))
    print(f"written: {out / stem}.md and .json")
    if args.plot:
        print(f"written: {plot_bars(rows, out / f'{stem}.png', markdown.splitlines()[0][2:])}")
    failed = [r for r in rows if r.get("error")]
    if len(failed) == len(rows):  # written all the same: the table says why each failed
        print(f"error: compare_backends: no config ran ({failed[0]['error']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
