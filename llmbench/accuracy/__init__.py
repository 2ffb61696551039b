"""Accuracy with lm-eval (single_instance/run_accuracy.py): the model the benchmark runs, scored.

The model comes from the benchmark's own path (llmbench.models.load_model, then
llmbench.backends.prepare, same dtype and backend), and lm-eval 0.4.x scores it through
`HFLM(pretrained=<that model object>)`, so what is measured is what is benchmarked.

Tasks, in the order they run:
- `--tasks a,b`: any lm-eval task, group or tag name. Hub-backed data sets load from the local
  Hugging Face cache or the hub; when neither can provide them the run stops with one line.
- `--tasks-file FILE.yaml`: an lm-eval task definition (a local `dataset_path: json` works offline).
- `--lambada-file FILE.jsonl`: `{"text": ...}` per line, scored exactly as lm-eval's
  lambada_openai (context = all but the last word, target = the last word; accuracy and
  perplexity), through a task config generated here with `dataset_path: json`.
- none of these: the project's own llmbench/data/lambada_local.jsonl, so the command works on a
  fresh machine with no network.

Modules: `tasks` (what to evaluate; lm-eval), `single_instance` (one process),
`tensor_parallel` (every rank under AutoTP), `compare` (a table of saved reports).
"""
