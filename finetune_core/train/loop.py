"""The one training loop every method shares: schedule, steps, NaN guard, saves, previews, events, interrupt, resume.

A step itself lives in `finetune_core.train.step`; this module runs steps and does the side duties between them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune_core.data.cache import TextCache
from finetune_core.data.data_batch import TrainingData
from finetune_core.errors import ArtifactError, ConfigError, StorageError
from finetune_core.model.interface import DiffusionModel, SampleRequest, TrainingSession, TrainingSetup
from finetune_core.train import randomness
from finetune_core.train.control import Control
from finetune_core.train.distributed import Processes
from finetune_core.train.ema import ParameterAverages
from finetune_core.train.events import (
    ArtifactChecked,
    ArtifactSaved,
    EventSink,
    Failed,
    Finished,
    Phase,
    PreviewEvent,
    Started,
    StepEvent,
    ValidationEvent,
    Warning_,
    ignore_events,
)
from finetune_core.train.guard import NanGuard
from finetune_core.train.job import Counters, OutputSpec, TrainJob, TrainResult
from finetune_core.train.lr_schedule import nothing_to_train, parse_schedule, rate_at, run_length
from finetune_core.train.method import ArtifactMeta, InferenceExtras, PrepareContext
from finetune_core.train.optim import build_optimizer, set_learning_rate
from finetune_core.train.run_folder import LossRow, RunFolder
from finetune_core.train.step import OVERFLOW, StepContext, StepOutcome, make_grad_scaler, train_step
from finetune_core.train.train_config import TrainConfig, config_from_dict
from finetune_core.train.validation import record_validation, validation_loss

if TYPE_CHECKING:
    from finetune_core.data.summary import DatasetSummary
    from finetune_core.train.method import Method

logger = logging.getLogger(__name__)


class _Interrupted(Exception):
    """The job was interrupted during a preparation phase (raised by the progress callback)."""


def run_training(model: DiffusionModel, method: Method, data: TrainingData, config: TrainConfig, run: RunFolder,
                 output: OutputSpec, *, on_event: EventSink = ignore_events,
                 control: Control | None = None, processes: Processes | None = None,
                 validation: TrainingData | None = None) -> TrainResult:
    """Train `method` on `data` from its current state; writes the final artefact into `output.final_dir`.
    `validation`: the validation set of `config.validation_every` (None: the training data itself)."""
    return Trainer(TrainJob(model, method, data, config, run, output, validation), on_event, control,
                   processes=processes).run()


def resume_training(model: DiffusionModel, method: Method, data: TrainingData, run: RunFolder, output: OutputSpec,
                    *, on_event: EventSink = ignore_events, control: Control | None = None,
                    config: TrainConfig | None = None, processes: Processes | None = None,
                    validation: TrainingData | None = None) -> TrainResult:
    """Continue the run saved in `run` exactly where it stopped (same config unless one is given)."""
    job = TrainJob(model, method, data, config or config_from_dict(run.load_config()), run, output, validation)
    return Trainer(job, on_event, control, resume=True, processes=processes).run()


def existing_artifacts(method: Method, directory: Path, stem: str) -> list[Path]:
    """Files a final write would replace."""
    return [p for p in method.artifact_paths(Path(directory), stem) if p.exists()]


class Trainer:
    """Runs one job; `run()` returns a TrainResult, emits Failed and re-raises on any error.

    Phases: the model's training session is entered once (frozen weights, precision, checkpointing, host state set
    aside); the preparation phase (the method's own, then the data's: latents are encoded by the steps that first draw
    them) runs with the host's usual device handling;
    then all steps run inside one placement (modules resident, no host hook inside a step) and the method's
    training context. With several processes (`finetune_core.train.distributed`) every process runs the same loop
    on its share of each batch; only the main one writes files and emits events.
    """

    def __init__(self, job: TrainJob, on_event: EventSink = ignore_events, control: Control | None = None,
                 resume: bool = False, processes: Processes | None = None) -> None:
        self.job, self.emit, self.resume = job, on_event, resume
        self.control = control or Control()
        self.processes = processes or Processes()
        self.writes = self.processes.is_main
        if not self.writes:
            self.emit = ignore_events
        self.counters = Counters(step=0, attempt=0, seed=0)
        self.previews_failed = False
        self.stopped_early = False  # the validation loss stopped improving for `early_stop_patience` evaluations
        self._last_rate = 0.0  # the learning rate of the last step, for the CSV row written at the end
        self._dataset: DatasetSummary | None = None  # the same for the whole run once the data is prepared

    def run(self) -> TrainResult:
        try:
            return self._run()
        except Exception as exc:
            self.emit(Failed(str(exc), self.counters.step, exc))
            raise

    def _run(self) -> TrainResult:
        job, config = self.job, self.job.config
        config.validate()
        checkpoint = self._start_counters()
        self._check_output()
        schedule = parse_schedule(config.learning_rate, config.steps)
        total = run_length(schedule, config.steps)
        self._check_steps_left(total)
        setup = TrainingSetup(job.method.trains, config.precision, config.gradient_checkpointing,
                              vae_gradient_checkpointing=config.gradient_checkpointing and job.method.decodes_latents)
        with job.model.training_session(setup) as session:
            try:
                self._prepare()
            except _Interrupted:
                return self._stopped_before_training()
            with job.model.placement(), job.method.training_context(job.model):
                ctx = self._build_context(checkpoint, schedule, session)
                guard = NanGuard(self.counters.guard, config.nan_guard_bad_steps, config.nan_guard_max_rollbacks,
                                 config.nan_guard_lr_factor, snapshots=job.method.state_policy.rollback_snapshots)
                guard.take_snapshot(self.counters.step, _kept(ctx), ctx.optimizer, ctx.scaler)
                if self.writes and not self.resume:  # settings.json says what the run was started with
                    job.run.write_settings(self._settings())
                self.emit(Started(job.run.path, total, self.counters.step))
                interrupted = self._loop(ctx, guard, schedule, total)
                artifacts = self._finish(ctx, interrupted)
        self.emit(Finished(self.counters.step, interrupted, artifacts, job.run.path))
        return TrainResult(self.counters.step, interrupted, artifacts, job.run.path, self.counters.seed)

    def _check_steps_left(self, total: int) -> None:
        """A file continued from at or past the run's last step would be written back unchanged: say so instead."""
        # at its last step exactly, a resume writes the final file (a run killed while writing it finishes)
        if self.resume and self.counters.step > total:
            raise ConfigError(f"the run {self.job.run.path} is already at step {self.counters.step} and stops at step "
                              f"{total} (max steps or the end of the learning-rate schedule), so there is nothing "
                              f"left to train; resume with max steps above {self.counters.step}")
        problem = None if self.resume else nothing_to_train(self.counters.step, total)
        if problem:
            raise ConfigError(problem)

    def _prepare(self) -> None:
        """The preparation phase: the method's own (class images), then the data's (a latent is encoded by the step that
        first draws it, so here only what a data type prepares ahead), with progress and interrupt."""
        job = self.job
        context = PrepareContext(job.model, job.run.path, _without_grad(job.model.sample), self._phase_progress,
                                 self.counters.seed)
        if not self.writes:  # the main process prepares first: class images and latent caches are written once
            self.processes.barrier()
        interrupted = False
        try:
            job.method.prepare(context)
            job.data.prepare(job.model, on_progress=lambda done, total: self._phase_progress("latents", done, total))
            if job.validation is not None and job.config.validation_every:
                job.validation.prepare(job.model, on_progress=lambda done, total: self._phase_progress(
                    "validation latents", done, total))
        except _Interrupted:
            interrupted = True  # still meet the others below, so that every process stops here together
        if self.writes:
            self.processes.barrier()
        if self.processes.agree([interrupted])[0]:
            raise _Interrupted

    def _phase_progress(self, what: str, done: int, total: int) -> None:
        self.emit(Phase(what, done, total))
        self.control.wait_while_paused()
        if self.control.interrupted:
            raise _Interrupted

    def _stopped_before_training(self) -> TrainResult:
        """Interrupted while preparing: nothing was trained, so nothing is written; what was prepared is kept."""
        job = self.job
        self.emit(Warning_("interrupted before the first step; nothing was trained (what was prepared is kept)"))
        self.emit(Finished(self.counters.step, True, (), job.run.path))
        return TrainResult(self.counters.step, True, (), job.run.path, self.counters.seed)

    # --- setup ---------------------------------------------------------------------------------------------------
    def _start_counters(self) -> dict[str, Any] | None:
        """Fresh counters, or the saved ones (returns the checkpoint to restore) when resuming."""
        if not self.resume:
            start = self.job.method.start_step
            self.counters = Counters(start, start, randomness.resolve_seed(self.job.config.seed))
            return None
        checkpoint, _config = self.job.run.load_state()
        if "params" not in checkpoint:
            raise ArtifactError(f"the run {self.job.run.path} kept no resume state (this method keeps it only when "
                                f"asked); start a new run, continuing from its last saved file instead")
        self.counters = Counters.from_dict(checkpoint["counters"])
        if self.writes:
            self.job.run.truncate_loss_rows(self.counters.step)
        saved_model = checkpoint.get("model", {})
        if saved_model.get("shorthash") != self.job.model.identity.shorthash:
            self.emit(Warning_(f"resuming {self.job.run.path} with model {self.job.model.identity.name}, but the run "
                               f"was started with {saved_model.get('name')}; results will differ"))
        return checkpoint

    def _check_output(self) -> None:
        """Refuse, before any work, to replace an existing artefact the user did not ask to overwrite."""
        out = self.job.output
        if out.overwrite or self.counters.final_written:
            return
        found = existing_artifacts(self.job.method, Path(out.final_dir), out.name)
        if found:
            raise ArtifactError(f"{found[0]} already exists; choose another name, or ask to overwrite it")

    def _build_context(self, checkpoint: dict[str, Any] | None, schedule: list[tuple[float, int]],
                       session: TrainingSession) -> StepContext:
        job, config = self.job, self.job.config
        model, method, device = job.model, job.method, job.model.device
        if checkpoint is not None:
            method.load_state_dict(checkpoint["method"])
        groups = method.trainable_parameters(model)
        params = [p for g in groups for p in g.params]
        for p in params:
            if p.device != device:
                p.data = p.data.to(device)  # in place: the method keeps referencing the same tensor
            p.requires_grad_(True)
        self.processes.share_params(params)  # every process starts from the main one's weights, as DDP does
        optimizer = build_optimizer(groups, config, rate_at(schedule, self.counters.step) or 0.0)
        scaler = make_grad_scaler(device, session.compute_dtype)
        averages = ParameterAverages(groups)
        if checkpoint is not None:
            _restore_params(params, checkpoint["params"], job.run.path)
            optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            averages.load_state_dict(checkpoint.get("averages", []))
        clip = parse_schedule(config.clip_grad_value, config.steps, "clip value") \
            if config.clip_grad_mode != "disabled" else []
        return StepContext(model, method, job.data, optimizer, scaler, params, self.counters.seed,
                           config.gradient_accumulation, session.autocast, config.min_snr_gamma,
                           config.noise_offset, config.clip_grad_mode, clip, model.alphas_cumprod().float(),
                           TextCache() if method.caches_text else None, averages, self.processes)

    # --- the loop --------------------------------------------------------------------------------------------------
    def _loop(self, ctx: StepContext, guard: NanGuard, schedule: list[tuple[float, int]], total: int) -> bool:
        """Run steps until the schedule or max steps ends (False) or an interrupt (True)."""
        c, started, paused, session_steps = self.counters, time.monotonic(), 0.0, 0
        last = StepOutcome(True, 0.0, "", (0, 0))  # the latest step's prompt and image size (pictures while paused)
        while True:
            before = time.monotonic()
            self._wait_while_paused(ctx, last)
            paused += time.monotonic() - before
            self._agree_on_requests()
            if self.control.interrupted:
                return True
            rate = rate_at(schedule, c.step)
            if rate is None or c.step >= total:
                return False
            lr = rate * c.guard.lr_factor
            set_learning_rate(ctx.optimizer, lr, c.step, c.guard.lr_factor)
            outcome = train_step(ctx, c.attempt, c.step)
            c.attempt += 1
            if not outcome.ok:
                self._on_bad_step(ctx, guard, outcome)
                continue
            guard.record_good()
            c.step += 1
            session_steps += 1
            per_step = (time.monotonic() - started - paused) / session_steps
            self._after_step(ctx, guard, outcome, lr, total, per_step)
            last = outcome
            if self.stopped_early:
                return False

    def _wait_while_paused(self, ctx: StepContext, last: StepOutcome) -> None:
        """Wait while paused, making the pictures asked for meanwhile (issue 23) with the state as it is: on this
        thread, between steps, so a paused and resumed run trains exactly what an unpaused one does."""
        control = self.control
        while control.paused and not control.interrupted:
            control.wait_while_paused(0.05)
            for ask, answer in control.take_asks():
                try:
                    answer.set_result(self._paused_picture(ctx, ask, last))
                except Exception as exc:  # noqa: BLE001  (the sampler's error goes to the asker; training waits on)
                    answer.set_exception(exc)
        control.refuse_asks("the job resumed before the picture was made; pause it again and ask again")

    def _paused_picture(self, ctx: StepContext, ask: Any, last: StepOutcome) -> Path:
        """A picture of `ask` (prompt, negative_prompt, seed: -1 the preview seed) with the trained state as the
        artefact would be written now, at the preview's settings; saved as images/<name>-<step>-paused-<n>.png."""
        prompt = str(ask.get("prompt") or "").strip()
        if not prompt:
            raise ConfigError("the prompt is empty; type what to draw (the artefact's word in it, e.g. its name)")
        seed = int(ask.get("seed", -1))
        request, extras = self._sample_request(prompt, last, seed if seed >= 0 else None,
                                               str(ask.get("negative_prompt") or ""))
        model = self.job.model
        with torch.no_grad(), ctx.averages.swapped_in(), randomness.seeded_global_rng(request.seed, model.device):
            images = model.sample(request, extras.embeddings or None, extras.context_transform,
                                  extras.adapters or None)
        step, n = self.counters.step, 1
        while (self.job.run.images_dir / f"{self.job.output.name}-{step}-paused-{n}.png").exists():
            n += 1
        parameters = request.infotext(model.identity, f"Fine-tune: {self.job.method.name} {self.job.output.name} "
                                                      f"step {step} (paused)")
        return self.job.run.save_image(images[0], f"{self.job.output.name}-{step}-paused-{n}", parameters)

    def _agree_on_requests(self) -> None:
        """An interrupt, save or preview asked of any process holds for all, so they stop and snapshot together."""
        if self.processes.world == 1:
            return
        control = self.control
        interrupt, save, preview = self.processes.agree(
            [control.interrupted, control.save_requested, control.preview_requested])
        if interrupt and not control.interrupted:
            control.interrupt()
        control.save_requested = save
        control.preview_requested = preview

    def _on_bad_step(self, ctx: StepContext, guard: NanGuard, outcome: StepOutcome) -> None:
        c = self.counters
        logger.warning("step %d skipped: %s (loss %s)", c.step + 1, outcome.reason, outcome.loss)
        if outcome.reason == OVERFLOW or not guard.record_bad():
            return
        c.step = guard.rollback(_kept(ctx), ctx.optimizer, ctx.scaler)
        c.csv_losses.clear()
        if self.writes:
            self.job.run.truncate_loss_rows(c.step)
        self.emit(Warning_(f"the loss or the gradients were not finite for {guard.bad_steps} steps in a row; "
                           f"rolled back to step {c.step} and lowered the learning rate to "
                           f"x{c.guard.lr_factor:g} of the schedule"))

    def _after_step(self, ctx: StepContext, guard: NanGuard, outcome: StepOutcome, lr: float, total: int,
                    per_step: float) -> None:
        """Events, CSV, saves, snapshots and previews after a good step."""
        c, config, control = self.counters, self.job.config, self.control
        epoch = self._epoch()[0]
        self.emit(StepEvent(c.step, total, outcome.loss, lr, epoch, per_step, per_step * (total - c.step),
                            outcome.prompt))
        c.csv_losses.append(outcome.loss)
        self._last_rate = lr
        saving = bool(config.save_every and c.step % config.save_every == 0) or control.save_requested
        validation = self._validate(ctx, saving)
        if (config.csv_every and c.step % config.csv_every == 0) or validation is not None:
            self._write_loss_row(validation)
        if saving:
            control.save_requested = False
            self._save_intermediate(ctx)
            guard.take_snapshot(c.step, _kept(ctx), ctx.optimizer, ctx.scaler)
        elif config.nan_guard_snapshot_every and c.step % config.nan_guard_snapshot_every == 0:
            guard.take_snapshot(c.step, _kept(ctx), ctx.optimizer, ctx.scaler)
        if (config.preview_every and c.step % config.preview_every == 0) or control.preview_requested:
            control.preview_requested = False
            if self.writes and not self.previews_failed:
                self._preview(outcome)

    def _validate(self, ctx: StepContext, saving: bool) -> float | None:
        """The validation loss every `validation_every` steps and at every save (of the weights the copy holds: the
        moving averages when they are on); counts it for the early stop. None when not evaluated at this step."""
        config, c = self.job.config, self.counters
        if not config.validation_every or not (saving or c.step % config.validation_every == 0):
            return None
        with ctx.averages.swapped_in():
            loss = validation_loss(ctx, self.job.validation or self.job.data)
        stop = record_validation(c, c.step, loss, config.early_stop_patience)
        best = c.best_validation if c.best_validation is not None else loss
        self.emit(ValidationEvent(c.step, loss, best, c.best_validation_step))
        if stop:
            self.stopped_early = True
            self.emit(Warning_(f"stopped early at step {c.step}: the validation loss has not gone below its best "
                               f"({best:.6g} at step {c.best_validation_step}) for {config.early_stop_patience} "
                               f"evaluations"))
        return loss

    def _epoch(self) -> tuple[int, int]:
        """(epoch, 1-based step within the epoch) of the step just done, from its first micro-batch number."""
        accumulation = self.job.config.gradient_accumulation
        per_epoch = max(1, self.job.data.batches_per_epoch())
        index = (self.counters.attempt - 1) * accumulation
        return index // per_epoch, (index % per_epoch) // accumulation + 1

    # --- side duties -----------------------------------------------------------------------------------------------
    def _meta(self) -> ArtifactMeta:
        settings = {**self.job.output.settings, "train": {**self.job.config.to_dict(), "seed": self.counters.seed}}
        model = self.job.model
        if self._dataset is None:
            self._dataset = self.job.data.summary()
        return ArtifactMeta(self.job.output.name, self.counters.step, model.identity, model.family, settings,
                            self._dataset)

    def _save_intermediate(self, ctx: StepContext) -> None:
        """An intermediate copy (the oldest beyond `save_keep_last` deleted) and the resume state. A copy the disk has
        no room for is skipped with a warning: training goes on, and the final file is checked again."""
        run, step, name = self.job.run, self.counters.step, self.job.output.name
        if not self.writes:
            return
        try:
            with ctx.averages.swapped_in():
                paths = self.job.method.write_artifact(run.artifacts_dir, f"{name}-{step}", self._meta(), True)
        except StorageError as exc:
            self.emit(Warning_(f"the copy at step {step} was not saved: {exc}; training goes on"))
            paths = []
        self._save_state(ctx)
        if paths:
            self.emit(ArtifactSaved(step, tuple(paths), final=False))
            self._check_artifacts(paths)
            removed = prune_copies(run.artifacts_dir, name, self.job.config.save_keep_last)
            if removed:
                logger.info("removed %d older copies: %s", len(removed), ", ".join(p.name for p in removed))

    def _save_state(self, ctx: StepContext) -> None:
        identity = self.job.model.identity
        state: dict[str, Any] = {
            "format": 1, "counters": self.counters.to_dict(),
            "model": {"name": identity.name, "shorthash": identity.shorthash, "family": self.job.model.family}}
        if self.job.method.state_policy.resume_state:
            state.update(method=self.job.method.state_dict(), params=[p.detach().cpu() for p in ctx.params],
                         optimizer=ctx.optimizer.state_dict(), scaler=ctx.scaler.state_dict(),
                         averages=ctx.averages.state_dict())
        self.job.run.save_state(state, self.job.config.to_dict())

    def _finish(self, ctx: StepContext, interrupted: bool) -> tuple[Path, ...]:
        """Write the final artefact (also on interrupt, as the WebUI does) and the resume state."""
        out, c, method = self.job.output, self.counters, self.job.method
        if not self.writes:
            return ()
        self._check_output()  # a file someone made while this run trained is not replaced unasked
        # The run claims its final file in the resume state before writing it: killed between the two, a resume
        # then rewrites the file as its own instead of refusing it as someone else's.
        c.final_written = True
        if self.job.config.csv_every and not interrupted:  # the steps since the last row (a run shorter than
            self._write_loss_row()  # csv_every has its CSV too); an interrupted run keeps them for its resume
        self._save_state(ctx)
        with ctx.averages.swapped_in():
            paths = method.write_artifact(Path(out.final_dir), out.name, self._meta(), True)
        if self.job.config.save_optimizer_state:
            paths = [*paths, *self._sidecars(paths, ctx)]
        self.emit(ArtifactSaved(c.step, tuple(paths), final=True))
        self._check_artifacts(paths)
        return tuple(paths)

    def _check_artifacts(self, paths: list[Path]) -> None:
        """The host's loader on the files just saved: the line goes to the events and the run's `checks.txt`; a
        module it could not apply, or a file it refused, is a warning that names the keys."""
        for path, check in self.job.method.check_artifacts(self.job.model, paths):
            event = ArtifactChecked(self.counters.step, path, check.loader, check.applied, check.total, check.unmatched)
            self.emit(event)
            self.job.run.record_check(f"step {self.counters.step}: {event.line}")
            if check.error:
                self.emit(Warning_(f"{path.name}: {check.loader} could not load the file ({check.error})"))
            elif check.unmatched:
                shown = ", ".join(check.unmatched[:8]) + (", ..." if len(check.unmatched) > 8 else "")
                self.emit(Warning_(f"{path.name}: {len(check.unmatched)} of {check.total} modules not applied by "
                                   f"{check.loader} (keys {shown}); the model does not have those layers"))

    def _write_loss_row(self, validation: float | None = None) -> None:
        """One CSV row: the mean loss of the steps since the last row (the WebUI's `textual_inversion_loss.csv`),
        with the validation loss evaluated at this step, if any."""
        c = self.counters
        if not c.csv_losses:
            return
        epoch, epoch_step = self._epoch()
        mean = sum(c.csv_losses) / len(c.csv_losses)
        if self.writes:
            self.job.run.append_loss_row(LossRow(c.step, epoch, epoch_step, mean, self._last_rate, validation))
        c.csv_losses.clear()

    def _sidecars(self, paths: list[Path], ctx: StepContext) -> list[Path]:
        """The WebUI's `.pt.optim` files, where the method says the WebUI can load this optimizer's state."""
        name = self.job.config.optimizer
        written = [s for s in (self.job.method.optimizer_sidecar(p, ctx.optimizer, name)
                               for p in paths if p.suffix == ".pt") if s is not None]
        if not written:
            self.emit(Warning_(f"no optimizer state file was written next to the artefact: the WebUI cannot load "
                               f"the state of the {name} optimizer for this kind of file (the run folder keeps it "
                               f"for resuming here)"))
        return written

    def _preview(self, outcome: StepOutcome) -> None:
        """A preview that fails (the host's sampler, a file it wants to download, memory) costs no training: a
        warning, and no more previews in this run."""
        try:
            self._sample_preview(outcome)
        except Exception as exc:  # noqa: BLE001  (whatever the host's sampler raises)
            self.previews_failed = True
            logger.exception("the preview at step %d failed", self.counters.step)
            self.emit(Warning_(f"the preview at step {self.counters.step} failed ({type(exc).__name__}: {exc}); "
                               f"training goes on without previews for the rest of this run"))

    def _sample_request(self, prompt: str, outcome: StepOutcome, seed: int | None = None,
                        negative: str | None = None) -> tuple[SampleRequest, InferenceExtras]:
        """The preview's txt2img request for `prompt` (the run's preview seed unless one is given) and the method's
        extras (its negative-prompt suffix joined in)."""
        config, c = self.job.config, self.counters
        extras = self.job.method.inference_extras()
        negative = config.preview_negative_prompt if negative is None else negative
        negative = ", ".join(p for p in (negative, extras.negative_prompt_suffix.strip()) if p)
        # One seed for every preview of a run, so saved steps compare side by side.
        if seed is None:
            seed = config.preview_seed if config.preview_seed >= 0 else \
                randomness.stream_seed(c.seed, randomness.PREVIEW, 0) & 0x7FFFFFFF
        request = SampleRequest((prompt,), (negative,), steps=config.preview_steps,
                                cfg_scale=config.preview_cfg_scale,
                                width=config.preview_width or outcome.pixel_size[1] or self._data_size()[1],
                                height=config.preview_height or outcome.pixel_size[0] or self._data_size()[0],
                                seed=seed, sampler=config.preview_sampler)
        return request, extras

    def _data_size(self) -> tuple[int, int]:
        """(height, width) of a training batch, for a picture asked before any step of this session."""
        latents = self.job.data.get_batch(0, self.counters.seed).latents
        scale = self.job.model.vae_scale
        return latents.shape[-2] * scale, latents.shape[-1] * scale

    def _sample_preview(self, outcome: StepOutcome) -> None:
        """Sample a preview image with the method's extras through the host's sampler; one seed per run."""
        config, model, c = self.job.config, self.job.model, self.counters
        request, extras = self._sample_request(config.preview_prompt or outcome.prompt, outcome)
        prompt, seed = request.prompts[0], request.seed
        with torch.no_grad(), randomness.seeded_global_rng(seed, model.device):
            images = model.sample(request, extras.embeddings or None, extras.context_transform, extras.adapters or None)
        stem = f"{self.job.output.name}-{c.step}"
        parameters = request.infotext(model.identity, f"Fine-tune: {self.job.method.name} {self.job.output.name} "
                                                      f"step {c.step}")
        path = self.job.run.save_image(images[0], stem, parameters)
        self.emit(PreviewEvent(c.step, path, images[0], prompt))
        paths = self.job.method.preview_artifact(images[0], self.job.run.path / "image_embeddings", stem,
                                                 self._meta())
        if paths:
            self.emit(ArtifactSaved(c.step, tuple(paths), final=False))

    def _settings(self) -> dict[str, Any]:
        job = self.job
        return {"config": job.config.to_dict(), "seed": self.counters.seed, "start_step": self.counters.step,
                "resumed": self.resume, "method": job.method.name, "method_settings": dict(job.output.settings),
                "model": {"name": job.model.identity.name, "shorthash": job.model.identity.shorthash,
                          "family": job.model.family, "prediction_type": job.model.prediction_type},
                "output": {"dir": str(job.output.final_dir), "name": job.output.name}}


