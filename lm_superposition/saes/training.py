"""Train SAE-Lens SAEs for several hooks from ONE pass over streamed activations.

`train_saes` trains from any stream of {hook: [tokens, d_in]} batches, `train_sae` from one
tensor, `train_saes_for_model` from a model and token windows (saving each SAE and judging it
on held-out windows): what `[saes.train]` and `lm-superposition train-sae` run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import warnings
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch
from sae_lens import (
    SAE,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata, TrainStepInput, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from ..activations import stream_activations
from ..config import SAETrainingConfig
from ..kernels import compiles_per_shape, linear
from ..models import Model, hook_point
from .loading import save_sae
from .quality import evaluate_saes

# --- training ---------------------------------------------------------------------------
#
# SAE-Lens's `SAETrainer.fit` (and `MultiSAETrainer.fit`) pull exactly `total_training_samples`
# from their data provider and cannot stop cleanly when a one-pass stream runs out first; the
# multi-SAE one also throws away its norm-estimation batches, which a single pass cannot spare.
# So we drive the trainers' public `step` seam ourselves, one `SAETrainer` per hook: SAE-Lens
# still owns the loss (`training_forward_pass`), optimiser, schedules, gradient clipping and
# dead-feature tracking; this loop only routes each batch of tokens to every SAE.
#
# One trainer per SAE, not one batched trainer over stacked weights: measured on this project's
# CPU (experiments/benchmarks/sae_step_profile.py, results/benchmarks/sae_step_profile.md), one
# torch.bmm over 55 stacked SAEs is no faster per SAE than 55 separate matmuls (slower in
# float32 and in bfloat16), and what is left of a step beyond its matmuls is per-element work
# (top-k, Adam's update, the sparse decode) that stacking would not shrink. The levers were the
# arithmetic and the interpreter, each measured on the 55-hook peer benchmark
# (experiments/benchmarks/vs_sparsify.py; results/benchmarks/peers/): `SparseTopKTrainingSAE`
# (codes kept sparse from encode to decode, top-k selected in numpy, no input gradient,
# auxiliary loss over the dead latents only, decoder norms without their cancelling gradient),
# float32 matmuls on the CPU's faster kernel (`kernels.linear`), torch's fused Adam (`_new_trainer`),
# the cyclic garbage collector paused (`_cyclic_gc_paused`), shuffle buffers filled in place
# (`_fixed_size_batches`), precision (`autocast`: bfloat16 matmuls) and the forward pass
# (`autocast_lm`).


class SparseTopKTrainingSAE(TopKTrainingSAE):
    """SAE-Lens's TopK training SAE, computing only what its k active latents per token need.

    k of d_sae latents are on (32 of 1,280 in the peer benchmark), yet SAE-Lens runs TopK
    training densely: it scatters the codes into a [tokens, d_sae] matrix, decodes it with a
    [tokens, d_sae] @ [d_sae, d_in] matmul with the two gradients behind it, takes the top k
    over every latent, and its auxiliary loss decodes all latents again; the encoder's input
    gradient, a matmul as large as the encode, is formed for data that needs none. Its sparse
    option (`use_sparse_activations`) fails in the backward pass on CPU (aten::view has no
    SparseCPU kernel). Here, the way eai-sparsify's fused decoder works, the codes stay each
    token's k (latent, value) pairs and the decode is an `embedding_bag` over them; the top k
    is selected row by row in numpy (`_top_k_latents`); the encoder gives b_dec its gradient
    without an input gradient (`_CentredLinear`); the auxiliary loss works on the dead latents'
    columns only. The same losses and gradients up to summation order (tests/test_precision.py),
    and everything else (losses, optimiser, schedules, dead-latent tracking, saving as an
    SAE-Lens TopKSAE) is SAE-Lens's.
    """

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        # TrainingSAE.training_forward_pass with the codes kept as each token's k (latent,
        # value) pairs from encode to decode, where SAE-Lens scatters them into a dense
        # [tokens, d_sae] matrix that the decode reads (and the backward passes through) whole.
        x = step_input.sae_in
        if x.ndim != 2 or self.cfg.use_sparse_activations or self.hook_sae_acts_post.fwd_hooks:
            return super().training_forward_pass(step_input)  # what the dense codes serve
        # W_dec is fixed within a step: its row norms (used three times) are computed once
        self._step_norms = self._decoder_norms() if self.cfg.rescale_acts_by_decoder_norm else None
        try:
            return self._sparse_training_forward_pass(step_input)
        finally:
            self._step_norms = None

    def _sparse_training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x = step_input.sae_in
        hidden_pre = self._hidden_pre(x)
        latents = _top_k_latents(hidden_pre, self.cfg.k)  # SAE-Lens's TopK activation
        values = hidden_pre.gather(-1, latents).relu()
        rows = torch.arange(len(x), device=x.device).repeat_interleave(self.cfg.k)
        reconstruction = self._decode_active(rows, latents.flatten(), values.flatten(), len(x))
        # the rest as TopKTrainingSAE.decode does it
        sae_out = self.hook_sae_recons(reconstruction + self.b_dec)
        sae_out = self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out), self.d_head)
        with torch.no_grad():  # the dense codes, for the trainer's firing statistics
            feature_acts = torch.zeros_like(hidden_pre).scatter_(-1, latents, values)
        mse_loss = self.mse_loss_fn(sae_out, x).sum(dim=-1).mean()
        aux_losses = self.calculate_aux_loss(
            step_input=step_input, feature_acts=feature_acts, hidden_pre=hidden_pre, sae_out=sae_out
        )
        return TrainStepOutput(
            sae_in=x,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=mse_loss + sum(aux_losses.values()),
            losses={"mse_loss": mse_loss, **aux_losses},
        )

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self._hidden_pre(x)
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    def _hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """TopKTrainingSAE.encode_with_hidden_pre up to the activation, with the encoder matmul
        as _CentredLinear and the decoder norms without their gradient (_decoder_norms)."""
        sae_in = self.process_sae_in(x)  # SAE-Lens's x - b_dec, reshaped and hooked
        # Activations are data: the encoder's input gradient only reaches b_dec, which the
        # function then gets as one matvec instead of a [tokens, d_in] input gradient.
        centre = self.b_dec if self.cfg.apply_b_dec_to_input and not x.requires_grad else None
        inputs = (sae_in if centre is None else sae_in.detach()).reshape(-1, sae_in.shape[-1])
        hidden_pre = _CentredLinear.apply(inputs, self.W_enc, self.b_enc, centre)
        hidden_pre = self.hook_sae_acts_pre(hidden_pre.reshape(*sae_in.shape[:-1], -1))
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self._decoder_norms()
        return hidden_pre

    def _decode_active(
        self, rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, n_rows: int
    ) -> torch.Tensor:
        """[n_rows, d_in]: row r is the sum of values[i] * W_dec[latents[i]] over the i with
        rows[i] == r (rows sorted), codes in SAE-Lens's decoder-norm units where it rescales them."""
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self._decoder_norms()[latents]
        return _weighted_row_sums(self.W_dec, latents, rows, n_rows, values)

    def _decoder_norms(self) -> torch.Tensor:
        """The norms of W_dec's rows, without their gradient. SAE-Lens multiplies the pre-
        activations by them and divides the codes by them again before decoding (main and
        auxiliary decode alike), so their gradients through the two cancel exactly: computing
        them would cost a step two norm backward passes over W_dec (~0.8 ms each at 1,280 x 640)
        and a dense product with the pre-activations for a sum that is zero up to rounding.
        Within one `training_forward_pass` they are computed once, not three times (0.4 ms each
        in the 55-hook peer benchmark, where W_dec is rarely still in cache)."""
        step_norms = getattr(self, "_step_norms", None)
        if step_norms is not None:
            return step_norms
        with torch.no_grad():
            return self.W_dec.norm(dim=-1)

    def calculate_topk_aux_loss(
        self,
        sae_in: torch.Tensor,
        sae_out: torch.Tensor,
        hidden_pre: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # SAE-Lens 6.54's TopKTrainingSAE.calculate_topk_aux_loss, re-written because it takes
        # each token's top k_aux = d_in / 2 over all d_sae latents (the live ones masked to -inf)
        # and decodes them as a dense [tokens, d_sae] @ [d_sae, d_in] matmul with its two
        # gradients. Here both run over the dead latents' columns only: the top-k among them
        # (none where there are at most k_aux, as every token then selects all of them: 60% of
        # the 55-hook peer benchmark's SAE steps, 29% had more), and the decode as a
        # [tokens, dead] @ [dead, d_in] matmul. The same k_aux, scale, selection and loss; the
        # checks and the reshaping as there. The decode is `kernels.linear`: in float32 on an AMD CPU
        # it and its two gradients run on oneDNN, 1.1 / 2.2 ms with 200 / 500 dead latents against
        # torch's 1.8 / 4.4 there (experiments/benchmarks/training_step_parts.py).
        if self.cfg.aux_loss_coefficient == 0:  # the loss would be multiplied by 0: skip its top-k and decode
            return sae_in.new_zeros(())
        if (
            hidden_pre.ndim != 2
            or dead_neuron_mask is None
            or (num_dead := int(dead_neuron_mask.sum())) == 0
            or self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm")  # SAE-Lens raises
        ):
            return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)
        k_aux = sae_in.shape[-1] // 2
        dead = dead_neuron_mask.nonzero().squeeze(1)
        codes = hidden_pre[:, dead]
        if num_dead > k_aux:  # each token keeps its k_aux largest
            top = _top_k_latents(codes, k_aux)
            codes = torch.zeros_like(codes).scatter(-1, top, codes.gather(-1, top))
        if self.cfg.rescale_acts_by_decoder_norm:
            codes = codes / self._decoder_norms()[dead]
        decoder = self.W_dec[dead]
        # Where oneDNN runs the matmuls, their width is rounded up with zero latents (which add
        # exactly nothing): the number of dead latents changes from step to step, and oneDNN
        # compiles a kernel for each new shape (`kernels.compiles_per_shape`). On this project's
        # Xeon, a bfloat16 auxiliary decode with its gradients took 7-9 ms padded against 17 ms
        # unpadded at a new width each step; in float32 on MKL, 7-8 ms unpadded, 8-10 ms padded.
        padding = -num_dead % AUX_WIDTH_STEP if compiles_per_shape(self.W_dec) else 0
        if padding:
            codes = torch.nn.functional.pad(codes, (0, padding))
            decoder = torch.nn.functional.pad(decoder, (0, 0, 0, padding))
        recons = self.reshape_fn_out(linear(codes, decoder), self.d_head)
        auxk_loss = (recons - (sae_in - sae_out).detach()).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * min(num_dead / k_aux, 1.0) * auxk_loss


