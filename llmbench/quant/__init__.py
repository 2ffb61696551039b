"""Quantization: weight-only (INT8/INT4/NF4/FP8, round to nearest), INT4 GPTQ/AWQ checkpoints
and our own GPTQ, SmoothQuant static INT8; saved as best_model.safetensors + best_model.json.

- scheme.py: what a run does (as data) and round-to-nearest quantization of one weight;
- linears.py: the quantized projections (over llmbench.kernels) and the nn.Module wrapper;
- apply.py: putting them into a model (native map_linears or nn.Linear swap), save and load;
- quality.py: perplexity and greedy agreement against the float model;
- checkpoint.py: INT4 GPTQ/AWQ checkpoints made elsewhere (-m folders with a
  quantization_config, --low-precision-checkpoint files) read into Int4Linear, and the GPTQ
  layout written;
- gptq.py: our GPTQ (utils/run_gptq.py), calibrated layer by layer on a local text;
- smoothquant.py: SmoothQuant W8A8 (calibration, smoothing folded into norms / v_proj /
  up_proj, static int8 activations, float fallback, the --qconfig-summary-file recipe); the
  int8 x int8 kernel is llmbench.kernels.int8_act;
- the command lines are llmbench.cli.quantize (single_instance/run_quantization.py) and
  llmbench.cli.gptq (utils/run_gptq.py).
"""
