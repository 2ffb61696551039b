"""Statistics, the familiar summary lines, and reports written atomically (JSON + markdown)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from llmbench.atomic import write_text
from llmbench.bench import BenchmarkRun
from llmbench.timing import summarize

REPORT_SCHEMA = "llmbench.benchmark/1"
MS = 1000.0


def report_stem(family: str, dtype: str, backend: str, mode: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{os.getpid()}-{family}-{dtype}-{backend}-{mode}"


def compute_statistics(run: BenchmarkRun, batch_size: int, weight_bytes: int) -> dict[str, Any]:
    totals = [it.seconds for it in run.iterations]
    new_tokens = run.iterations[0].new_tokens if run.iterations else 0
    stats: dict[str, Any] = {
        "iterations": len(totals),
        "new_tokens_per_sequence": new_tokens,
        "batch_size": batch_size,
        "inference_latency_s": summarize(totals),
        "generated_tokens_per_s": (batch_size * new_tokens * len(totals) / sum(totals)
                                   if totals else None),
    }
    steps = [it.step_latencies for it in run.iterations if it.step_latencies]
    if steps:
        stats["first_token_latency_s"] = summarize([s[0] for s in steps])
        encoder = [it.encoder_seconds for it in run.iterations
                   if it.step_latencies and it.encoder_seconds is not None]
        if encoder:  # a multimodal model: the first token = encoders + language prefill
            stats["first_token_encoder_s"] = summarize(encoder)
            stats["first_token_language_prefill_s"] = summarize(
                [s[0] - e for s, e in zip(steps, encoder, strict=True)])
        next_tokens = [latency for s in steps for latency in s[1:]]
        stats["next_token_latency_s"] = summarize(next_tokens)
        if next_tokens:
            # gpt-fast's figure: every decode step reads all weights once (KV cache aside).
            mean_next = stats["next_token_latency_s"]["mean"]
            stats["decode_weight_read_gb_per_s"] = weight_bytes / mean_next / 1e9
    return stats


def summary_lines(stats: dict[str, Any]) -> list[str]:
    lines = ["", "---------- Summary: ----------"]
    total = stats["inference_latency_s"]
    lines.append(f"Inference latency: {total['mean'] * MS:.3f} ms.")
    if "first_token_latency_s" in stats:
        first = stats["first_token_latency_s"]
        lines.append(f"First token average latency: {first['mean'] * MS:.3f} ms.")
        if "first_token_encoder_s" in stats:
            lines.append(f"  of which encoder: {stats['first_token_encoder_s']['mean'] * MS:.3f}"
                         f" ms, language prefill: "
                         f"{stats['first_token_language_prefill_s']['mean'] * MS:.3f} ms.")
        rest = stats["next_token_latency_s"]
        if rest["count"]:
            lines.append(f"Average 2... latency: {rest['mean'] * MS:.3f} ms.")
            lines.append(f"P50 2... latency: {rest['p50'] * MS:.3f} ms.")
            lines.append(f"P90 2... latency: {rest['p90'] * MS:.3f} ms.")
            lines.append(f"P99 2... latency: {rest['p99'] * MS:.3f} ms.")
            lines.append(f"Stddev 2... latency: {rest['std'] * MS:.3f} ms.")
        else:
            lines.append("Average 2... latency: n/a (one new token per iteration)")
    lines.append(f"Generated tokens/s: {stats['generated_tokens_per_s']:.2f} "
                 f"({stats['batch_size']} x {stats['new_tokens_per_sequence']} tokens per "
                 f"iteration, {stats['iterations']} iterations)")
    return lines


def markdown(report: dict[str, Any]) -> str:
    stats = report["statistics"]
    model = report["model"]
    env = report["environment"]
    rows = [("status", report["status"]),
            ("model", f"{model['name']} ({model['family']}, {model['parameters']:,} parameters)"),
            ("dtype / backend", f"{model['dtype']} / {report['backend']['name']}"),
            ("decoding", report["decoding"]["mode"]),
            ("prompt tokens x batch", f"{report['prompt']['tokens']} x {stats['batch_size']}"),
            ("new tokens", stats["new_tokens_per_sequence"]),
            *input_rows(report.get("input")),
            ("iterations (warm-up)", f"{stats['iterations']} ({report['config']['num_warmup']})"),
            ("inference latency", f"{stats['inference_latency_s'].get('mean', 0) * MS:.2f} ms")]
    if "first_token_latency_s" in stats:
        rows.append(("first token", f"{stats['first_token_latency_s']['mean'] * MS:.2f} ms"))
        if "first_token_encoder_s" in stats:
            rows.append(("first token: encoder / language prefill",
                         f"{stats['first_token_encoder_s']['mean'] * MS:.2f} / "
                         f"{stats['first_token_language_prefill_s']['mean'] * MS:.2f} ms"))
        nxt = stats["next_token_latency_s"]
        if nxt["count"]:
            rows.append(("next token mean / p50 / p90 / p99",
                         " / ".join(f"{nxt[k] * MS:.2f}" for k in ("mean", "p50", "p90", "p99"))
                         + " ms"))
            rows.append(("decode weight read", f"{stats['decode_weight_read_gb_per_s']:.1f} GB/s"))
    if stats.get("generated_tokens_per_s"):
        rows.append(("generated tokens/s", f"{stats['generated_tokens_per_s']:.2f}"))
    rows += [("model load", f"{model['load_seconds']:.2f} s"),
             ("peak RSS", f"{report['peak_rss_bytes'] / 2**20:.0f} MiB"),
             ("CPU", f"{env['cpu']['model']} ({', '.join(env['cpu']['isa'])})"),
             ("threads", env["torch_threads"]),
             ("torch / transformers", f"{env['packages']['torch']} / "
                                      f"{env['packages']['transformers']}"),
             ("git revision", env["git_revision"])]
    for note in report.get("notes", []):
        rows.append(("note", note))
    lines = [f"# llmbench benchmark: {report['created']}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows]
    return "\n".join(lines) + "\n"


def input_rows(inputs: dict[str, Any] | None) -> list[tuple[str, str]]:
    """A multimodal run's inputs (llmbench.multimodal.Request.record); none for text."""
    if not inputs or not inputs.get("mode"):
        return []
    rows = [("input mode", f"{inputs['mode']} ({inputs['mode_name']})")]
    if inputs.get("image"):
        rows.append(("image", f"{inputs['image']['source']} ({inputs['image']['size']})"))
    if inputs.get("audio"):
        rows.append(("audio", f"{inputs['audio']['source']} ({inputs['audio']['seconds']} s)"))
    return rows


