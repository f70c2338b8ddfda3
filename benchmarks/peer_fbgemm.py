"""Peer: FBGEMM's CPU training operator on the embedding-step workload.

One table of V rows x D (or, with `--table-sizes`, one table per feature)
in FBGEMM's table-batched embedding (TBE) training module on the host,
the 26 features mapped to it, bag size 1 (sum pooling
of one id), exact row-wise Adagrad fused into the backward pass, loss
`Σ rows · c` as in `embedding_step.py`. Measures FP32 and FP16 weights and
records whether INT8 weights can train on CPU at all.

Needs the `peer` extra (`pip install -e ".[peer]"`: torch 2.13 CPU and
fbgemm-gpu-cpu 1.8.0), best in its own virtual environment; TensorFlow is
not imported. `embedding_step.py --peer-python PYTHON` runs it side by side
with the TensorFlow setups, one turn per round.

    python benchmarks/peer_fbgemm.py --json out.json
"""

import argparse
import json
import time

import numpy as np


def _tbe(rows, dim, fields, precision, sizes=None):
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(v, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)
                         for v in (sizes or [rows])],
        feature_table_map=list(range(fields)) if sizes else [0] * fields,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01, eps=1e-8,
        weights_precision=getattr(SparseType, precision),
        stochastic_rounding=True,
        pooling_mode=PoolingMode.SUM,
        device=torch.device("cpu"),
    )


def measure(precision, ids, rows, dim, steps, warmup, sizes=None):
    import torch

    batch, fields = ids.shape
    try:
        tbe = _tbe(rows, dim, fields, precision, sizes)
    except Exception as error:  # noqa: BLE001 - recorded, not hidden
        return {"setup": f"fbgemm_{precision.lower()}", "supported": False,
                "error": f"{type(error).__name__}: {error}"[:300]}
    # TBE layout: indices grouped by feature, then by example.
    indices = torch.from_numpy(np.ascontiguousarray(ids.T).reshape(-1))
    offsets = torch.arange(0, indices.numel() + 1, dtype=torch.int64)
    upstream = torch.from_numpy(np.random.default_rng(1).normal(
        0, 1e-4, size=(batch, fields * dim)).astype(np.float32))
    times = []
    try:
        for i in range(warmup + steps):
            start = time.perf_counter()
            out = tbe(indices, offsets)
            (out.float() * upstream).sum().backward()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001
        return {"setup": f"fbgemm_{precision.lower()}", "supported": False,
                "error": f"{type(error).__name__}: {error}"[:300]}
    return {"setup": f"fbgemm_{precision.lower()}", "supported": True,
            "step_seconds": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2**20)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--features", type=int, default=26)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default)")
    parser.add_argument("--precisions", nargs="+",
                        default=["FP32", "FP16", "INT8"])
    parser.add_argument("--table-sizes", type=int, nargs="+", default=None,
                        help="one table per feature, of these sizes (the "
                             "criteo_like layout; ids % size)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # `_report.workload_ids`, restated: the peer's environment has no
    # TensorFlow, which `_report` imports.
    ids = np.random.default_rng(0).zipf(
        1.2, size=(args.batch, args.features)) % (
            np.asarray(args.table_sizes) if args.table_sizes else args.rows)
    import fbgemm_gpu

    results = [measure(p, ids, args.rows, args.dim, args.steps, args.warmup,
                       args.table_sizes)
               for p in args.precisions]
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"torch": torch.__version__,
                   "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
                   "threads": torch.get_num_threads(),
                   "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
