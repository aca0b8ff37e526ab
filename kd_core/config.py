"""Typed, frozen parameters loaded from params.yaml.

One object feeds every stage, so a setting is read in one place. Unknown keys and bad values are
errors that name the key, raised before any compute.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from kd_core.config_sections import (
    CacheParams,
    ExportParams,
    PathParams,
    PolicyParams,
    RegistryParams,
    ScheduleParams,
)
from kd_core.config_sections import Section as _Section
from kd_core.errors import UserError
from kd_core.fs import atomic_write_text

PARAMS_FILE = "params.yaml"
MEMBERS = "members"  # several teachers: their model directories under paths.teacher/members/<i>


def _tasks():  # kd_core.tasks imports this module: it is imported when a task is asked for
    from kd_core import tasks

    return tasks




class DataParams(_Section):
    # the task's built-in data (mnist1d, fortunes, stdlib) or files it reads (parquet; for lm also text:
    # .txt/.md/.rst files); each task lists its own (kd_core/tasks/<task>/task.py)
    source: str = Field("mnist1d", min_length=1)
    transfer_size: int = Field(50_000, ge=0)
    seed: int = 42
    train: str | None = None
    test: str | None = None
    transfer: str | None = None
    label_column: str = "label"
    feature_columns: tuple[str, ...] | None = None
    text_column: str = Field("text", min_length=1)  # task text: the column holding each document
    max_length: int = Field(128, ge=8, le=8192)  # task text: tokens per document the models read (truncated)
    per_class: int | None = Field(200, ge=2)  # fortunes: labelled documents per class (balanced); null: all
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)  # fortunes: share of each class held out; stdlib: of modules
    seq_len: int = Field(128, ge=4, le=65_536)  # task lm: tokens per packed training sequence
    max_tokens: int | None = Field(None, ge=4)  # task lm: cap on the training tokens (a quicker demo); null: all
    max_test_tokens: int | None = Field(None, ge=4)  # task lm: cap on the held-out tokens
    image_size: int | None = Field(None, ge=8, le=1024)  # task image: side of the square the models read
    # (every image resized to it); null: the training images' median longer side, at most 224
    channels: Literal[1, 3] | None = None  # task image: 1 (greyscale) | 3 (RGB); null: 1 if every training
    # image is greyscale, else 3 (mixed sources are converted, never refused)
    image_column: str = Field("image", min_length=1)  # task image, parquet: the column of encoded image bytes

    @model_validator(mode="after")
    def _columns(self) -> DataParams:
        if self.feature_columns is not None and len(self.feature_columns) == 0:
            raise ValueError("data.feature_columns is empty; use null for 'every column but the label'")
        return self


class ValidationParams(_Section):
    min_rows_per_class: int = Field(5, ge=1)
    max_duplicate_frac: float = Field(0.05, ge=0.0, le=1.0)
    max_truncated_frac: float = Field(0.5, ge=0.0, le=1.0)  # task text: documents longer than data.max_length
    max_small_frac: float = Field(0.1, ge=0.0, le=1.0)  # task image: images smaller than data.image_size
    # (either side), which resizing blows up


class TeacherParams(_Section):
    source: str = "train"
    arch: str = "cnn1d"
    init: str | None = None  # task text: pretrained encoder directory to fine-tune (null: the MiniLM package)
    options: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.003, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    min_steps: int | None = Field(None, ge=1)  # more epochs on small data, so fine-tuning gets this many updates


class StudentParams(_Section):
    arch: str = "mlp"
    options: dict[str, Any] = Field(default_factory=dict)


# kd_core.losses.LOSSES; a unit test keeps the two in step
LOSS_NAMES = ("dist", "dkd", "hinton", "jsd", "mse", "mse_l2", "reverse_kl", "skew_kl")


class FeatureHint(_Section):
    """One hint: a cached teacher feature, the student module matched to it, the loss and its weight."""

    teacher: str = Field(min_length=1)  # a module listed in cache.features
    student: str = Field(min_length=1)  # a name from the student's `named_modules()`
    loss: Literal["mse", "cosine", "attention"] = "mse"  # kd_core.losses.HINTS
    weight: float = Field(1.0, ge=0.0)


class SearchCandidate(_Section):
    """One distillation setting `distill.search` tries; a key left out keeps the `distill` section's value."""

    alpha: float | None = Field(None, ge=0.0, le=1.0)
    temperature: float | None = Field(None, gt=0)
    loss: str | None = None


