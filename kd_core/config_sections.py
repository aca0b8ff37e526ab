"""The operational sections of params.yaml (promotion policy, export, registry, schedule, paths, the cache) and the
frozen, unknown-key-refusing base every section shares; kd_core.config assembles them into Params."""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyParams(Section):
    """Thresholds of the promotion rules (kd_core.policy.decide_promotion); all must pass."""

    min_teacher_retention: float = Field(0.85, ge=0.0)
    min_gain_over_baseline: float = Field(0.0, ge=-1.0, le=1.0)
    max_latency_ratio: float = Field(0.5, gt=0.0)
    max_size_bytes: int | None = Field(1_048_576, ge=1)
    max_class_drop: float = Field(0.05, ge=0.0, le=1.0)
    min_gain_over_champion: float = Field(0.0, ge=-1.0, le=1.0)
    max_p_value: float = Field(0.05, gt=0.0, le=1.0)
    max_int8_accuracy_drop: float | None = Field(0.01, ge=0.0, le=1.0)  # export: fp32 - int8 test accuracy
    max_int8_size_bytes: int | None = Field(None, ge=1)  # export: the int8 ONNX file
    max_int8_perplexity_increase: float | None = Field(0.02, ge=0.0)  # export, lm: int8 / fp32 perplexity - 1


class ExportParams(Section):
    """The int8 edge model (kd_core.quantize, kd_core.qad)."""

    int8: Literal["static", "dynamic", "qad"] = "static"  # qad: a fake-quantized fine-tune from the cache first
    # static calibrators tried (the weight-only dynamic forms, kd_core.quantize.DYNAMIC, always are)
    methods: tuple[Literal["minmax", "entropy", "percentile", "dynamic", "dynamic_matmul"], ...] = (
        "minmax", "entropy", "percentile")
    calibration_rows: int = Field(512, ge=1)  # training rows whose activations set the int8 ranges
    selection_rows: int = Field(1024, ge=1)  # other training rows on which the recipe is chosen
    min_agreement: float = Field(0.99, ge=0.0, le=1.0)  # recipes below it only ship when none reaches it
    max_size_ratio: float = Field(0.34, gt=0.0)  # int8 / fp32 file size; larger recipes only when none fits
    qad_epochs: int = Field(3, ge=1)  # qad: passes over train + transfer rows
    qad_lr: float = Field(1e-4, gt=0)  # qad: AdamW learning rate, cosine-decayed


class RegistryParams(Section):
    model_name: str = Field("kd-student", min_length=1)
    experiment: str = Field("kd-distill", min_length=1)


_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?#LW-]+")
_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


class ScheduleParams(Section):
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    alert_webhook: str | None = None

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        fields = v.split()
        if v.strip() in _CRON_MACROS or (len(fields) == 5 and all(_CRON_FIELD.fullmatch(f) for f in fields)):
            return v
        raise ValueError(f"{v!r} is not a cron expression (five fields: minute hour day month weekday)")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as UTC or Europe/Paris)") from None
        return v

    @field_validator("alert_webhook")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v


class PathParams(Section):
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    validation: str = "reports/validation"
    teacher: str = "artifacts/teacher"
    logits: str = "artifacts/logits"
    student: str = "artifacts/student"
    baseline: str = "artifacts/baseline"
    onnx: str = "artifacts/onnx"
    reports: str = "reports"
    metrics: str = "metrics"
    work: str = ".kd"


class FeatureCapture(Section):
    """A teacher module (a name from `named_modules()`) whose output cache_logits stores beside the logits."""

    module: str = Field(min_length=1)
    pool: Literal["mean", "max", "none"] = "none"  # over the axes after the channels: (B, C, *S) -> (B, C)


class AugmentParams(Section):
    """How `cache.views` draws each augmented view (random-resized crop, then a horizontal flip): in the key."""

    scale: tuple[float, float] = (0.35, 1.0)  # share of the image's area a crop covers (torchvision's default 0.08)
    ratio: tuple[float, float] = (0.75, 1.3333)  # crop aspect ratios (width / height), drawn log-uniformly
    flip: bool = True  # mirror half the views left to right
    seed: int = 0  # the view generator's seed
    online: bool = True  # the teacher and the hard-label twin train on fresh draws of this recipe each step

    @model_validator(mode="after")
    def _ranges(self) -> AugmentParams:
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale {list(self.scale)}: need 0 < low <= high <= 1")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio {list(self.ratio)}: need 0 < low <= high")
        return self


class CacheParams(Section):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # top-k rows keep the fewest logits reaching this mass
    sampling: int | None = Field(None, ge=1)  # of the top_k slots, this many hold classes drawn from the rest
    # with unbiased weights (kd_core/cache/sparse.py); forward KL at T = 1
    encoding: Literal["raw", "compact"] = "raw"  # compact: 8-bit log-probs + zstd per shard (top-k caches)
    shard_rows: int = Field(16_384, ge=1)
    batch_size: int = Field(2048, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # where the teacher runs; not in the key
    autocast: bool = True  # bf16 autocast on CUDA (recorded in the manifest); raw logits stored in `dtype`
    runner: Literal["serial", "dask"] = "serial"
    dask_address: str | None = None
    features: tuple[FeatureCapture, ...] = ()  # part of the cache key; empty: logits only
    views: int = Field(0, ge=0, le=64)  # augmented views cached per input row (task image), rows = image × view,
    # replayed exactly by the student; 0: the plain input only. V and `augment` are in the cache key
    augment: AugmentParams = AugmentParams()

    @model_validator(mode="after")
    def _sparse_needs_top_k(self) -> CacheParams:
        for name in ("top_p", "sampling"):
            if getattr(self, name) is not None and not self.top_k:
                raise ValueError(f"cache.{name} selects among the cache.top_k slots: set cache.top_k")
        if self.encoding == "compact" and not self.top_k:
            raise ValueError("cache.encoding compact stores top-k rows: set cache.top_k (or encoding: raw)")
        if self.sampling and self.top_k and self.sampling >= self.top_k:
            raise ValueError(f"cache.sampling {self.sampling} must leave one of the cache.top_k {self.top_k} slots "
                             "for the teacher's top class")
        if self.top_k and self.top_k > 255 and self.encoding == "compact":
            raise ValueError("cache.encoding compact keeps at most 255 classes per row: lower cache.top_k")
        return self

    @field_validator("features")
    @classmethod
    def _unique_modules(cls, v: tuple[FeatureCapture, ...]) -> tuple[FeatureCapture, ...]:
        names = [f.module for f in v]
        if dups := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"module(s) {dups} captured more than once")
        return v
