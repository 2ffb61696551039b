"""--backend native for Whisper: the audio encoder runs as transformers runs it, once per
prompt; the decoder is the native model (blocks' "whisper" map), driven by the same decoding
rules as transformers' WhisperForConditionalGeneration.generate() for a short (one-window)
recording, so the tokens and the work per token are the ones stock produces:

- the decoder prompt: the start token, then the language (the generation config's, or detected
  from the audio: the start token's logits over the language tokens), the task, and
  <|notimestamps|>; an old-style `forced_decoder_ids` is read as transformers reads it;
- suppress_tokens never chosen, begin_suppress_tokens not as the first new token;
- the output holds the new tokens only (stock strips the decoder prompt too).

Refused in one line rather than run differently: timestamps, a text prompt (--prompt, Whisper's
previous-text conditioning) and sampling (Whisper's generate() samples only with a positive
temperature and falls back across temperatures).
"""

from __future__ import annotations

from typing import Any

import torch

from llmbench.errors import UserError

# generate() settings the benchmark passes that this wrapper takes (input_features is read
# here, the rest goes to the native model's generate())
_TAKEN = {"input_features", "pad_token_id", "max_new_tokens", "min_new_tokens", "do_sample",
          "num_beams", "stopping_criteria", "streamer", "eos_token_id", "length_penalty",
          "early_stopping"}
_TASKS = ("transcribe", "translate")


def language_id(generation_config: Any, language: str) -> int:
    """A language name ("english"), code ("en") or token ("<|en|>") -> its token id, as
    transformers' Whisper resolves it."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    key = language.lower()
    if key in TO_LANGUAGE_CODE:
        key = f"<|{TO_LANGUAGE_CODE[key]}|>"
    elif key not in generation_config.lang_to_id:
        key = f"<|{key}|>"
    if key not in generation_config.lang_to_id:
        raise UserError(f"whisper: language {language!r} is not in this model's lang_to_id")
    return int(generation_config.lang_to_id[key])


def decoder_prompt(generation_config: Any, config: Any, batch: int,
                   detect: Any) -> torch.Tensor:
    """The decoder's first tokens [batch, n] for a short recording, by the rules of transformers'
    Whisper generate(); detect() -> one detected language id per row, called only when the
    model is multilingual and no language is set."""
    gc = generation_config
    task = getattr(gc, "task", None)
    language = getattr(gc, "language", None)
    start: list[int | None] = [int(gc.decoder_start_token_id)]
    if task is None and language is None:  # the released checkpoints' old-style setting
        forced = getattr(gc, "forced_decoder_ids", None) or getattr(
            config, "forced_decoder_ids", None)
        if forced and forced[0][0] == 1:
            for position, (index, token) in enumerate(forced, start=1):
                if index != position:
                    raise UserError(f"whisper: forced_decoder_ids {forced} do not follow "
                                    "Whisper's prompt pattern")
                start.append(token)
    undefined = len(start) <= 1 or start[1] is None
    if language is not None:
        names = language if isinstance(language, list | tuple) else [language] * batch
        if len(names) != batch:
            raise UserError(f"whisper: {len(names)} languages for a batch of {batch}")
        languages: list[int] | None = [language_id(gc, name) for name in names]
    elif hasattr(gc, "lang_to_id") and undefined:
        languages = [int(i) for i in detect()]
    else:
        languages = None
    rows = []
    for row in range(batch):
        tokens = list(start)
        if languages is not None:
            if len(tokens) > 1:
                tokens[1] = languages[row]
            else:
                tokens.append(languages[row])
        if task is not None:
            if task not in _TASKS:
                raise UserError(f"whisper: task {task!r} is not one of {', '.join(_TASKS)}")
            tokens.append(gc.task_to_id[task])
        elif language is not None and hasattr(gc, "task_to_id"):
            if not any(t in tokens for t in gc.task_to_id.values()):
                tokens.append(gc.task_to_id["transcribe"])
        no_timestamps = getattr(gc, "no_timestamps_token_id", None)
        if no_timestamps is not None and tokens[-1] != no_timestamps:
            tokens.append(no_timestamps)
        rows.append([int(t) for t in tokens if t is not None])
    return torch.tensor(rows, dtype=torch.long)


class NativeWhisper:
    """generate() for a WhisperForConditionalGeneration whose decoder is `native` (a
    backends.native.NativeModel of its "whisper" map)."""

    def __init__(self, model: Any, native: Any) -> None:
        self.model = model
        self.native = native
        self.encoder = model.get_encoder()

    def runtime_details(self) -> dict[str, Any]:
        detected = -1  # a placeholder for the language detect() would find
        prompt = decoder_prompt(self.model.generation_config, self.model.config, 1,
                                lambda: [detected])[0].tolist()
        return {**self.native.runtime_details(),
                "decoder_prompt": ["language detected from the audio" if token == detected
                                   else token for token in prompt]}

    def generate(self, **kwargs: Any) -> torch.Tensor:
        gc = self.model.generation_config
        unknown = sorted(set(kwargs) - _TAKEN)
        if unknown:
            raise UserError("native backend: Whisper settings not implemented: "
                            + ", ".join(unknown)
                            + (" (--prompt: previous-text conditioning)"
                               if "prompt_ids" in unknown else ""))
        if kwargs.get("do_sample"):
            raise UserError("native backend: sampling with Whisper is not implemented (its "
                            "generate() samples only at a positive temperature, with fallback)")
        if getattr(gc, "return_timestamps", False):
            raise UserError("native backend: Whisper timestamps are not implemented")
        features = kwargs.pop("input_features")
        with torch.inference_mode():
            states = self.encoder(input_features=features).last_hidden_state
        cross = self.native.cross_kv(states)
        batch = features.shape[0]

        def detect() -> list[int]:
            """The start token's logits, only over the language tokens (transformers'
            detect_language, on the states computed above)."""
            start = torch.full((batch, 1), int(gc.decoder_start_token_id), dtype=torch.long)
            logits = self.native.prompt_logits(start, cross)
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
            keep[list(gc.lang_to_id.values())] = True
            return logits.masked_fill(~keep, -torch.inf).argmax(dim=-1).tolist()

        prompt = decoder_prompt(gc, self.model.config, batch, detect)
        sequences = self.native.generate(
            input_ids=prompt, cross_kv=cross, suppress_tokens=gc.suppress_tokens,
            begin_suppress_tokens=gc.begin_suppress_tokens, **kwargs)
        return sequences[:, prompt.shape[1]:]  # stock returns the new tokens only