class SearchParams(_Section):
    """Settings tried on held-out labelled rows before the full training (kd_core.search)."""

    candidates: tuple[SearchCandidate, ...] = ()  # besides the distill section's own setting and alpha 0
    epochs: int = Field(10, ge=1)  # each candidate's budget: epochs over the student's rows (labels alone: as
    # many optimizer steps over the labelled rows); the winner then trains train.epochs
    max_p_value: float = Field(0.05, gt=0.0, le=1.0)  # another setting replaces the configured one only when it
    # beats it this significantly on the same rows (classifiers: McNemar; lm: sign test per sequence)
    min_val_rows: int = Field(300, ge=0)  # fewer validation positions than this cannot tell settings apart:
    # score by k-fold over the labelled rows instead
    folds: int = Field(5, ge=2)  # k of that k-fold


class DistillParams(_Section):
    loss: str = "hinton"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    dkd_alpha: float = Field(1.0, ge=0.0)
    dkd_beta: float = Field(8.0, ge=0.0)
    dist_beta: float = Field(1.0, ge=0.0)  # dist: weight of the inter-class term (per row, across classes)
    dist_gamma: float = Field(1.0, ge=0.0)  # dist: weight of the intra-class term (per class, across the batch)
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)  # jsd: 0 is forward KL, 1 reverse KL
    skew: float = Field(0.1, ge=0.0, lt=1.0)  # skew_kl: KL(p_t ‖ a·p_t + (1-a)·p_s)
    ensemble: Literal["logits", "probs"] = "logits"  # several teachers: average their logits or their probabilities
    l2: float = Field(1e-4, ge=0.0)  # mse_l2: λ of λ‖W_student‖²
    features: tuple[FeatureHint, ...] = ()  # not in the cache key: tuning hints never re-runs the teacher
    search: SearchParams | None = None  # null: train the setting above; else choose on the validation rows

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        """Checked here, not when train_student starts: a typo must not cost a teacher's training first."""
        return _known_loss(v)

    @model_validator(mode="after")
    def _searched_losses(self) -> DistillParams:
        for c in self.search.candidates if self.search else ():
            if c.loss is not None:
                _known_loss(c.loss)
        return self


def _known_loss(v: str) -> str:
    if v in LOSS_NAMES or ":" in v:
        return v
    raise ValueError(f"unknown loss {v!r}; choose one of {list(LOSS_NAMES)} or give package.module:factory")


class TrainParams(_Section):
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.002, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    compile: bool = False
    seed: int = 0
    nproc: int = Field(1, ge=1)  # processes per machine; > 1 launches torch.distributed.run (DDP)
    nnodes: int = Field(1, ge=1)  # machines training together: each runs `kd stage train_student` (docs/multinode.md)
    # this machine's place among them; 0 writes the checkpoints and outputs. The environment variable
    # KD_NODE_RANK overrides it, so every machine can share one params.yaml
    node_rank: int = Field(0, ge=0)
    # host:port on which the machines meet (torchrun's c10d rendezvous; a free port of one of them,
    # reachable from the others); required with nnodes > 1
    rdzv_endpoint: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, le=0.5)
    patience: int | None = Field(20, ge=1)
    min_steps: int | None = Field(None, ge=1)  # more epochs on small data, so the student gets this many updates

    @model_validator(mode="after")
    def _nodes(self) -> TrainParams:
        """A multi-machine setting that cannot launch is named here, before the teacher's compute."""
        if self.nnodes == 1 and self.rdzv_endpoint is not None:
            raise ValueError("train.rdzv_endpoint is only for train.nnodes > 1 (one machine launches "
                             "standalone); remove it or set train.nnodes")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"train.nnodes: {self.nnodes} machines meet at train.rdzv_endpoint (host:port on "
                             "one of them); set it")
        if self.rdzv_endpoint is not None and not _host_port(self.rdzv_endpoint):
            raise ValueError(f"train.rdzv_endpoint {self.rdzv_endpoint!r}: expected host:port, e.g. 10.0.0.1:29500")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.node_rank {self.node_rank} must be below train.nnodes ({self.nnodes})")
        return self


