"""Multimodal input (--input-mode / --image-url / --audio) through run.py --benchmark, on tiny
random LLaVA, Whisper, GIT and Llama-3.2-Vision (mllama) models with working processors
(tests/tiny_multimodal.py)."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_entry, run_in_process
from tiny_models import make_tiny_model
from tiny_multimodal import make_tiny_multimodal, released_whisper_decoding

SAMPLE_IMAGE = ROOT / "llmbench" / "data" / "sample_image.png"
SAMPLE_AUDIO = ROOT / "llmbench" / "data" / "sample_audio.wav"
SHORT = ["--greedy", "--token-latency", "--max-new-tokens", "4", "--num-iter", "1",
         "--num-warmup", "0"]
SUMMARY = ("Inference latency:", "First token average latency:", "Average 2... latency:",
           "Generated tokens/s:", "Model load:")


@pytest.fixture(scope="module")
def models(tmp_path_factory, embedded_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multimodal")
    built = {family: make_tiny_multimodal(family, root / family, embedded_model_dir)
             for family in ("llava", "whisper", "git", "mllama")}
    built["llama"] = make_tiny_model("llama", root / "llama", embedded_model_dir)
    return built


def benchmark(model: Path, output_dir: Path, *flags: str, process: bool = False
              ) -> tuple[str, dict]:
    """run.py --benchmark (its main and step in this process; as processes, the way a user
    starts it, with process=True); returns stdout and the one report it wrote."""
    output_dir.mkdir(parents=True, exist_ok=True)
    result = (run_entry if process else run_in_process)(
        "run.py", "--benchmark", "-m", str(model), *SHORT, *flags, "--output-dir",
        str(output_dir))
    assert result.returncode == 0, result.stderr
    for line in SUMMARY:
        assert line in result.stdout, line
    (report_path,) = output_dir.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["status"] == "complete"
    assert report["statistics"]["first_token_latency_s"]["count"] == 1
    assert len(report["iterations"][0]["step_latencies_s"]) == 4  # exactly 4 new tokens
    return result.stdout, report


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> Path:
    """int16 samples; channels > 1 repeats the same signal on each channel."""
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.repeat(samples.astype("<i2"), channels).tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as handle:
        return np.frombuffer(handle.readframes(handle.getnframes()), "<i2"), handle.getframerate()


def test_llava_vision_image_drives_the_output(models, tmp_path):
    """Mode 1 on the shipped sample (said in the output), the same image from a path (same
    greedy text), and another image (other text); the report records mode and image size."""
    out, report = benchmark(models["llava"], tmp_path / "sample", "--input-mode", "1", process=True)
    assert "the project's sample: --image-url not given" in out
    assert report["model"]["family"] == "llava"
    assert report["input"]["mode"] == 1
    assert report["input"]["image"]["size"] == "96x64"
    assert report["input"]["image"]["default_sample"] is True
    assert report["input"]["audio"] is None
    assert "| image | sample_image.png (96x64) |" in next((tmp_path / "sample").glob("*.md")
                                                         ).read_text()

    copy = shutil.copy(SAMPLE_IMAGE, tmp_path / "copy.png")
    _, same = benchmark(models["llava"], tmp_path / "copy", "--image-url", str(copy))
    assert same["input"]["mode"] == 1  # implied by --image-url
    assert same["generated_text"] == report["generated_text"]

    from PIL import Image

    other = tmp_path / "noise.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(other)
    _, changed = benchmark(models["llava"], tmp_path / "other", "--input-mode", "1",
                           "--image-url", str(other), "--prompt", "Describe this image.")
    assert changed["input"]["image"]["size"] == "50x40"
    assert changed["generated_text"] != report["generated_text"]


def test_whisper_speech_audio_drives_the_output(models, tmp_path):
    """--audio alone on a speech model (mode 2 implied); the sample as 16-bit stereo gives the
    same text (channels averaged), another sound at 8 kHz (resampled) another text."""
    out, report = benchmark(models["whisper"], tmp_path / "sample", "--input-mode", "2")
    assert "the project's sample: --audio not given" in out
    assert report["model"]["family"] == "whisper"
    assert report["input"]["mode"] == 2 and report["input"]["image"] is None
    assert report["input"]["audio"]["seconds"] == pytest.approx(1.5)
    assert report["input"]["audio"]["sampling_rate"] == 16000

    samples, rate = read_wav(SAMPLE_AUDIO)
    stereo = write_wav(tmp_path / "stereo.wav", samples, rate, channels=2)
    _, same = benchmark(models["whisper"], tmp_path / "stereo", "--audio", str(stereo))
    assert same["input"]["mode"] == 2
    assert same["generated_text"] == report["generated_text"]

    t = np.arange(8000) / 8000
    tone = write_wav(tmp_path / "tone.wav", 12000 * np.sin(2 * np.pi * 440 * t), 8000)
    _, changed = benchmark(models["whisper"], tmp_path / "tone", "--audio", str(tone),
                           "--prompt", "a tone")
    assert changed["input"]["audio"]["seconds"] == pytest.approx(1.0)
    assert changed["input"]["audio"]["sampling_rate"] == 8000
    assert changed["prompt"]["source"] == "--prompt"
    assert changed["generated_text"] != report["generated_text"]


def test_git_captions_the_image(models, tmp_path):
    """GIT with no prompt captions from its start token (exactly 4 new tokens counted after
    it); another image gives another caption; a prompt is continued."""
    _, report = benchmark(models["git"], tmp_path / "sample", "--input-mode", "1")
    assert report["model"]["family"] == "git"
    assert report["prompt"]["tokens"] == 0 and report["input"]["image"]["size"] == "96x64"
    from PIL import Image

    other = tmp_path / "stripes.png"
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[::8] = 255
    Image.fromarray(pixels).save(other)
    _, changed = benchmark(models["git"], tmp_path / "other", "--image-url", str(other))
    assert changed["generated_text"] != report["generated_text"]
    _, prompted = benchmark(models["git"], tmp_path / "prompted", "--image-url", str(other),
                            "--prompt", "a picture of")
    assert prompted["prompt"]["tokens"] > 0


def test_mllama_tiles_and_batches(models, tmp_path):
    """Llama-3.2-Vision's shape: the image is tiled and read through cross-attention; another
    image changes the output; --batch-size 2 gives each prompt its own copy of the image."""
    _, report = benchmark(models["mllama"], tmp_path / "sample", "--input-mode", "1")
    assert report["model"]["family"] == "mllama" and report["input"]["mode"] == 1
    from PIL import Image

    other = tmp_path / "checks.png"
    pixels = np.indices((48, 48)).sum(axis=0) % 2 * 255
    Image.fromarray(np.repeat(pixels[..., None], 3, axis=-1).astype(np.uint8)).save(other)
    _, changed = benchmark(models["mllama"], tmp_path / "other", "--image-url", str(other),
                           "--batch-size", "2")
    assert changed["statistics"]["batch_size"] == 2
    assert len(changed["generated_text"]) == 2
    assert changed["generated_text"][0] == changed["generated_text"][1]
    assert changed["generated_text"][0] != report["generated_text"][0]


def test_bfloat16_inputs_follow_the_model(models, tmp_path):
    """The processor's float32 audio features are cast to a bf16 model's dtype."""
    _, report = benchmark(models["whisper"], tmp_path, "--dtype", "bfloat16")
    assert report["model"]["dtype"] == "bfloat16" and report["input"]["mode"] == 2


def test_llava_text_only_mode(models, tmp_path):
    """--input-mode 0 on a vision model: the prompt alone, through its processor."""
    _, report = benchmark(models["llava"], tmp_path, "--input-mode", "0",
                          "--prompt", "Hello there")
    assert report["input"]["mode"] == 0 and report["input"]["image"] is None


def assert_one_line_error(result, needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(("model", "flags", "needle"), [
    ("llama", ["--input-mode", "1"], "(llama) reads text only"),
    (None, ["--input-mode", "3"], "the embedded model (a GGUF text model) reads text only"),
    ("whisper", ["--input-mode", "1"], "whisper models read speech"),
    ("llava", ["--input-mode", "2"], "llava models read text and vision"),
    ("llava", ["--input-mode", "3"], "needs a model that reads speech"),
    ("whisper", ["--input-mode", "0"], "not text alone: pass --input-mode 2"),
    ("llava", ["--image-url", str(SAMPLE_AUDIO)], "is not an image"),
    ("llava", ["--image-url", "/no/such/image.png"], "cannot be read"),
    ("llava", ["--image-url", "http://127.0.0.1:9/image.png"], "could not be fetched"),
    ("whisper", ["--audio", str(SAMPLE_IMAGE)], "is not a WAV audio file"),
    ("whisper", ["--audio", "/no/such/audio.wav"], "cannot be read"),
    ("llava", ["--input-mode", "0", "--image-url", str(SAMPLE_IMAGE)], "--input-mode 1 or 3"),
    ("llava", ["--input-mode", "1", "--ipex-smooth-quant"], "SmoothQuant and checkpoints are "
                                                             "not implemented for it yet"),
    ("llava", ["--input-mode", "1", "--ipex"], "Intel Extension for PyTorch does not import"),
    ("llava", ["--input-mode", "4"], "must be one of 0 text, 1 vision"),
    ("git", ["--input-mode", "0"], "git with --input-mode 0 reads text only: pass --prompt"),
])
def test_bad_input_is_one_line(models, tmp_path, model, flags, needle):
    model_flags = ["-m", str(models[model])] if model else []
    result = run_entry("run.py", "--benchmark", *model_flags, *flags, "--num-iter", "1",
                       "--num-warmup", "0", "--output-dir", str(tmp_path))
    assert_one_line_error(result, needle)
    assert not list(tmp_path.glob("*.json"))  # refused before any step ran


def test_run_generation_takes_the_flags(models, tmp_path):
    """The single-instance script has the same flags (run.py forwards them to it)."""
    result = run_entry("single_instance/run_generation.py", "-m", str(models["whisper"]),
                       "--input-mode", "2", "--audio", str(SAMPLE_IMAGE), "--output-dir",
                       str(tmp_path))
    assert_one_line_error(result, "is not a WAV audio file")


def generated(report: dict) -> list[str]:
    return report["generated_text"]


def test_llava_native_language_model(models, tmp_path):
    """--backend native runs LLaVA's language model (the vision tower stays stock): the same
    greedy tokens as stock in fp32, another image gives other tokens, and the first token
    splits into encoder and language prefill time."""
    _, stock = benchmark(models["llava"], tmp_path / "stock", "--input-mode", "1")
    out, native = benchmark(models["llava"], tmp_path / "native", "--input-mode", "1",
                            "--backend", "native")
    assert native["backend"]["name"] == "native" and "fallback_reason" not in native["backend"]
    assert "model.vision_tower" in native["backend"]["encoders"]
    assert generated(native) == generated(stock)
    assert "of which encoder:" in out
    stats = native["statistics"]
    assert stats["first_token_encoder_s"]["count"] == 1
    assert 0 < stats["first_token_encoder_s"]["mean"] < stats["first_token_latency_s"]["mean"]
    assert native["iterations"][0]["encoder_s"] > 0

    other = tmp_path / "other.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (250, 10, 10)).save(other)
    _, native_other = benchmark(models["llava"], tmp_path / "native-other", "--image-url",
                                str(other), "--backend", "native")
    assert generated(native_other) != generated(native)


@pytest.mark.parametrize("quant", [["--weight-dtype", "INT8"],
                                   ["--weight-dtype", "INT4", "--group-size", "32"]])
def test_llava_weight_only_language_model(models, tmp_path, quant):
    """run.py --ipex-weight-only-quantization quantizes the language model in the benchmark's
    process (no saved model); native and stock give the same greedy tokens."""
    flags = ["--input-mode", "1", "--ipex-weight-only-quantization", *quant]
    out, stock = benchmark(models["llava"], tmp_path / "stock", *flags)
    assert "of the language model in this process, not saved" in out
    _, native = benchmark(models["llava"], tmp_path / "native", *flags, "--backend", "native")
    assert native["backend"]["name"] == "native"
    for report in (stock, native):
        quantization = report["backend"]["quantization"]
        assert quantization["scheme"]["weight_dtype"] == quant[1]
        assert quantization["part"].startswith("the language model")
    assert native["backend"]["native_projections_replaced"] > 0
    assert generated(native) == generated(stock)
    # both read the quantized output layer too: the same bytes per token, norms aside
    stock_bytes = stock["backend"]["weight_bytes_per_token"]
    assert abs(stock_bytes - native["backend"]["weight_bytes_per_token"]) < 0.02 * stock_bytes


def whisper_decoding(model: Path, folder: Path, **settings) -> Path:
    """A copy of the tiny Whisper whose generation config has `settings` (on top of a released
    multilingual checkpoint's decoding rules)."""
    from transformers import AutoTokenizer

    shutil.copytree(model, folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text())
    config.pop("_from_model_config", None)  # else transformers rebuilds it from config.json
    config.update(released_whisper_decoding(AutoTokenizer.from_pretrained(model)), **settings)
    path.write_text(json.dumps(config))
    return folder


BEAMS = ["--num-beams", "2", "--token-latency", "--max-new-tokens", "4", "--num-iter", "1",
         "--num-warmup", "0"]


def stock_and_native(model: Path, folder: Path, *flags: str, decoding: list[str] = SHORT
                     ) -> tuple[dict, dict]:
    """The generation benchmark (the main of run_generation.py, run.py's step, in this process:
    the tests above start it as users do) of `model` on stock and on native; both reports,
    native checked to have run native."""
    from llmbench.generation import main as generation_main

    reports = []
    for backend in ("stock", "native"):
        out = folder / backend
        assert generation_main(["-m", str(model), *decoding, *flags, "--backend", backend,
                                "--output-dir", str(out)]) == 0
        (path,) = out.glob("*.json")
        reports.append(json.loads(path.read_text()))
        assert reports[-1]["status"] == "complete"
    stock, native = reports
    assert native["backend"]["name"] == "native" and "fallback_reason" not in native["backend"]
    return stock, native


def test_whisper_native_decoder(models, tmp_path):
    """--backend native runs Whisper's decoder (the audio encoder stays stock) under a released
    checkpoint's decoding rules (language detected from the audio, forced task,
    <|notimestamps|>, suppressed tokens): the same greedy tokens as stock in fp32, with
    weight-only INT8, and with a set language and task; beam search too."""
    from transformers import AutoTokenizer

    released = whisper_decoding(models["whisper"], tmp_path / "released")
    stock, native = stock_and_native(released, tmp_path)
    assert generated(native) == generated(stock)
    tokenizer = AutoTokenizer.from_pretrained(released)
    start, transcribe, no_timestamps = tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>"])
    assert native["backend"]["decoder_prompt"] == [start, "language detected from the audio",
                                                   transcribe, no_timestamps]
    assert native["backend"]["decode_step"].startswith("compiled C++ step")
    assert native["statistics"]["first_token_encoder_s"]["count"] == 1

    # Suppressing every token the released rules produced changes the output: both agree.
    banned = tokenizer(generated(stock)[0], add_special_tokens=False).input_ids
    suppressed = whisper_decoding(models["whisper"], tmp_path / "suppressed",
                                  suppress_tokens=banned)
    stock_s, native_s = stock_and_native(suppressed, tmp_path / "s")
    assert generated(native_s) == generated(stock_s) != generated(stock)

    translate = whisper_decoding(models["whisper"], tmp_path / "de", language="de",
                                 task="translate")
    stock_t, native_t = stock_and_native(translate, tmp_path / "t", "--ipex-weight-only-"
                                         "quantization", "--weight-dtype", "INT8")
    assert generated(native_t) == generated(stock_t)
    assert native_t["backend"]["decoder_prompt"][1:3] == [300, tokenizer.convert_tokens_to_ids(
        "<|translate|>")]

    stock_b, native_b = stock_and_native(released, tmp_path / "beam", decoding=BEAMS)
    assert generated(native_b) == generated(stock_b)


@pytest.mark.parametrize("flags, needle", [
    (["--sample"], "sampling with Whisper is not implemented"),
    (["--prompt", "earlier words"], "prompt_ids (--prompt: previous-text conditioning)"),
])
def test_whisper_native_refuses_what_it_does_not_run(models, tmp_path, flags, needle):
    result = run_entry("run.py", "--benchmark", "-m", str(models["whisper"]), "--backend",
                       "native", "--max-new-tokens", "4", "--num-iter", "1", "--num-warmup",
                       "0", *flags, "--output-dir", str(tmp_path))
    assert result.returncode != 0
    assert needle in result.stderr


def test_mllama_native_language_model(models, tmp_path):
    """--backend native runs Llama-3.2-Vision's text model, its gated cross-attention layers
    included (the vision model stays stock): the same greedy tokens as stock in fp32 and
    weight-only INT8, with text before the image (rows that see no tile), without an image
    (the cross layers skipped), and in beam search."""
    early = ["--input-mode", "1", "--prompt", "Some words first <|image|>Describe this image."]
    for name, flags, decoding in (
            ("image", ["--input-mode", "1"], SHORT),
            ("early-int8", [*early, "--ipex-weight-only-quantization", "--weight-dtype", "INT8"],
             SHORT),
            ("text", ["--input-mode", "0", "--prompt", "Hello there"], SHORT),
            ("early-beam", early, BEAMS)):
        stock, native = stock_and_native(models["mllama"], tmp_path / name, *flags,
                                         decoding=decoding)
        assert generated(native) == generated(stock), name
        assert native["backend"]["block"]["cross_layers"] == [1]
    assert native["backend"]["decode_step"].startswith("compiled C++ step")


def test_git_native_text_decoder(models, tmp_path):
    """--backend native runs GIT's BERT-style text decoder (post-norm layers; the image tokens
    lead the prompt and attend to each other both ways; new tokens' positions count text only,
    as transformers' do): the same greedy tokens as stock captioning from the start token, with
    a prompt, with weight-only INT8, and in beam search."""
    for name, flags, decoding in (
            ("caption", ["--input-mode", "1"], SHORT),
            ("prompt-int8", ["--input-mode", "1", "--prompt", "a picture of",
                             "--ipex-weight-only-quantization", "--weight-dtype", "INT8"], SHORT),
            ("caption-beam", ["--input-mode", "1"], BEAMS)):
        stock, native = stock_and_native(models["git"], tmp_path / name, *flags,
                                         decoding=decoding)
        assert generated(native) == generated(stock), name
        assert native["backend"]["block"]["residual"] == "post"


def test_native_falls_back_loudly_and_quantizes_stock(models, tmp_path):
    """A language model with a setting the native step does not implement (here LLaVA's llama
    with an activation it lacks) runs stock with the reason in the console and the report;
    weight-only INT8 still applies to it."""
    folder = tmp_path / "llava-quick-gelu"
    shutil.copytree(models["llava"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act"] = "quick_gelu"
    (folder / "config.json").write_text(json.dumps(config))
    out, report = benchmark(folder, tmp_path / "run", "--backend", "native",
                            "--ipex-weight-only-quantization", "--weight-dtype", "INT8",
                            "--input-mode", "1")
    assert report["backend"]["name"] == "stock"
    reason = report["backend"]["fallback_reason"]
    assert "activation quick_gelu is not implemented" in reason
    assert reason in out and "this run is STOCK transformers" in out
    assert report["backend"]["quantization"]["scheme"]["weight_dtype"] == "INT8"


def test_autotp_shards_the_language_model(models, tmp_path):
    """deepspeed run.py --autotp with an image: 2 ranks, the language model sharded (the vision
    tower whole on each), the same greedy tokens as one process in fp32; weight-only INT8 per
    rank runs too. The seed line's shape: --input-mode 1 --image-url --prompt --autotp."""
    from test_distributed import launch, only_report

    _, single = benchmark(models["llava"], tmp_path / "single", "--input-mode", "1")
    prompt = "<image>\nDescribe this image."
    result = launch("-m", str(models["llava"]), "--input-mode", "1", "--image-url",
                    str(SAMPLE_IMAGE), "--prompt", prompt, *SHORT, "--output-dir",
                    str(tmp_path / "tp"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "its language model is sharded" in result.stdout
    report = only_report(tmp_path / "tp")
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["ranks_agree"]
    assert report["input"]["mode"] == 1 and report["input"]["image"]["size"] == "96x64"
    assert report["statistics"]["first_token_encoder_s"]["count"] == 1
    assert report["generated_text"] == single["generated_text"]

    quantized = launch("-m", str(models["llava"]), "--input-mode", "1", "--prompt", prompt,
                       "--ipex-weight-only-quantization", "--weight-dtype", "INT8",
                       "--quant-with-amp", *SHORT, "--output-dir", str(tmp_path / "tp8"),
                       timeout=600, launcher="direct")
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    report8 = only_report(tmp_path / "tp8")
    assert report8["distributed"]["ranks_agree"] and report8["model"]["dtype"] == "bfloat16"
    assert report8["backend"]["quantization"]["splits_per_rank"]["lm_head"] == 1


@pytest.mark.parametrize("family", ["whisper", "mllama", "git"])
def test_autotp_native_language_model(models, tmp_path, family):
    """deepspeed run.py --autotp --backend native: each rank runs its slice of the native
    language model (cross-attention by KV-head groups for Whisper and mllama, GIT's post-norm
    blocks with the image prefix), the encoders whole on every rank; the greedy tokens are one
    native process's."""
    from test_distributed import launch, only_report

    flags = ["--backend", "native", "--input-mode", "2" if family == "whisper" else "1"]
    _, single = benchmark(models[family], tmp_path / "single", *flags)
    result = launch("-m", str(models[family]), *flags, *SHORT, "--output-dir",
                    str(tmp_path / "tp"), timeout=600, launcher="direct")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "native-autotp x2" in result.stdout
    report = only_report(tmp_path / "tp")
    assert report["backend"]["name"] == "native" and "fallback_reason" not in report["backend"]
    assert report["backend"]["tensor_parallel"]["world"] == 2
    assert report["distributed"]["ranks_agree"] is True
    assert report["distributed"]["all_reduce_ms_per_token"] > 0
    assert generated(report) == generated(single)
