#!/usr/bin/env python3
"""Write the sample inputs shipped in llmbench/data/: an image and a short audio clip.

Both are drawn here from formulas (no photo, no recording), so they are the project's own work,
under the project's licence. --input-mode 1/2/3 use them when --image-url / --audio is omitted.
Run again to regenerate them: the output is the same bit for bit.

    python tools/make_sample_inputs.py [--output-dir llmbench/data]
"""

from __future__ import annotations

import argparse
import wave
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "llmbench" / "data"
IMAGE_NAME = "sample_image.png"
AUDIO_NAME = "sample_audio.wav"
IMAGE_SIZE = (96, 64)  # width, height: not square, so a resize/crop has something to do
AUDIO_RATE = 16000  # what speech models' feature extractors expect
AUDIO_SECONDS = 1.5


def sample_image() -> np.ndarray:
    """A sun over hills under a sky gradient, as uint8 RGB [height, width, 3]."""
    width, height = IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 100 * y / height, 140 + 80 * y / height,
                    np.full_like(y, 235)], axis=-1)
    image = sky
    sun = (x - 0.72 * width) ** 2 + (y - 0.28 * height) ** 2 < (0.12 * height) ** 2
    image[sun] = (250, 215, 60)
    hill = y > 0.62 * height + 0.12 * height * np.sin(x / width * 2 * np.pi * 1.5)
    image[hill] = np.stack([40 + 30 * np.sin(x[hill] / 5), 150 + 40 * (y[hill] / height),
                            60 + 0 * x[hill]], axis=-1)
    return np.clip(image, 0, 255).astype(np.uint8)


def sample_audio() -> np.ndarray:
    """A rising chirp (200 Hz to 1.2 kHz) with a fade in and out, as int16 mono."""
    t = np.arange(int(AUDIO_RATE * AUDIO_SECONDS)) / AUDIO_RATE
    start_hz, end_hz = 200.0, 1200.0
    sweep = start_hz * t + (end_hz - start_hz) * t ** 2 / (2 * AUDIO_SECONDS)
    envelope = np.minimum(1.0, np.minimum(t, AUDIO_SECONDS - t) / 0.05)
    return (0.5 * 32767 * envelope * np.sin(2 * np.pi * sweep)).astype(np.int16)


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path, format="PNG", optimize=True)  # uint8 [h, w, 3]: RGB


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.astype("<i2").tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_png(args.output_dir / IMAGE_NAME, sample_image())
    write_wav(args.output_dir / AUDIO_NAME, sample_audio(), AUDIO_RATE)
    print(f"wrote {args.output_dir / IMAGE_NAME} and {args.output_dir / AUDIO_NAME}")


if __name__ == "__main__":
    main()
