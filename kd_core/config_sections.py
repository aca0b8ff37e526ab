"""The operational sections of params.yaml (promotion policy, export, registry, schedule, paths) and the
frozen, unknown-key-refusing base every section shares; kd_core.config assembles them into Params."""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
