"""What a method module implements (defined by the loop in `finetune_core.train.method`)."""

from finetune_core.train.method import ArtifactMeta, InferenceExtras, Method, MethodDefaults, ParamGroup

__all__ = ["ArtifactMeta", "InferenceExtras", "Method", "MethodDefaults", "ParamGroup"]