class ReportWriter:
    """Owns one report: rewritten atomically after every measured iteration, so a run that is
    stopped or fails half-way still leaves what it measured, marked as such."""

    def __init__(self, output_dir: str, stem: str, base: dict[str, Any]) -> None:
        self.json_path = Path(output_dir) / f"{stem}.json"
        self.markdown_path = Path(output_dir) / f"{stem}.md"
        self.report = dict(base)

    def update(self, status: str, run: BenchmarkRun, stats: dict[str, Any],
               **extra: Any) -> None:
        from llmbench.environment import peak_rss_bytes

        self.report.update(extra)
        self.report["status"] = status
        self.report["statistics"] = stats
        self.report["peak_rss_bytes"] = peak_rss_bytes()
        self.report["warmup_seconds"] = run.warmup_seconds
        self.report["iterations"] = [
            {"seconds": it.seconds, "new_tokens": it.new_tokens,
             "step_latencies_s": it.step_latencies,
             **({} if it.encoder_seconds is None else {"encoder_s": it.encoder_seconds})}
            for it in run.iterations]
        self.report["generated_text"] = run.generated_text
        write_text(self.json_path, json.dumps(self.report, indent=1) + "\n")
        if stats.get("iterations"):
            write_text(self.markdown_path, markdown(self.report))

    def fail(self, message: str) -> None:
        self.report["status"] = "failed"
        self.report["error"] = message
        write_text(self.json_path, json.dumps(self.report, indent=1) + "\n")