def _host_port(endpoint: str) -> bool:
    """`host:port` with a port torchrun can bind (an IPv6 host in brackets: [::1]:29500)."""
    host, sep, port = endpoint.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


class Params(_Section):
    # what a row is: a package of kd_core/tasks (a table row, a document, a packed token sequence);
    # required in a params.yaml file (dvc.yaml's code deps read it)
    task: str = Field(default_factory=lambda: _tasks().DEFAULT, min_length=1)
    data: DataParams = DataParams()
    validation: ValidationParams = ValidationParams()
    teacher: TeacherParams = TeacherParams()
    teachers: tuple[TeacherParams, ...] | None = None
    student: StudentParams = StudentParams()
    cache: CacheParams = CacheParams()
    distill: DistillParams = DistillParams()
    train: TrainParams = TrainParams()
    export: ExportParams = ExportParams()
    policy: PolicyParams = PolicyParams()
    registry: RegistryParams = RegistryParams()
    schedule: ScheduleParams = ScheduleParams()
    paths: PathParams = PathParams()

    @model_validator(mode="after")
    def _teachers(self) -> Params:
        """An ensemble is averaged from dense logits: a top-k cache keeps different classes per teacher."""
        if self.teachers is not None and len(self.teachers) < 2:
            raise ValueError("teachers: list two or more teachers, or use null and the teacher section")
        if self.teachers and self.cache.top_k:
            raise ValueError("teachers: an ensemble of teachers needs a dense cache; set cache.top_k to null")
        if self.teachers and self.cache.features:
            raise ValueError("teachers: feature hints (cache.features) need a single teacher")
        return self

    @model_validator(mode="after")
    def _sampled_targets(self) -> Params:
        """Sampled classes carry weights of the teacher's distribution at T = 1 with no tail: only forward
        KL at T = 1 is unbiased against them (a reverse divergence would need the classes never drawn)."""
        if not self.cache.sampling:
            return self
        d = self.distill
        tried = [(d.loss, d.temperature)] + [(c.loss or d.loss, c.temperature or d.temperature)
                                             for c in (d.search.candidates if d.search else ())]
        if bad := [f"{loss} at T={t:g}" for loss, t in tried if loss != "hinton" or t != 1]:
            raise ValueError(f"cache.sampling: the sampled targets are unbiased for distill.loss hinton at "
                             f"temperature 1 only, not {', '.join(bad)}")
        return self

    @model_validator(mode="after")
    def _search_has_validation_rows(self) -> Params:
        if self.distill.search is not None and self.train.val_fraction == 0:
            raise ValueError("distill.search chooses on the validation rows: set train.val_fraction above 0")
        return self

    @model_validator(mode="after")
    def _fits_task(self) -> Params:
        """The task exists, reads this source, and accepts the rest: named here, not by a stage deep in the DAG."""
        tasks, d = _tasks(), self.data
        if self.task not in tasks.names():
            raise ValueError(f"task {self.task!r}: choose one of {list(tasks.names())}")
        task = tasks.get(self.task)
        if d.source not in (*task.builtin_sources, *task.file_sources):
            owner = [n for n in tasks.names()
                     if d.source in (*tasks.get(n).builtin_sources, *tasks.get(n).file_sources)]
            hint = f" (task {owner[0]!r} reads it: set task: {owner[0]})" if len(owner) == 1 else ""
            raise ValueError(f"task {self.task!r} reads data.source "
                             f"{' or '.join((*task.builtin_sources, *task.file_sources))}, not {d.source!r}{hint}")
        if d.source in task.file_sources and (not d.train or not d.test):
            raise ValueError(f"data.source {d.source!r} needs data.train and data.test")
        if self.cache.views and not task.views:
            raise ValueError(f"cache.views: task {self.task!r} has no augmented views; set cache.views to 0")
        if self.cache.views and (self.cache.features or self.teachers):
            raise ValueError("cache.views: augmented views are cached for a single teacher's logits; "
                             "set cache.features to [] and teachers to null")
        task.check_params(self)
        return self

    @property
    def teacher_list(self) -> tuple[TeacherParams, ...]:
        """Every teacher, in order: the `teachers` list, else the single `teacher`."""
        return self.teachers or (self.teacher,)

    def teacher_dirs(self) -> list[str]:
        """Each teacher's model directory: `paths.teacher` itself, or `paths.teacher/members/<i>` per
        member of a `teachers` list (then `paths.teacher` holds their ensemble)."""
        if not self.teachers:
            return [self.paths.teacher]
        return [f"{self.paths.teacher}/{MEMBERS}/{i}" for i in range(len(self.teachers))]

    def logit_dirs(self) -> list[str]:
        """Each teacher's own logit cache, so one changed member re-runs only its own teacher pass."""
        if not self.teachers:
            return [self.paths.logits]
        return [f"{self.paths.logits}/{i}" for i in range(len(self.teachers))]

    @model_validator(mode="after")
    def _hints_use_captured_features(self) -> Params:
        """A hint can only use what the cache holds; checked here, before any compute."""
        captured = [f.module for f in self.cache.features]
        for h in self.distill.features:
            if h.teacher not in captured:
                raise ValueError(f"distill.features: teacher module {h.teacher!r} is not in cache.features "
                                 f"(captured: {captured})")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON form: the 'params hash' that identifies a configuration."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def _describe(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: invalid params: " + "; ".join(parts)


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate a mapping (as read from YAML) into Params, or raise a one-line UserError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_describe(exc, source)) from None


