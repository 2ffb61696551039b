"""Calibration text for GPTQ (utils/run_gptq.py) and SmoothQuant (--ipex-smooth-quant).

`--dataset` is a local .txt (texts split on blank lines) or .jsonl (a "text" field per line),
or else a hub dataset id, tried only at calibration time and refused in one line when it can't
be loaded. Without it, the shipped default: prose (llmbench/data/lambada_local.jsonl) and code
(llmbench/data/code_local.jsonl, llmbench's own Python source, frozen by
tools/make_code_calibration.py), one text of each in turn, so that every window of a few
hundred tokens holds both and the two weigh the same. Calibrating on prose alone left code
the worst-served text: GPTQ INT4 group 128 on the embedded SmolLM2-135M measured +23%
perplexity on prompt.json's texts (code +41%) with prose only; with this default, +12.9% to
+15.4% over three seeds (+12.4%, code +8.8%, with 32 windows of each kind drawn separately).

SmoothQuant keeps the prose alone as its default (with_code=False): its fallback search holds
perplexity on held-out calibration samples within 2% of float, and code widens the int8
ranges: on prose + code it kept 94 of the 211 projections in float (+1.4% on prompt.json,
measured when the search was still judged in-sample), on prose 52 (+3.7%).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmbench.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
PROSE_FILE = DATA_DIR / "lambada_local.jsonl"
CODE_FILE = DATA_DIR / "code_local.jsonl"
DEFAULT_SOURCE = "shipped prose + code (llmbench/data/lambada_local.jsonl, code_local.jsonl)"
DATA_SUFFIXES = (".txt", ".jsonl", ".json")


def check_dataset_arg(dataset: str | None) -> None:
    """Refuse a --dataset that names a missing local file before anything is loaded (a hub id is
    only tried at calibration time)."""
    if dataset is None or os.path.isfile(dataset):
        if dataset is not None and not dataset.endswith(DATA_SUFFIXES):
            raise UserError(f"--dataset {dataset}: expected a .txt or .jsonl file")
        return
    looks_local = (dataset.endswith(DATA_SUFFIXES) or dataset.startswith((".", "/", "~"))
                   or os.path.exists(dataset))
    if looks_local:
        raise UserError(f"--dataset {dataset}: no such file (a .txt, or .jsonl with a 'text' "
                        "field per line)")


def read_file(path: Path) -> list[str]:
    """A .jsonl / .json file's "text" fields, or a text file's blank-line-separated parts."""
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"--dataset {path}: line {number} is not JSON ({exc})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"--dataset {path}: line {number} has no string 'text' field")
            texts.append(record["text"])
    else:
        texts = [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if not texts:
        raise UserError(f"--dataset {path}: no text in it")
    return texts


def default_texts(with_code: bool = True) -> list[str]:
    prose = read_file(PROSE_FILE)
    if not with_code:
        return prose
    code = read_file(CODE_FILE)
    texts = []
    for index in range(max(len(prose), len(code))):
        texts += [part[index] for part in (prose, code) if index < len(part)]
    return texts


def load_texts(dataset: str | None, with_code: bool = True) -> tuple[list[str], str]:
    """The calibration texts and a description of where they came from."""
    check_dataset_arg(dataset)
    if dataset is None:
        if not with_code:
            return default_texts(with_code=False), str(PROSE_FILE)
        return default_texts(), DEFAULT_SOURCE
    path = Path(dataset)
    if path.is_file():
        return read_file(path), str(path)
    try:  # a hub dataset id: only when the hub (or its cache) can be reached
        import datasets

        data = datasets.load_dataset(dataset, split="train")
        texts = [t for t in data["text"] if isinstance(t, str) and t.strip()]
    except Exception as exc:  # offline, unknown id, no 'text' column: all one line to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"--dataset {dataset}: not a local file, and the hub dataset could not "
                        f"be loaded ({type(exc).__name__}: {first})") from exc
    if not texts:
        raise UserError(f"--dataset {dataset}: no text in its train split")
    return texts, f"hub:{dataset}"
