"""``python -m mmfast.train`` / ``mmfast-train``: the reference CLIP/SigLIP trainer on mmfast's ops.

Quick start (no download, about 3 minutes on a 2-core CPU)::

    python -m mmfast.train                        # small CLIP on procedural shapes, runs/<timestamp>/
    python -m mmfast.train --loss siglip --out runs/siglip
    python -m mmfast.train --compare 10           # mmfast vs pure-torch reference + open_clip loss

What it trains: a windowed ViT (shifted windows with a relative position bias per block, then global
blocks with ToMe token merging and proportional attention; ``--window-size``, ``--no-shift``,
``--global-blocks``, ``--tome-r``) and a small text transformer over an offline word-level tokenizer
(byte fallback for unknown words), with ``mmfast.ClipLoss`` (default) or ``mmfast.SigLipLoss``
(``--loss siglip``). The window attention and ToMe ops are called through ``mmfast.functional``;
``--baseline`` swaps in ``mmfast.reference`` and open_clip's losses, ``--compare N`` times both.

Data:
    * default: procedural scenes ("two small red circles above a large blue square"), generated from
      ``--seed``; ``--synthetic-train`` / ``--synthetic-val`` scenes;
    * ``--train-data file.csv --csv-img-key filepath --csv-caption-key title --csv-separator ,``:
      open_clip's CSV format, image paths relative to the CSV's folder;
    * ``--train-data DIR``: images with same-named ``.txt`` captions.
    The held-out split is ``--val-data`` or ``--val-fraction`` of the training data.
    ``--synthetic-two-group-prob 0`` makes every procedural scene one group: 180 distinct captions,
    so a batch holds many identical ones.

Labels (``--labels``): ``caption`` makes identical captions of the global batch positives of each
other (not negatives), ``class`` the procedural scenes of one shape and colour class (of the first
group); the loss is then the labelled ``ClipLoss`` / ``SigLipLoss`` (``labels=``). docs/labels.md has
an experiment.

Output (``--out``, default ``runs/<timestamp>``): ``config.json``, ``tokenizer.json``,
``metrics.jsonl`` (a ``train`` line per ``--log-every`` steps, an ``eval`` line per evaluation with
image->text and text->image R@1/R@5 and their chance levels k/N, a final ``summary`` line with
throughput and peak step memory), ``summary.json``, ``checkpoints/step_*.pt`` (atomic, the newest
``--keep-checkpoints``), ``curves.png``. A progress bar (loss, samples/s, ETA) goes to stderr.

Resuming: ``--resume auto --out RUN`` (or ``--resume RUN`` / ``--resume RUN/checkpoints/step_N.pt``)
continues exactly, with the same losses as an uninterrupted run: model, optimizer, schedule, step,
torch/numpy/python RNG states and the data order (a pure function of ``--seed`` and the step) are
restored. Keep ``--threads`` the same for bitwise-equal losses (CPU kernels split reductions by
thread). Only ``--steps`` and run options (logging, evaluation, checkpoints, device, threads) may
change on resume. SIGINT/SIGTERM saves a checkpoint after the current step and exits (130/143); a
second signal aborts. A NaN/inf loss stops the run before that step is applied (exit code 1) and
never overwrites the last good checkpoint. Bad options are reported before anything runs (exit 2).

Distributed data parallel (one process per CPU socket-share or GPU)::

    torchrun --nproc_per_node=2 -m mmfast.train --batch-size 128        # gloo on CPU, NCCL on GPUs

RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE come from torchrun. ``--batch-size`` is the GLOBAL
batch: each rank takes a disjoint contiguous shard of every global batch (the batch must divide by
the world size), computes its local contrastive loss against the features of all ranks (mmfast's
grouped all-gather; ``--group-size`` ranks per gather group, default the ranks per node), and DDP
averages the gradients, so the optimisation equals a single process with the same global batch up to
float rounding. Rank 0 evaluates, logs and writes checkpoints.

Multi-node, through torchrun's rendezvous (run the same command on every node)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
        --rdzv_id=clip1 -m mmfast.train --batch-size 4096 --group-size 8 --out /shared/runs/clip1

``HOST`` is any node reachable by all (the c10d store runs there). ``--out`` and ``--resume`` must be
on a filesystem shared by the nodes (rank 0 writes, every rank reads a checkpoint on resume).
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the trainer with ``argv`` (default ``sys.argv[1:]``); returns the exit code:
    0 done, 1 diverged (NaN/inf), 2 bad option or data, 128 + signal when interrupted."""
    import torch.distributed as dist

    from mmfast.train.compare import compare
    from mmfast.train.config import ConfigError, parse_args, validate
    from mmfast.train.data import DataError
    from mmfast.train.distenv import init_distributed, world_from_env
    from mmfast.train.trainer import Diverged, Interrupted, train

    rank = 0
    env = None
    try:
        cfg, given = parse_args(argv)
        rank, world, _, _ = world_from_env()
        validate(cfg, world)
        env = init_distributed(cfg)
        if cfg.compare:
            compare(cfg, env)
        else:
            train(cfg, given, env)
        code = 0
    except (ConfigError, DataError) as e:
        if rank == 0:
            print(f"mmfast-train: error: {e}", file=sys.stderr)
        code = 2
    except Diverged as e:
        if rank == 0:
            print(f"mmfast-train: diverged: {e}", file=sys.stderr)
        code = 1
    except Interrupted as e:
        if rank == 0:
            print(f"mmfast-train: {e}", file=sys.stderr)
        code = 128 + e.signum
    finally:
        if env is not None and env.owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
