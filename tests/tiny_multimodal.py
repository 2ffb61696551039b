"""Tiny random-weight multimodal models with working processors, built offline.

Like tiny_models.py for text families: the tokenizer is the embedded SmolLM2's (vocab 49152,
plus the tokens a family's processor needs), the weights are random (seeded), and the folder
loads with AutoProcessor and the model's Auto class as a hub checkpoint would.

    python tests/tiny_multimodal.py {git,llava,mllama,whisper} OUT_DIR [--tokenizer-dir DIR]
        [--shape real]

(without --tokenizer-dir, the embedded model is converted once into the llmbench cache and its
tokenizer used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HIDDEN = 64
LAYERS = 2
HEADS = 4
MLP = 128
IMAGE_SIZE = 32  # pixels, square after the processor's resize and crop
PATCH = 8  # (32 / 8)^2 = 16 image tokens per image
MEL_BINS = 16
AUDIO_CHUNK_S = 2  # the feature extractor pads or cuts audio to this many seconds
HOP = 160  # 10 ms frames at 16 kHz: 200 frames, 100 encoder positions after the strided conv
# Larger than transformers' default init (0.02), so a tiny random model's greedy tokens depend
# on its image/audio input instead of one token winning every step (Whisper, mllama's vision).
INIT_STD = 0.5
# --shape real: the layer shapes of released models (random weights, for benchmarks such as
# benchmarks/multimodal_shapes.py): LLaVA-1.5's vision tower (CLIP ViT-L/14 at 336 pixels, 576
# image tokens, features from the second-last layer) with a SmolLM2-360M-shaped llama, and
# Whisper-small (80 mel bins, 30 s windows).
REAL_LLAVA_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                     "projection_dim": 768}
REAL_LLAVA_TEXT = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                   "num_attention_heads": 15, "num_key_value_heads": 5,
                   "max_position_embeddings": 2048}
REAL_WHISPER = {"d_model": 768, "encoder_layers": 12, "decoder_layers": 12,
                "encoder_attention_heads": 12, "decoder_attention_heads": 12,
                "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072, "max_target_positions": 448}
# mllama: Llama-3.2-11B-Vision's layout at the LLaVA text model's size: a SmolLM2-360M-shaped
# text model with a gated cross-attention layer in place of every fifth from the fourth (the
# 11B's pattern: 8 of 40), over the image tokens of the real vision encoder's count (560-pixel
# tiles of 14-pixel patches: 1601 tokens per tile, 4 tiles) from a small vision encoder.
REAL_MLLAMA_TEXT = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                    "num_attention_heads": 15, "num_key_value_heads": 5,
                    "cross_attention_layers": [3, 8, 13, 18, 23, 28],
                    "max_position_embeddings": 2048}
REAL_MLLAMA_VISION = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
                      "num_global_layers": 1, "attention_heads": 4, "image_size": 560,
                      "patch_size": 14, "max_num_tiles": 4, "vision_output_dim": 512}
SHAPES = ("tiny", "real")


def make_tiny_llava(folder: Path, tokenizer_dir: Path, shape: str = "tiny") -> Path:
    """LLaVA-1.5's shape: a CLIP vision tower, a 2-layer projector, a llama text model; the
    processor is a LlavaProcessor (CLIP image processing + the tokenizer with <image> added)."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    real = shape == "real"
    vision_shape = REAL_LLAVA_VISION if real else {
        "hidden_size": HIDDEN // 2, "intermediate_size": HIDDEN, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH,
        "projection_dim": HIDDEN // 2}
    text_shape = REAL_LLAVA_TEXT if real else {
        "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": 2, "max_position_embeddings": 512}
    image_size, patch = vision_shape["image_size"], vision_shape["patch_size"]
    vision = CLIPVisionConfig(**vision_shape)
    text = LlamaConfig(vocab_size=len(tokenizer), **text_shape,
                       bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=image_token_id, vision_feature_layer=-2 if real else -1,
                         vision_feature_select_strategy="default",
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    # "default" drops the vision tower's CLS token: one image token per patch, which the
    # processor counts from patch_size and num_additional_image_tokens (the CLS)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def make_tiny_whisper(folder: Path, tokenizer_dir: Path, shape: str = "tiny") -> Path:
    """Whisper's shape with 16 mel bins and 2 s of audio; the tokenizer is a WhisperTokenizer
    made from the SmolLM2 byte-level BPE (vocab and merges) plus Whisper's control tokens, so
    nothing is downloaded."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    folder = Path(folder)
    saved = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    bpe = saved["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    # Whisper's tokenizer takes every id from its first special token up as special (e.g. in
    # get_prompt_ids), so SmolLM2's specials (ids 0-16) become plain placeholder tokens and
    # <|endoftext|> comes after the text vocabulary with Whisper's control tokens.
    vocab = dict(bpe["vocab"])
    for added in saved["added_tokens"]:
        del vocab[added["content"]]
        vocab[f"<|unused{added['id']}|>"] = added["id"]
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    control = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
               "<|notimestamps|>", "<|startofprev|>"]  # startofprev: --prompt's prefix
    tokenizer.add_special_tokens({"additional_special_tokens": control})
    real = shape == "real"
    mel_bins, chunk_s = (80, 30) if real else (MEL_BINS, AUDIO_CHUNK_S)
    feature_extractor = WhisperFeatureExtractor(feature_size=mel_bins, sampling_rate=16000,
                                                hop_length=HOP, chunk_length=chunk_s)
    frames = chunk_s * 16000 // HOP
    end = tokenizer.eos_token_id
    layout = REAL_WHISPER if real else {
        "d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
        "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
        "encoder_ffn_dim": MLP, "decoder_ffn_dim": MLP, "max_target_positions": 128,
        "init_std": INIT_STD}
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=mel_bins, max_source_positions=frames // 2,
        **layout,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        pad_token_id=end, bos_token_id=end, eos_token_id=end,
        begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    if real:  # decode as a released multilingual checkpoint does (language detection first)
        for key, value in released_whisper_decoding(tokenizer).items():
            setattr(model.generation_config, key, value)
        # else loading rebuilds the generation config from config.json, without these
        model.generation_config._from_model_config = False
    model.save_pretrained(folder, safe_serialization=True)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(
        folder)
    return folder


def released_whisper_decoding(tokenizer: Any) -> dict[str, Any]:
    """The decoding settings of a released multilingual Whisper's generation config, over the
    tiny tokenizer's control tokens: the old-style forced_decoder_ids (language left to
    detection, then transcribe), two languages (the second on a text token: only its id
    matters), <|notimestamps|>, and suppressed tokens (a few, and at the start the space and
    end-of-text, as the released configs list)."""
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
           for name in ("en", "transcribe", "translate", "notimestamps")}
    return {"is_multilingual": True, "lang_to_id": {"<|en|>": ids["en"], "<|de|>": 300},
            "task_to_id": {"transcribe": ids["transcribe"], "translate": ids["translate"]},
            "no_timestamps_token_id": ids["notimestamps"],
            "forced_decoder_ids": [[1, None], [2, ids["transcribe"]]],
            "suppress_tokens": [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31],
            "begin_suppress_tokens": [tokenizer.convert_tokens_to_ids("Ġ"),
                                      tokenizer.eos_token_id]}


def make_tiny_git(folder: Path, tokenizer_dir: Path) -> Path:
    """GIT's shape (captioning): a CLIP-like vision encoder whose patch features are prepended
    to a BERT-like text decoder; a GitProcessor of a CLIP image processor and the tokenizer."""
    import torch
    from transformers import AutoTokenizer, GitConfig, GitForCausalLM, GitProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vision = {"hidden_size": HIDDEN // 2, "intermediate_size": HIDDEN, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH}
    config = GitConfig(vision_config=vision, vocab_size=len(tokenizer), hidden_size=HIDDEN,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=MLP, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GitForCausalLM(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    model.save_pretrained(folder, safe_serialization=True)
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_tiny_mllama(folder: Path, tokenizer_dir: Path, shape: str = "tiny") -> Path:
    """Llama-3.2-Vision's shape: a tiled vision encoder (local + global layers) whose features
    the text model reads through a cross-attention layer; an MllamaProcessor (tiling image
    processor, up to 2 tiles of 32x32, + the tokenizer with <|image|> added). --shape real:
    REAL_MLLAMA_TEXT / REAL_MLLAMA_VISION, up to 4 tiles of 560x560."""
    import torch
    from transformers import (
        AutoTokenizer,
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaProcessor,
    )
    from transformers.models.mllama import MllamaImageProcessorPil

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # <|python_tag|>: the processor's chat handling looks it up
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>", "<|python_tag|>"]})
    vision = {"hidden_size": HIDDEN // 2, "intermediate_size": HIDDEN, "num_hidden_layers": 2,
              "num_global_layers": 1, "attention_heads": 2, "image_size": IMAGE_SIZE,
              "patch_size": PATCH, "max_num_tiles": 2, "vision_output_dim": HIDDEN,
              "intermediate_layers_indices": [0],
              "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
              "initializer_range": INIT_STD}
    text = {"vocab_size": len(tokenizer), "hidden_size": HIDDEN, "intermediate_size": MLP,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": 2,
            "cross_attention_layers": [1], "max_position_embeddings": 512,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    tiles, tile_size = 2, IMAGE_SIZE
    if shape == "real":
        vision = {**vision, **REAL_MLLAMA_VISION, "supported_aspect_ratios": [
            [1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]}
        text = {**text, **REAL_MLLAMA_TEXT}
        tiles, tile_size = REAL_MLLAMA_VISION["max_num_tiles"], REAL_MLLAMA_VISION["image_size"]
    config = MllamaConfig(vision_config=vision, text_config=text,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # the cross-attention gates start at 0 (a trained model learns them): open them, or
        # the image would not reach the text model at all
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(1.0)
    image_processor = MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size},
                                              max_image_tiles=tiles)
    model.save_pretrained(folder, safe_serialization=True)
    MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


BUILDERS = {"llava": make_tiny_llava, "whisper": make_tiny_whisper, "git": make_tiny_git,
            "mllama": make_tiny_mllama}


def make_tiny_multimodal(family: str, folder: Path, tokenizer_dir: Path,
                         shape: str = "tiny") -> Path:
    if shape == "tiny":
        return BUILDERS[family](Path(folder), Path(tokenizer_dir))
    if family not in ("llava", "whisper", "mllama"):
        raise SystemExit(f"--shape {shape}: llava, whisper and mllama only")
    return BUILDERS[family](Path(folder), Path(tokenizer_dir), shape)


def embedded_tokenizer_dir() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from llmbench.models import materialize_gguf, resolve_source

    source, _ = materialize_gguf(resolve_source(None))
    return Path(source.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random multimodal model.")
    parser.add_argument("family", choices=sorted(BUILDERS))
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--tokenizer-dir", type=Path, default=None,
                        help="a folder with the SmolLM2 tokenizer (default: the embedded model)")
    parser.add_argument("--shape", choices=SHAPES, default="tiny",
                        help="real: released models' layer shapes (llava, whisper, mllama; see "
                             "SHAPES)")
    args: Any = parser.parse_args(argv)
    tokenizer_dir = args.tokenizer_dir or embedded_tokenizer_dir()
    folder = make_tiny_multimodal(args.family, args.output_dir, tokenizer_dir, args.shape)
    print(f"{args.shape} {args.family}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