def _without_grad(sample: Callable[[SampleRequest], list[Any]]) -> Callable[[SampleRequest], list[Any]]:
    """The host's sampler for a preparation phase: no graph is kept (trained weights require gradients then)."""
    def call(request: SampleRequest) -> list[Any]:
        with torch.no_grad():
            return sample(request)
    return call


def prune_copies(folder: Path, name: str, keep: int) -> list[Path]:
    """Delete the intermediate copies `<name>-<step>.*` in `folder` but those of the `keep` latest steps (0: keep
    all); returns what went. Only files of that exact pattern: a user's own files there are never touched."""
    if keep <= 0 or not Path(folder).is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"-(\d+)\.[^/]+$")
    by_step: dict[int, list[Path]] = {}
    for path in Path(folder).iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            by_step.setdefault(int(match.group(1)), []).append(path)
    old = sorted(by_step)[:-keep]
    removed = [path for step in old for path in by_step[step]]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _kept(ctx: StepContext) -> list[torch.Tensor]:
    """The trainable state a NaN-guard snapshot keeps: the parameters and their moving averages."""
    return [*ctx.params, *ctx.averages.tensors()]


def _restore_params(params: list[torch.Tensor], saved: list[torch.Tensor], where: Path) -> None:
    """Copy saved trainable tensors into the live ones; ArtifactError when the shapes do not match."""
    if len(saved) != len(params) or any(p.shape != s.shape for p, s in zip(params, saved)):
        raise ArtifactError(f"the resume state in {where} does not match this method's trainable parameters "
                            "(another method or settings); start a new run instead")
    with torch.no_grad():
        for param, value in zip(params, saved):
            param.copy_(value.to(param.device, param.dtype))
