"""Prompts of an exact token length for whatever tokenizer the model has.

prompt.json (repo root) holds long texts of our own and which text each family reads. A prompt
of N tokens is the first N token ids of that text, repeated as needed: it is built as ids, not
as text, because decoding and re-encoding a truncated text does not always give N tokens back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmbench.errors import UserError

PROMPT_FILE = Path(__file__).resolve().parent.parent / "prompt.json"
DEFAULT_INPUT_TOKENS = 32


@dataclass
class Prompt:
    input_ids: Any  # torch.LongTensor [batch, tokens]
    attention_mask: Any
    text: str  # what the first row says, for the report
    tokens: int
    source: str  # "prompt.json:<text key>" or "--prompt"
    # Model inputs besides the ids: what a multimodal processor made (pixel_values,
    # input_features, ...), passed to generate() as they are.
    extra_inputs: dict[str, Any] = field(default_factory=dict)
    # Where the new tokens start in generate()'s output, when the usual rule does not hold (a
    # Whisper output holds the new tokens only); None: after the prompt, or after the decoder
    # start token of a seq2seq model.
    output_offset: int | None = None


def load_prompt_texts(path: Path = PROMPT_FILE) -> dict[str, Any]:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


def text_for_family(model_type: str, prompts: dict[str, Any]) -> tuple[str, str]:
    family_text = prompts["family_text"]
    key = family_text.get(model_type, family_text["default"])
    return key, prompts["texts"][key]


def context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                 "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None  # e.g. T5's relative positions: no hard limit


def build_prompt(tokenizer: Any, config: Any, model_type: str, *, input_tokens: int | None,
                 prompt_text: str | None, batch_size: int, max_new_tokens: int,
                 seq2seq: bool = False) -> Prompt:
    import torch

    if prompt_text is not None and input_tokens is not None:
        raise UserError("--prompt and --input-tokens both set the prompt: pass only one")
    if prompt_text is not None:
        ids = tokenizer(prompt_text).input_ids
        if not ids:
            raise UserError("--prompt is empty after tokenization")
        source, text = "--prompt", prompt_text
    else:
        wanted = input_tokens or DEFAULT_INPUT_TOKENS
        key, base_text = text_for_family(model_type, load_prompt_texts())
        base_ids = tokenizer(base_text).input_ids
        # Special tokens (BOS) are kept at the start only; repeats continue with plain text.
        body_ids = tokenizer(base_text, add_special_tokens=False).input_ids
        ids = list(base_ids)
        while len(ids) < wanted:
            ids += body_ids
        ids = ids[:wanted]
        source, text = f"prompt.json:{key}", tokenizer.decode(ids, skip_special_tokens=True)
    limit = context_length(config)
    # The decoder of a seq2seq model sees only the generated tokens, not the prompt.
    needed = max(len(ids), max_new_tokens) if seq2seq else len(ids) + max_new_tokens
    if limit is not None and needed > limit:
        raise UserError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the "
                        f"model's context of {limit} tokens")
    input_ids = torch.tensor([ids] * batch_size, dtype=torch.long)
    return Prompt(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), text=text,
                  tokens=len(ids), source=source)
