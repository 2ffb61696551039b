"""Tiny random-weight multimodal models with working processors, built offline.

Like tiny_models.py for text families: the tokenizer is the embedded SmolLM2's (vocab 49152,
plus the tokens a family's processor needs), the weights are random (seeded), and the folder
loads with AutoProcessor and the model's Auto class as a hub checkpoint would.

    python tests/tiny_multimodal.py {git,llava,mllama,whisper} OUT_DIR [--tokenizer-dir DIR]

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


def make_tiny_llava(folder: Path, tokenizer_dir: Path) -> Path:
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
    vision = CLIPVisionConfig(hidden_size=HIDDEN // 2, intermediate_size=HIDDEN,
                              num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE_SIZE,
                              patch_size=PATCH, projection_dim=HIDDEN // 2)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=MLP,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=image_token_id, vision_feature_layer=-1,
                         vision_feature_select_strategy="default",
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # "default" drops the vision tower's CLS token: one image token per patch, which the
    # processor counts from patch_size and num_additional_image_tokens (the CLS)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,
                               chat_template=tokenizer.chat_template)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def make_tiny_whisper(folder: Path, tokenizer_dir: Path) -> Path:
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
    feature_extractor = WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=16000,
                                                hop_length=HOP, chunk_length=AUDIO_CHUNK_S)
    frames = AUDIO_CHUNK_S * 16000 // HOP
    end = tokenizer.eos_token_id
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=MEL_BINS, d_model=HIDDEN, encoder_layers=LAYERS,
        decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
        encoder_ffn_dim=MLP, decoder_ffn_dim=MLP, max_source_positions=frames // 2,
        max_target_positions=128, init_std=INIT_STD,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        pad_token_id=end, bos_token_id=end, eos_token_id=end,
        begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(
        folder)
    return folder


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


def make_tiny_mllama(folder: Path, tokenizer_dir: Path) -> Path:
    """Llama-3.2-Vision's shape: a tiled vision encoder (local + global layers) whose features
    the text model reads through a cross-attention layer; an MllamaProcessor (tiling image
    processor, up to 2 tiles of 32x32, + the tokenizer with <|image|> added)."""
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
    image_processor = MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              max_image_tiles=2)
    model.save_pretrained(folder, safe_serialization=True)
    MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


BUILDERS = {"llava": make_tiny_llava, "whisper": make_tiny_whisper, "git": make_tiny_git,
            "mllama": make_tiny_mllama}


def make_tiny_multimodal(family: str, folder: Path, tokenizer_dir: Path) -> Path:
    return BUILDERS[family](Path(folder), Path(tokenizer_dir))


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
    args: Any = parser.parse_args(argv)
    tokenizer_dir = args.tokenizer_dir or embedded_tokenizer_dir()
    folder = make_tiny_multimodal(args.family, args.output_dir, tokenizer_dir)
    print(f"tiny {args.family}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
