"""What a method module implements (defined by the loop in `finetune_core.train.method`)."""

from finetune_core.train.method import ArtifactMeta, InferenceExtras, Method, ParamGroup

__all__ = ["ArtifactMeta", "InferenceExtras", "Method", "ParamGroup"]
