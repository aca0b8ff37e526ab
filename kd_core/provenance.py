"""Where a candidate comes from: the git commit, the data / cache / params fingerprints that make
two candidates the same one, the dvc.lock hash of every stage, and who did it. No MLflow here.

An identity that cannot be read (no git, no cache manifest) is never a constant like "unknown": it
is marked `unknown-<what>-<random>`, so it can never make two different candidates look identical.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from kd_core.config import Params
from kd_core.errors import UserError

IDENTITY_TAGS = ("data_fingerprint", "cache_key", "params_hash", "git_commit")

NOT_IN_GIT = ("dvc.lock", "params.yaml")  # written by the pipeline itself; covered by other hashes


def unknown(what: str) -> str:
    """A marker for an identity part that could not be read: unique, so it never matches another."""
    return f"unknown-{what}-{uuid.uuid4().hex[:12]}"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout


def git_commit(root: Path) -> str:
    """HEAD, or HEAD-dirty.<digest> with uncommitted changes, or a unique `unknown-commit-…` outside git.

    The digest of the changes keeps two different uncommitted edits from looking identical to the
    idempotence check. dvc.lock and params.yaml are left out: the pipeline writes them itself and
    the data/cache/params hashes already cover them.
    """
    try:
        head = _git(root, "rev-parse", "HEAD").strip()
        excludes = [f":(exclude){p}" for p in NOT_IN_GIT]
        diff = _git(root, "diff", "HEAD", "--binary", "--", ".", *excludes)
        untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z", "--", ".", *excludes)
    except (OSError, subprocess.CalledProcessError):
        return unknown("commit")
    if not diff and not untracked:
        return head
    h = hashlib.sha256(diff.encode())
    for name in sorted(filter(None, untracked.split("\0"))):
        path = root / name
        try:  # a symbolic link is its target's name, as git would store it (a linked .venv is not read)
            content = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):  # gone since git listed it (a database's journal)
            continue
        h.update(name.encode())
        h.update(hashlib.sha256(content).digest())
    return f"{head}-dirty.{h.hexdigest()[:12]}"


@dataclass(frozen=True)
class Fingerprints:
    data_fingerprint: str
    cache_key: str
    params_hash: str
    git_commit: str
    teacher_fingerprint: str | None

    def identity(self) -> dict[str, str]:
        """The tags that make two candidates the same candidate (ARCHITECTURE: idempotent register)."""
        return {k: getattr(self, k) for k in IDENTITY_TAGS}

    def tags(self) -> dict[str, str]:
        extra = {"teacher_fingerprint": self.teacher_fingerprint} if self.teacher_fingerprint else {}
        return {**self.identity(), **extra}


def fingerprints(root: Path, params: Params) -> Fingerprints:
    """With several teachers the cache key and teacher fingerprint join each member's, in order."""
    from kd_core import data  # pandas: only here, so `kd status` (tracking -> git_commit) stays light

    paths = [root / d / "manifest.json" for d in params.logit_dirs()]
    manifests = [json.loads(p.read_text()) if p.exists() else {} for p in paths]
    keys = [str(m["key"]) if m.get("key") else unknown("cache") for m in manifests]
    teachers = [m.get("teacher_fingerprint") for m in manifests]
    if len(manifests) == 1:
        key, teacher = keys[0], teachers[0]
    else:
        key = hashlib.sha256("+".join(keys).encode()).hexdigest()
        teacher = hashlib.sha256("+".join(map(str, teachers)).encode()).hexdigest() if all(teachers) else None
    return Fingerprints(data.data_fingerprint(root / params.paths.prepared), key, params.digest(), git_commit(root),
                        teacher)


def dvc_stage_hashes(root: Path) -> dict[str, str]:
    """sha256 of each stage's dvc.lock entry (its deps, params and outs): `dvc.<stage>` tags."""
    path = root / "dvc.lock"
    if not path.exists():
        return {}
    try:
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return {f"dvc.{name}": hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode())
            .hexdigest() for name, entry in stages.items()}


def current_user() -> str:
    """`user@host` for audit tags."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container without a passwd entry
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"
