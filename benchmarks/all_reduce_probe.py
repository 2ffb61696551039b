#!/usr/bin/env python3
"""What one all-reduce costs between ranks on this machine: DeepSpeed's shared-memory operator
(what `--autotp --backend native` calls inside the C++ step) against the gloo process group,
for a hidden state of SmolLM2 (576 floats), 2048 floats and SmolLM2's logits (49152 floats).

    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 --bind_cores_to_rank \\
        benchmarks/all_reduce_probe.py

Rank 0 prints microseconds per call (mean over a loop, after a warm-up).
"""

from __future__ import annotations

import time
from datetime import timedelta

SIZES = (576, 2048, 49152)


def main() -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(timeout=timedelta(seconds=60), verbose=False,
                               auto_mpi_discovery=False)
    shared_memory = torch.ops.deepspeed.inference_all_reduce_
    for size in SIZES:
        data = torch.ones(size)
        for name, op, calls in (("shared memory", shared_memory, 2000),
                                ("gloo", dist.all_reduce, 200)):
            for _ in range(calls // 10):
                op(data)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                op(data)
            seconds = (time.perf_counter() - start) / calls
            if dist.get_rank() == 0:
                print(f"{size} floats, {name}: {seconds * 1e6:.1f} us per all-reduce", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