def load_params(root: Path | str = ".") -> Params:
    """Read and validate ``params.yaml`` in ``root`` (safe YAML: no tags that run code)."""
    path = Path(root) / PARAMS_FILE
    if not path.exists():
        raise UserError(f"{path}: not found (run kd from the project root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    _require_task(raw, str(path))
    return parse_params(raw, str(path))


def _require_task(raw: Any, source: str) -> None:
    """A params.yaml file names its task: dvc.yaml's code deps read it (kd_core/tasks/${task}), so without
    it DVC cannot even parse the DAG. (Params built in code default to the first-release task.)"""
    if raw is None or (isinstance(raw, dict) and "task" not in raw):
        raise UserError(f"{source}: no `task:` key; set it (one of {', '.join(_tasks().names())}): dvc.yaml "
                        "reads it to depend on the task's code")


def _coerce(value: str) -> Any:
    """Interpret a --set value the way YAML would (numbers, null, lists), as `dvc exp run -S` does."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def set_params(root: Path | str, assignments: list[str]) -> Params:
    """Apply ``key.sub=value`` edits to params.yaml, keeping its comments; validate before writing."""
    from ruamel.yaml import YAML  # ruamel keeps comments and order; it comes with DVC

    path = Path(root) / PARAMS_FILE
    rt = YAML()
    doc = rt.load(path.read_text()) if path.exists() else {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key.path=value")
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = _coerce(value)
    raw = json.loads(json.dumps(doc))
    _require_task(raw, f"{path} (after --set)")
    params = parse_params(raw, f"{path} (after --set)")
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())  # a crash mid-write must not leave half a params.yaml
    return params
