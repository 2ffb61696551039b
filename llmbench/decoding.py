"""Decoding settings: greedy, beam or sampling, with a fixed number of new tokens.

Output length is pinned (min_new_tokens == max_new_tokens) so every iteration generates exactly
the tokens asked for, whatever the model would say about end-of-sequence: a latency over 32
tokens is a latency over 32 tokens.
"""

from __future__ import annotations

import ast
from typing import Any

from llmbench.errors import UserError

# Set through their own flags, so --generation-config can't contradict them.
RESERVED_KEYS = {"max_new_tokens": "--max-new-tokens", "min_new_tokens": "--max-new-tokens",
                 "max_length": "--max-new-tokens", "min_length": "--max-new-tokens"}


def parse_generation_config(text: str | None) -> dict[str, Any]:
    """'temperature=0.7,top_k=50,do_sample=True' -> {'temperature': 0.7, ...}."""
    from transformers import GenerationConfig

    if not text:
        return {}
    known = GenerationConfig().to_dict()
    settings: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--generation-config expects key=value pairs, got {item!r}")
        if key in RESERVED_KEYS:
            raise UserError(f"--generation-config can't set {key}: use {RESERVED_KEYS[key]}")
        if key not in known:
            raise UserError(f"--generation-config: unknown generation setting {key!r}")
        try:
            settings[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            settings[key] = raw.strip()  # a bare word is a string
    return settings


def decoding_settings(*, greedy: bool, sample: bool, num_beams: int, max_new_tokens: int,
                      generation_config: str | None) -> tuple[str, dict[str, Any]]:
    """The generate() keyword arguments and a name for the decoding mode they select."""
    from transformers import GenerationConfig

    if greedy:
        kwargs: dict[str, Any] = {"do_sample": False, "num_beams": 1}
    elif sample:
        kwargs = {"do_sample": True, "num_beams": 1}
    else:
        kwargs = {"do_sample": False, "num_beams": num_beams}
    kwargs.update(parse_generation_config(generation_config))
    kwargs.update(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    try:
        GenerationConfig(**kwargs).validate(strict=True)
    except ValueError as exc:
        raise UserError(f"invalid generation settings {kwargs}: {exc}") from exc
    beams = int(kwargs.get("num_beams", 1))
    if kwargs.get("do_sample"):
        mode = "beam-sample" if beams > 1 else "sample"
    else:
        mode = "beam" if beams > 1 else "greedy"
    return mode, kwargs
