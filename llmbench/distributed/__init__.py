"""Distributed inference with DeepSpeed AutoTP (tensor parallel), and model sharding.

One process per rank, started by a launcher (`deepspeed`, `torchrun`, mpirun): each builds the
model on the meta device, and `deepspeed.init_inference` loads the checkpoint shard by shard,
keeping only this rank's slice of every Linear layer. Generation, timing and the report are those
of the single-instance benchmark; rank 0 prints the summary and writes the report, which adds
the world size, every rank's cores and peak RSS, and the communication backend.

DeepSpeed pitfalls on CPU, each guarded here so a user can't hit them:
- without Intel's oneCCL bindings DeepSpeed uses gloo plus its shared-memory all-reduce op, whose
  C++ side reads LOCAL_SIZE; a launcher that doesn't set it (torchrun) made that op segfault, so
  LOCAL_SIZE is set from the launcher's own variables (`setup_environment`), and when the ranks
  are not all on one machine the shared-memory path is switched off (`guard_shm_all_reduce`);
- a checkpoint passed to init_inference is silently not loaded into a model whose weights are not
  on the meta device, and not at all with one rank: `init_autotp` asserts both;
- files written by init_inference's `save_mp_checkpoint_path` can't be loaded back on CPU: never
  used, and refused if someone passes it;
- weights DeepSpeed's loader doesn't know are left on the meta device, and non-persistent buffers
  (rotary inv_freq) are cast or emptied: both are put back from the checkpoint / the model.

A rank that fails prints `error: rank N: ...` and exits at once (`run_rank`); the launcher then
stops the other ranks, and a rank waiting on a dead peer fails after --dist-timeout at the latest.

Modules, by concern: `ranks` (the process group, the all-reduce path, failing fast), `shards`
(where the weights are; resharding), `model` (the tensor-parallel model, stock or native, and
quantizing a rank's slice), `benchmark` (the generation benchmark every rank runs). The accuracy
harness's ranks (llmbench.accuracy.tensor_parallel) use the same three lower modules.
"""
