"""Typed records and configs: the only types that cross stage boundaries."""
from schemas.config import (
    ClipConfig,
    InputConfig,
    ProbeConfig,
    RayConfig,
    RunConfig,
    ShardConfig,
    SplitConfig,
    load_run_config,
)
from schemas.records import (
    AnnotationSample,
    ClipRecord,
    Failure,
    ProbeInfo,
    QAPair,
    ShardSample,
    Span,
    Turn,
    VideoRecord,
    VideoResult,
)

__all__ = [
    "AnnotationSample",
    "ClipConfig",
    "ClipRecord",
    "Failure",
    "InputConfig",
    "ProbeConfig",
    "ProbeInfo",
    "QAPair",
    "RayConfig",
    "RunConfig",
    "ShardConfig",
    "ShardSample",
    "Span",
    "SplitConfig",
    "Turn",
    "VideoRecord",
    "VideoResult",
    "load_run_config",
]
