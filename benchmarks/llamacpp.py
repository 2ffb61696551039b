"""llama.cpp rows for compare_backends (optional: only where llama-cpp-python is installed; it is
never a dependency of llmbench).

The embedded model is a Q4_1 GGUF. llmbench measures the weights transformers dequantizes from
it, so llama.cpp gets the same numbers: every tensor dequantized to an f32 GGUF (the file's own
metadata and tokenizer copied), then llama.cpp's own quantizer makes bf16 / q8_0 / q4_0 from that.
Converted files are cached next to llmbench's converted model. Timing mirrors llmbench's: the
prompt's ids as one eval (first token = prompt eval + the argmax of its logits), then one eval per
generated token, greedy; warm-up iterations excluded, medians.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

# config name -> (llama.cpp file type name, the dtype column's value)
CONFIGS = {
    "llamacpp-f32": ("f32", "float32"),
    "llamacpp-bf16": ("bf16", "bfloat16"),
    "llamacpp-q8_0": ("q8_0", "int8 (q8_0)"),
    "llamacpp-q4_0": ("q4_0", "int4 (q4_0)"),
}
_FTYPES = {"f32": "LLAMA_FTYPE_ALL_F32", "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
           "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def f32_copy(source: Path, target: Path) -> Path:
    """`source` GGUF with every tensor dequantized to f32 (metadata copied) at `target`."""
    import gguf

    if target.exists():
        return target
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                               "general.quantization_version"):
            continue
        value_type = field.types[0]
        sub_type = field.types[1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)
    return target


def converted(source: Path, cache: Path, kind: str) -> Path:
    """The model as llama.cpp file type `kind`, made once and cached."""
    import llama_cpp

    cache.mkdir(parents=True, exist_ok=True)
    f32 = f32_copy(source, cache / f"{source.stem}.f32.gguf")
    if kind == "f32":
        return f32
    target = cache / f"{source.stem}.{kind}.gguf"
    if not target.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, _FTYPES[kind])
        params.nthread = 0  # all cores
        partial = target.with_suffix(".partial")
        status = llama_cpp.llama_model_quantize(str(f32).encode(), str(partial).encode(),
                                                ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed ({status})")
        partial.replace(target)
    return target


def tensor_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def measure(model_file: Path, prompt_ids: list[int], new_tokens: int, num_iter: int,
            num_warmup: int, threads: int) -> dict[str, Any]:
    """First-token and next-token latencies (ms, medians) and the greedy tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_file), n_ctx=len(prompt_ids) + new_tokens + 8,
                          n_batch=len(prompt_ids) + new_tokens + 8, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def greedy() -> int:
        # the last position's logits straight from the context: llm.scores is only filled
        # with logits_all=True (which would compute them for every prompt position), and
        # read as zeros it made every "greedy" token id 0 here until 2026-12-07
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    firsts, nexts, tokens = [], [], []
    for iteration in range(num_warmup + num_iter):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids)
        token = greedy()
        first = time.perf_counter() - start
        steps, tokens = [], [token]
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            llm.eval([token])
            token = greedy()
            steps.append(time.perf_counter() - start)
            tokens.append(token)
        if iteration >= num_warmup:
            firsts.append(first)
            nexts.extend(steps)
    return {"first_token_ms": statistics.median(firsts) * 1000,
            "next_token_ms": statistics.median(nexts) * 1000 if nexts else float("nan"),
            "next_token_mean_ms": statistics.mean(nexts) * 1000 if nexts else float("nan"),
            "tokens": tokens, "version": llama_cpp.__version__}