# The auxiliary loss's decode runs over a multiple of this many latents (see calculate_topk_aux_loss).
AUX_WIDTH_STEP = 128


def _top_k_latents(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[tokens, k]: the latents of each token's k largest scores, as torch.topk (sorted=False) finds
    them (which of equal values it picks may differ; NaN counts as largest in both).

    On a CPU through numpy's argpartition, a selection per row in C: at the 55-hook peer
    benchmark's shape ([254, 1,280], k 32; 1 thread) 2.2 ms against torch.topk's 4.4 ms and the
    3.6 ms of the search among candidates this step used before (sessions 7 to 10) on the Intel
    Xeon of session 11 (experiments/benchmarks/training_step_parts.py,
    results/benchmarks/xeon/training_step_parts.md). Half-precision scores are widened to float32
    first (exactly), as numpy has no bfloat16.
    """
    if scores.device.type != "cpu" or scores.ndim != 2:
        return scores.topk(k, dim=-1, sorted=False).indices
    with torch.no_grad():
        scores = scores.detach()
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()
        return torch.from_numpy(np.argpartition(scores.numpy(), -k, axis=1)[:, -k:])


class _CentredLinear(torch.autograd.Function):
    """x @ W + b, where x may be data minus a `centre` (an SAE's input minus its b_dec).

    Activations are data: the gradient of x only reaches the centre, as -W @ grad.sum(0), one
    matvec where autograd would form x's [tokens, d_in] gradient (a matmul as large as the
    encode) and sum it. So pass x detached and the centre here; with centre None, x gets its own
    gradient. The matmuls are `kernels.linear` (oneDNN in float32 on an AMD CPU); under autocast the
    forward runs in bfloat16 as in SAE-Lens, and so does the W gradient.

    The W gradient is the dense x.T @ grad, although TopK leaves grad zero outside each token's
    k latents and the dead latents of the auxiliary loss. Summing over its nonzeros instead
    (embedding_bag, the way eai-sparsify's fused encoder does) was this project's path until the
    matmul ran on oneDNN (on the project's AMD CPU, where these times were taken). Now the matmul
    takes the same time whatever the gradient, while the sums grow with the dead latents and need
    a copy into W's layout: at the peer benchmark's shape, 1.4 ms for the sums against 1.75 for
    the matmul with no dead latents, 1.9 / 2.9 ms against 1.7 with 200 / 500 of 1,280 dead
    (experiments/benchmarks/training_step_parts.py,
    results/benchmarks/training_step_parts.md); on the 55-hook peer benchmark 89% of the SAE
    steps had dead latents, 29% more than 320 (see calculate_topk_aux_loss).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, centre: torch.Tensor | None):
        ctx.save_for_backward(x, W)
        autocast = torch.is_autocast_enabled(x.device.type)
        ctx.matmul_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        return linear(x, W, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, W = ctx.saved_tensors
        needs_grad_x, needs_grad_W, needs_grad_b, needs_grad_centre = ctx.needs_input_grad
        matmul_dtype = ctx.matmul_dtype
        grad_b = grad.sum(0)
        grad_x = grad_W = grad_centre = None
        if needs_grad_centre:
            grad_centre = -(W @ grad_b.to(W.dtype))
        if needs_grad_x:
            grad_x = linear(grad.to(matmul_dtype), W.to(matmul_dtype).T).to(x.dtype)
        if needs_grad_W:
            grad_W = linear(x.T.to(matmul_dtype), grad.to(matmul_dtype)).to(W.dtype)
        return grad_x, grad_W, grad_b if needs_grad_b else None, grad_centre


def _weighted_row_sums(
    table: torch.Tensor, indices: torch.Tensor, groups: torch.Tensor, n_groups: int, weights: torch.Tensor
) -> torch.Tensor:
    """[n_groups, table width]: row g is the sum of weights[i] * table[indices[i]] over the i with
    groups[i] == g; `groups` must be sorted (each group's entries together)."""
    per_group = torch.bincount(groups, minlength=n_groups)
    offsets = per_group.cumsum(0) - per_group
    return torch.nn.functional.embedding_bag(
        indices,
        table.contiguous(),  # on a strided table embedding_bag is ~30x slower than the copy
        offsets,
        mode="sum",
        per_sample_weights=weights.to(table.dtype),
    )


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cyclic garbage collector off for the block, back on after (if it was on).

    A training step makes thousands of short-lived objects (tensors, autograd nodes, SAE-Lens's
    step outputs), so the collector ran every few hundred allocations and traversed them and
    the model's long-lived objects (`perf` over a 55-hook peer benchmark process had
    gc_collect_main as its top symbol, 10.7% of samples, setup included). Pausing it made that
    benchmark's training 10-14% faster in bfloat16 and 5-10% in float32 (32-window runs). The
    steps leave no reference cycles (a collection after 80 steps of 11 SAEs found no
    unreachable object): their memory is freed by reference counts as before.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_cyclic_gc_paused()
def train_saes(
    batches: Iterable[dict[str, torch.Tensor]],
    widths: dict[str, int],
    config: SAETrainingConfig,
    progress: bool = True,
    sae_seeds: Sequence[int] | None = None,
) -> dict:
    """Train one SAE per hook in `widths` ({hook_name: d_in}) from one pass over `batches`.

    Each batch is {hook_name: [tokens, d_in]} (the same tokens for every hook) and feeds every
    SAE. Training stops after `config.training_tokens` tokens or when the stream ends (with a
    warning). Returns {hook: SAE}: inference SAEs (SAE-Lens `StandardSAE` / `TopKSAE`) with
    `cfg.metadata.hook_name`, `model_name` and `training_tokens` set.

    sae_seeds: train one SAE per hook for each seed, all from the same stream (the seeds differ
    in initialisation; every SAE sees the same batches); returns {hook: {seed: SAE}} then.
    """
    if not widths:
        raise ValueError("widths is empty: give {hook_name: d_in} for at least one hook")
    seeds = [config.seed] if sae_seeds is None else list(sae_seeds)
    trainers = {}
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's RNG
            torch.manual_seed(seed)
            trainers |= {(hook, seed): _new_trainer(hook, d_in, config) for hook, d_in in widths.items()}
    shuffle = torch.Generator().manual_seed(config.seed)
    stream = _fixed_size_batches(batches, widths, config.batch_size_tokens, config.shuffle_buffer_batches, shuffle)

    first_batches = list(islice(stream, config.shuffle_buffer_batches))
    if not first_batches:
        raise ValueError(
            f"the activations hold fewer than batch_size_tokens={config.batch_size_tokens} tokens; "
            "give more tokens or a smaller batch_size_tokens"
        )
    for (hook, _), trainer in trainers.items():
        _initialise_from_data(trainer, [batch[hook] for batch in first_batches], config)

    n_tokens = 0
    bar = tqdm(total=config.training_tokens, unit="tok", desc=f"training {len(trainers)} SAE(s)", disable=not progress)
    for batch in chain(first_batches, stream):
        mse = {}
        for (hook, seed), trainer in trainers.items():
            trainer.maybe_reset_sparsity()
            output = trainer.step(batch[hook])
            trainer.n_training_steps += 1
            mse[hook, seed] = output.losses["mse_loss"].item()
        n_tokens += config.batch_size_tokens
        bar.update(config.batch_size_tokens)
        bar.set_postfix(mean_mse=f"{sum(mse.values()) / len(mse):.4g}")
        if n_tokens >= config.training_tokens:
            break
    bar.close()
    if n_tokens + config.batch_size_tokens <= config.training_tokens:  # short by a whole batch or more
        warnings.warn(
            f"the activation stream ended after {n_tokens} tokens, before training_tokens={config.training_tokens}; "
            "the SAEs are trained on what there was",
            stacklevel=2,
        )
    saes = {key: _to_inference_sae(trainer, n_tokens) for key, trainer in trainers.items()}
    if sae_seeds is None:
        return {hook: saes[hook, config.seed] for hook in widths}
    return {hook: {seed: saes[hook, seed] for seed in seeds} for hook in widths}


def train_sae(
    activations: torch.Tensor,
    config: SAETrainingConfig,
    hook_name: str = "toy",
    progress: bool = False,
) -> SAE:
    """Train one SAE on a [tokens, d_in] tensor, cycling over it (reshuffled) until the token budget."""
    if activations.ndim != 2:
        raise ValueError(f"activations must be [tokens, d_in], got shape {tuple(activations.shape)}")
    epochs = _epochs(activations, hook_name, torch.Generator().manual_seed(config.seed))
    return train_saes(epochs, {hook_name: activations.shape[1]}, config, progress=progress)[hook_name]


def _epochs(activations: torch.Tensor, hook_name: str, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield {hook_name: activations[torch.randperm(len(activations), generator=generator)]}


def _new_trainer(hook_name: str, d_in: int, config: SAETrainingConfig) -> SAETrainer:
    common = dict(
        d_in=d_in,
        d_sae=config.width_for(d_in),
        device=config.device,
        normalize_activations="expected_average_only_in" if config.normalize_activations else "none",
        decoder_init_norm=config.decoder_init_norm,
        metadata=SAEMetadata(hook_name=hook_name, model_name=config.model_name),
    )
    steps = config.total_steps
    sae: TrainingSAE
    if config.architecture == "standard":
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(l1_coefficient=config.l1_coefficient, l1_warm_up_steps=steps // 20, **common)
        )
    else:
        sae = SparseTopKTrainingSAE(
            TopKTrainingSAEConfig(k=config.k, aux_loss_coefficient=config.aux_loss_coefficient, **common)
        )
    trainer_config = SAETrainerConfig(
        total_training_samples=config.training_tokens,
        train_batch_size_samples=config.batch_size_tokens,
        lr=config.learning_rate(common["d_sae"]),
        lr_end=config.learning_rate(common["d_sae"]),  # the decay runs from lr to 0
        lr_decay_steps=steps // 5,
        device=config.device,
        # SAE-Lens's 1000-step windows assume millions of tokens; short runs need shorter ones
        # for the dead-feature count (and topk's auxiliary loss on dead features) to mean anything.
        dead_feature_window=max(1, min(1000, steps // 10)),
        feature_sampling_window=max(1, min(2000, steps // 5)),
        logger=LoggingConfig(log_to_wandb=False),
        autocast=config.autocast,
    )
    trainer = SAETrainer(cfg=trainer_config, sae=sae, data_provider=iter(()))
    # SAE-Lens builds its Adam with torch's default multi-tensor update; torch's fused kernel
    # (CPU and CUDA) makes the same update in one pass over each weight: 0.8 ms instead of 5.9
    # for a 1,280 x 640 SAE on this project's CPU, a sixth of a TopK step. Set before the first
    # step, the flag is all Adam reads; the learning-rate schedule keeps the same optimiser.
    # TopK only: the fused kernel rounds differently, and over 422 steps that moved the demo's
    # standard-SAE F by 0.3% (median; 10% at its most fragile hook), so the validated recipe
    # keeps the update its committed results (demo, full depth, toy validation) were made with.
    fusable = all(torch.is_floating_point(p) and p.device.type in ("cpu", "cuda") for p in sae.parameters())
    if config.architecture == "topk" and fusable:
        for group in trainer.optimizer.param_groups:
            group["fused"] = True
    return trainer


@torch.no_grad()
def _initialise_from_data(trainer: SAETrainer, first_batches: list[torch.Tensor], config: SAETrainingConfig) -> None:
    """Estimate the input scaling (SAE-Lens) and start b_dec at the data mean.

    SAE-Lens 6 dropped its b_dec initialisers; starting at the mean spares the features from
    having to learn the (large, in residual streams) constant offset first.
    """
    if config.normalize_activations:
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=trainer.sae.cfg.d_in, data_provider=iter(first_batches), n_batches_for_norm_estimate=len(first_batches)
        )
    scaled = trainer.activation_scaler(torch.cat(first_batches).to(trainer.sae.device, trainer.sae.dtype))
    trainer.sae.b_dec.copy_(scaled.mean(dim=0))


@torch.no_grad()
def _to_inference_sae(trainer: SAETrainer, n_tokens: int) -> SAE:
    """Fold the input scaling into the weights and convert to SAE-Lens's inference class.

    Does in memory what `TrainingSAE.save_inference_model` + `SAE.load_from_disk` do on disk.
    """
    training_sae = trainer.sae
    if trainer.activation_scaler.scaling_factor is not None:
        training_sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()  # records l0 and num_dead_features of the last window
    training_sae.cfg.metadata.training_tokens = n_tokens
    state_dict = training_sae.state_dict()
    training_sae.process_state_dict_for_saving_inference(state_dict)
    sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state_dict)
    return sae.eval()


def _fixed_size_batches(
    batches: Iterable[dict[str, torch.Tensor]],
    widths: dict[str, int],
    batch_size: int,
    buffer_batches: int,
    generator: torch.Generator,
) -> Iterator[dict[str, torch.Tensor]]:
    """Re-cut a stream of {hook: [tokens, d_in]} into shuffled batches of exactly `batch_size` tokens.

    Tokens are shuffled within a buffer of `buffer_batches` batches (the same permutation for
    every hook); a last remainder smaller than one batch is dropped.

    Each hook's buffer is one tensor, allocated once and refilled in place: concatenating the
    pending batches afresh for every buffer (5 MB a hook, 55 hooks) cost 17 ms a concatenation
    on this project's CPU, nearly all of it the kernel mapping the new memory in, 2.9 s of a
    38 s 55-hook training run (cProfile, experiments/benchmarks/vs_sparsify.py, 64 windows).
    """
    buffers: dict[str, torch.Tensor] = {}
    n_pending = 0
    for batch in batches:
        n_new = _check_batch(batch, widths)
        for hook in widths:
            acts = batch[hook].detach()
            buffer = buffers.get(hook)
            if buffer is None or len(buffer) < n_pending + n_new:  # the first batch, or a larger one
                grown = acts.new_empty((batch_size * buffer_batches + n_new, acts.shape[1]))
                if buffer is not None:
                    grown[:n_pending] = buffer[:n_pending]
                buffers[hook] = buffer = grown
            buffer[n_pending : n_pending + n_new] = acts
        n_pending += n_new
        if n_pending >= batch_size * buffer_batches:
            yield from _shuffled_batches(buffers, n_pending, batch_size, generator)
            n_pending %= batch_size  # the remainder, moved to the front of each buffer
    if n_pending >= batch_size:
        yield from _shuffled_batches(buffers, n_pending, batch_size, generator)


def _shuffled_batches(
    buffers: dict[str, torch.Tensor], n_pending: int, batch_size: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """The first n_pending tokens of the buffers as whole shuffled batches (copies); the tokens
    left over, fewer than a batch, go to the front of each buffer."""
    order = torch.randperm(n_pending, generator=generator)
    n_full = n_pending - n_pending % batch_size
    for start in range(0, n_full, batch_size):
        rows = order[start : start + batch_size]
        yield {hook: buffer[rows] for hook, buffer in buffers.items()}
    rest = order[n_full:]
    for buffer in buffers.values():
        buffer[: len(rest)] = buffer[rest]  # indexing copies first, so the overlap is safe


def _check_batch(batch: dict[str, torch.Tensor], widths: dict[str, int]) -> int:
    """Number of tokens in a batch, after checking it has every hook at the right width."""
    missing = [hook for hook in widths if hook not in batch]
    if missing:
        raise ValueError(f"activation batch lacks hooks {missing}; it has {sorted(batch)}")
    n_tokens = {}
    for hook, d_in in widths.items():
        acts = batch[hook]
        if acts.ndim != 2 or acts.shape[1] != d_in:
            raise ValueError(f"activations for {hook} must be [tokens, {d_in}], got shape {tuple(acts.shape)}")
        n_tokens[hook] = acts.shape[0]
    if len(set(n_tokens.values())) > 1:
        raise ValueError(f"every hook must hold the same tokens in a batch, got token counts {n_tokens}")
    return next(iter(n_tokens.values()))


# --- training SAEs for a model (what `lm-superposition train-sae` runs) ------------------------

QUALITY_FILENAME = "quality.json"


def text_tokens_for_training(config: SAETrainingConfig, n_eval_windows: int, context_size: int) -> int:
    """The token budget of windows to give train_saes_for_model: one pass of training text,
    one batch of slack (a remainder under one batch is dropped), and the held-out windows."""
    return config.distinct_tokens + config.batch_size_tokens + n_eval_windows * context_size


def train_saes_for_model(
    model: Model,
    hooks: Iterable,
    windows,
    config: SAETrainingConfig,
    out_dir: str | Path,
    batch_size: int = 8,
    n_eval_windows: int = 32,
    progress: bool = True,
    sae_seeds: Sequence[int] | None = None,
    ce_recovered: bool | Iterable[str] = True,
) -> dict:
    """Train an SAE for each hook from one activation stream over `windows`, save and judge each.

    `hooks`: hook names or models.HookPoint. The last `n_eval_windows` windows (data.TokenWindows)
    are held out: every SAE is evaluated on them (`evaluate_saes`: variance explained, L0 and dead
    features of all SAEs from one forward pass per batch) and the result written next to it as
    quality.json. ce_recovered: which hooks also get CE loss recovered (three forward passes with
    the unembedding per hook): True all, False none (null in quality.json), or the hook names.
    Returns {hook_name: out_dir/<hook_name>}, each folder an SAE-Lens folder
    that `load_sae_from_disk` and `sae_lens.SAE.load_from_disk` open; with `sae_seeds`,
    {hook_name: {seed: out_dir/sae_seed<seed>/<hook_name>}} (see `trained_sae_folder`).
    """
    points = [hook if hasattr(hook, "width") else hook_point(model, hook) for hook in hooks]
    if not points:
        raise ValueError("no hooks given; see models.hook_catalogue(model) for the hooks of this model")
    if not 0 < n_eval_windows < len(windows):
        raise ValueError(
            f"n_eval_windows must be between 1 and len(windows) - 1 = {len(windows) - 1}, got {n_eval_windows}"
        )
    if config.model_name is None:
        config = dataclasses.replace(config, model_name=model.cfg.model_name)
    train_windows, eval_windows = windows[: len(windows) - n_eval_windows], windows[len(windows) - n_eval_windows :]

    stream = stream_activations(
        model,
        train_windows,
        [p.name for p in points],
        batch_size=batch_size,
        progress=False,
        autocast_dtype=torch.bfloat16 if config.autocast_lm else None,
    )
    batches = _passes((batch.activations for batch in stream), config.epochs)
    seeds = [config.seed] if sae_seeds is None else list(sae_seeds)
    saes = train_saes(batches, {p.name: p.width for p in points}, config, progress=progress, sae_seeds=seeds)
    del batches  # the cached pass (GBs for many hooks) is not kept through the evaluation

    ce_hooks = list(saes) if ce_recovered is True else [] if ce_recovered is False else list(ce_recovered)
    qualities = evaluate_saes(model, saes, eval_windows, batch_size=batch_size, ce_hooks=ce_hooks, progress=progress)
    folders: dict = {}
    for name, by_seed in saes.items():
        for seed, sae in by_seed.items():
            quality = qualities[name][seed]
            summary = {
                "hook_name": name,
                "sae_seed": seed,
                "training_tokens": sae.cfg.metadata.training_tokens,
                **quality.to_dict(),
            }
            # quality.json inside the folder marks the SAE as complete (a resumed run reuses it).
            folder = trained_sae_folder(out_dir, name, seed if sae_seeds is not None else None)
            folders.setdefault(name, {})[seed] = save_sae(
                sae, folder, {QUALITY_FILENAME: json.dumps(summary, indent=2) + "\n"}
            )
    return folders if sae_seeds is not None else {name: by_seed[config.seed] for name, by_seed in folders.items()}


def _passes(batches: Iterator[dict[str, torch.Tensor]], epochs: int) -> Iterator[dict[str, torch.Tensor]]:
    """The stream `epochs` times over: one pass cached in memory, held only by the generator returned."""
    if epochs == 1:
        return batches
    one_pass = list(batches)
    return (batch for _ in range(epochs) for batch in one_pass)


def trained_sae_folder(out_dir: str | Path, hook_name: str, sae_seed: int | None = None) -> Path:
    """Where `train_saes_for_model` saves the SAE of a hook: OUT/<hook>, or OUT/sae_seed<S>/<hook>."""
    return Path(out_dir) / hook_name if sae_seed is None else Path(out_dir) / f"sae_seed{sae_seed}" / hook_name
