"""The one training loop all methods share: schedule, optimizer, precision, NaN guard, resume, events."""

from finetune_core.train.control import Control
from finetune_core.train.events import (
                                        ArtifactSaved,
                                        Event,
                                        EventSink,
                                        Failed,
                                        Finished,
                                        PreviewEvent,
                                        Started,
                                        StepEvent,
                                        Warning_,
                                        ignore_events,
)
from finetune_core.train.loop import OutputSpec, Trainer, TrainJob, TrainResult, resume_training, run_training
from finetune_core.train.lr_schedule import parse_schedule, rate_at
from finetune_core.train.run_folder import LossRow, RunFolder
from finetune_core.train.train_config import TrainConfig, config_fields, config_from_dict

__all__ = [
    "ArtifactSaved", "Control", "Event", "EventSink", "Failed", "Finished", "LossRow", "OutputSpec", "PreviewEvent",
    "RunFolder", "Started", "StepEvent", "TrainConfig", "TrainJob", "TrainResult", "Trainer", "Warning_",
    "config_fields", "config_from_dict", "ignore_events", "parse_schedule", "rate_at", "resume_training",
    "run_training",
]
