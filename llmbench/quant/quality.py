"""What quantization costs in quality, measured against the float model on local texts:
perplexity on prompt.json's texts and greedy agreement (index of the first differing token) on
prompts cut from them. Both run the Hugging Face forward, with swapped modules when quantized."""

from __future__ import annotations

import math
from typing import Any

import torch

from llmbench.prompts import load_prompt_texts

PPL_TOKENS = 256  # tokens of each prompt.json text scored for perplexity
PROMPT_TOKENS = 32
PROMPT_OFFSETS = (0, 64, 128, 192)  # four prompts per text, in one batch
GREEDY_TOKENS = 16


def _text_ids(tokenizer: Any) -> dict[str, list[int]]:
    texts = load_prompt_texts()["texts"]
    return {key: tokenizer(text).input_ids for key, text in sorted(texts.items())}


def perplexity(model: Any, tokenizer: Any, max_tokens: int = PPL_TOKENS) -> float:
    """exp(mean next-token negative log-likelihood) over the first max_tokens of each text,
    scored in one batched forward pass."""
    ids = [t[:max_tokens] for t in _text_ids(tokenizer).values()]
    length = min(len(t) for t in ids)
    return perplexity_of_ids(model, torch.tensor([t[:length] for t in ids]))


def perplexity_of_ids(model: Any, input_ids: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood) of a [batch, tokens] tensor, one forward."""
    with torch.inference_mode():
        logits = model(input_ids=input_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             input_ids[:, 1:].reshape(-1))
    return math.exp(float(loss))


def quality_prompts(tokenizer: Any) -> torch.Tensor:
    """[prompts, PROMPT_TOKENS]: windows of each prompt.json text."""
    prompts = []
    for ids in _text_ids(tokenizer).values():
        for offset in PROMPT_OFFSETS:
            window = ids[offset: offset + PROMPT_TOKENS]
            if len(window) == PROMPT_TOKENS:
                prompts.append(window)
    return torch.tensor(prompts)


def greedy_tokens(model: Any, tokenizer: Any, new_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    """The float model's greedy continuations of every quality prompt (one batched generate)."""
    ids = quality_prompts(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   do_sample=False, num_beams=1, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, pad_token_id=pad)
    return generated[:, ids.shape[1]:].tolist()


def agreement(model: Any, tokenizer: Any, reference_tokens: list[list[int]]) -> list[int]:
    """Index of the first token where `model`'s greedy continuation would leave the reference's,
    found in one teacher-forced forward pass: until the first disagreement both greedy runs see
    the same tokens, so the first position whose argmax differs is where they part."""
    ids = quality_prompts(tokenizer)
    ref = torch.tensor(reference_tokens)
    with torch.inference_mode():
        logits = model(input_ids=torch.cat((ids, ref[:, :-1]), dim=1)).logits
    picked = logits[:, ids.shape[1] - 1:].argmax(dim=-1)
    diffs = []
    for row_picked, row_ref in zip(picked.tolist(), reference_tokens, strict=True):
        diffs.append(first_difference(row_ref, row_picked))
    return diffs


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token; len(a) when all agree."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


def measure_reference(model: Any, tokenizer: Any) -> dict[str, Any]:
    return {"perplexity": perplexity(model, tokenizer),
            "greedy_tokens": greedy_tokens(model, tokenizer)}


def compare(reference: dict[str, Any], model: Any, tokenizer: Any) -> dict[str, Any]:
    """Quality of `model` (quantized) against the float reference measured before."""
    diffs = agreement(model, tokenizer, reference["greedy_tokens"])
    ppl_ref, ppl_q = reference["perplexity"], perplexity(model, tokenizer)
    return {
        "perplexity_text": f"prompt.json texts, first {PPL_TOKENS} tokens each",
        "perplexity_float": ppl_ref,
        "perplexity_quantized": ppl_q,
        "perplexity_change": ppl_q / ppl_ref - 1.0,
        "greedy_prompts": len(diffs),
        "greedy_new_tokens": GREEDY_TOKENS,
        "first_differing_token": diffs,  # == greedy_new_tokens: all agree
        "prompts_fully_agreeing": sum(d == GREEDY_TOKENS for d in diffs),
    }


def summary(result: dict[str, Any]) -> str:
    return (f"perplexity {result['perplexity_float']:.3f} -> {result['perplexity_quantized']:.3f}"
            f" ({100 * result['perplexity_change']:+.2f}%); greedy: "
            f"{result['prompts_fully_agreeing']}/{result['greedy_prompts']} prompts agree on all "
            f"{result['greedy_new_tokens']} tokens, first differing token "
            f"{result['first_differing_token']}")
