"""The validation loss: the method's own loss on a validation set at fixed timesteps and fixed noise, under no_grad.

Every evaluation draws the same noise and the same timesteps for the same sample (counter-based, from the run seed
and the sample's number in the validation set), the same batches (the dataset's draw for a fixed seed) and the same
dropout, so two evaluations of the same weights give the same number, whatever the step, and a run that evaluates
trains exactly what a run that does not evaluate trains (the training draws are keyed by their own counters, and the
global RNG is restored after each forward).

Each validation batch is evaluated at `TIMESTEPS` timesteps spread evenly over the schedule (the middle of each
quarter: 125, 375, 625, 875 of 1000), so one number covers coarse and fine detail alike. With several processes every
process evaluates its slice of each batch, and the slices' losses weighted by their share are summed, as in a step.
"""

from __future__ import annotations

import torch

from finetune_core.data.data_batch import DataBatch, TrainingData
from finetune_core.train import objective, randomness
from finetune_core.train.job import Counters
from finetune_core.train.step import StepContext, build_train_batch

TIMESTEPS = 4  # evaluations per batch, at the middle of each of 4 equal parts of the schedule
NOISE = "validation-noise"
FORWARD = "validation-forward"
DATA = "validation-data"


def fixed_timesteps(num_timesteps: int, count: int = TIMESTEPS) -> list[int]:
    """`count` timesteps at the middle of `count` equal parts of {0..T-1}: 125, 375, 625, 875 for T = 1000."""
    return [int(num_timesteps * (k + 0.5) / count) for k in range(count)]


def validation_loss(ctx: StepContext, data: TrainingData) -> float:
    """The mean loss over every sample of one epoch of `data` at the fixed timesteps and noise; every process of a
    data-parallel run must call it at the same step (its sums are collectives)."""
    seed = randomness.stream_seed(ctx.seed, DATA, 0)
    steps = fixed_timesteps(ctx.alphas_cumprod.shape[0])
    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(data.batches_per_epoch()):
            full = data.get_batch(index, seed)
            shard = ctx.processes.shard(full)
            part = 0.0
            if len(shard.data):
                first = count + shard.start  # the global number of this process's first sample
                for k, t in enumerate(steps):
                    part += _loss_at(ctx, shard.data, first, k, index * len(steps) + k, t) * shard.weight
            total += ctx.processes.total(part) * len(full)  # the batch's mean loss summed over timesteps, x samples
            count += len(full)
    return total / (max(1, count) * len(steps))


def _loss_at(ctx: StepContext, data: DataBatch, first: int, k: int, forward: int, timestep: int) -> float:
    """The method's loss on `data` (samples `first`... of the validation set) at `timestep`, with the noise of draw
    `k` of each sample."""
    samples = [(first + i) * TIMESTEPS + k for i in range(len(data))]
    noise = objective.sample_noise(tuple(data.latents.shape), randomness.generators(ctx.seed, NOISE, samples))
    timesteps = torch.full((len(data),), timestep, dtype=torch.long)
    batch = build_train_batch(ctx, data, first, noise=noise, timesteps=timesteps)
    with randomness.seeded_global_rng(randomness.stream_seed(ctx.seed, FORWARD, forward), ctx.model.device), \
            ctx.autocast():
        return float(ctx.method.loss(ctx.model, batch).float())


def record_validation(counters: Counters, step: int, loss: float, patience: int) -> bool:
    """Count an evaluation in the run's counters (kept in the resume state); True when the run should stop early:
    `patience` evaluations in a row without a loss below the best so far (`patience` 0 never stops)."""
    if counters.best_validation is None or loss < counters.best_validation:
        counters.best_validation, counters.best_validation_step, counters.evaluations_since_best = loss, step, 0
    else:
        counters.evaluations_since_best += 1
    return patience > 0 and counters.evaluations_since_best >= patience
