"""Building the tiny default once, caching it, and finding it again: :func:`build_tiny_default`; the copy shipped
with the package: :func:`shipped_tiny_default`; the one the overlays use: :func:`get_tiny_default`.

Shipped: the default spec's build is part of the package (``ssopd_verl/tiny_default/shipped/``: model, tokenizer,
parquet files, manifest; ~2.7 MB), so that ``+tiny=default`` needs no build and every machine starts from the same
checkpoint. A build's floats depend on the CPU's instruction set (a build on an AVX-512 AMD EPYC stopped at another
step with other held-out numbers than the one here), so a build is deterministic per machine only; the shipped copy
is loaded after checking every file's sha256 against its manifest, and a missing or changed file is an error, never
a silent rebuild. ``python -m ssopd_verl.tiny_default --ship`` regenerates it (build, or the cached build, copied
into the package).

The build: the task's seeded splits, the tokenizer trained on the warm-start problems, a seeded model, the warm
start, the held-out measurement (every validation problem, ``heldout_samples`` = 4 samples each, temperature 1.0,
seed ``heldout_seed``: student and teacher-prompt sampled accuracy, greedy student accuracy, what the overlay's
validation reads, and the count of mixed problems; measured: student 0.38, teacher prompt 0.90, greedy student
0.55), then the model, the tokenizer and ``train.parquet`` / ``val.parquet`` written out.

Cache: it is built once into a versioned directory (default ``$SSOPD_CACHE/tiny-default-v2``, ``$SSOPD_CACHE``
defaulting to ``~/.cache/ssopd_verl``), under a file lock, in a sibling temporary directory that is renamed into
place after ``manifest.json`` (versions, spec, seed, accuracies, held-out measurement, steps, history, sha256 of
every file) is written, so an interrupted build is never mistaken for a finished one. A later call checks the
manifest (format, :data:`CACHE_VERSION`, the spec) and the file hashes and returns the cached build without
training; nothing else (no source file) is part of the key.

Determinism: the same spec (seed included) gives byte-identical files on the same software versions, thread count
(``num_threads``, default 1, set for the warm start and restored after: one thread is also the fastest on a shared
2-core machine) and CPU (its instruction set: matmul and softmax kernels round differently under AVX2 and
AVX-512, and 500 steps of training amplify that); the manifest records the versions and thread count. The global
torch RNG is left untouched.

Also the Hydra resolver ``${ssopd_tiny:model_path}`` of the ``+tiny=default`` overlay (the shipped copy), and
``${ssopd_tiny:model_path,<task>}`` (a task's preset build) of ``+tiny=addition3`` (:func:`resolve_path`).

Imports: the standard library at module level (the shipped copy or a cached build is returned without importing
torch); torch, transformers, tokenizers and pandas inside the build; verl never.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ssopd_verl.tiny_default.model import measure, new_model, save_model
from ssopd_verl.tiny_default.spec import TinyDefaultSpec
from ssopd_verl.tiny_default.tasks import get_task, make_splits, parquet_rows
from ssopd_verl.tiny_default.tasks.addition import DATA_SOURCE
from ssopd_verl.tiny_default.tokenizer import CHAT_TEMPLATE_KWARGS, build_tokenizer
from ssopd_verl.tiny_default.warm_start import warm_start

__all__ = [
    "CACHE_NAME",
    "CACHE_VERSION",
    "RESOLVER",
    "SHIPPED_DIR",
    "TinyDefault",
    "build_tiny_default",
    "cached_tiny_default",
    "default_cache_dir",
    "get_tiny_default",
    "resolve_path",
    "ship_tiny_default",
    "shipped_tiny_default",
]

CACHE_VERSION = 2  # 2: the warm start also teaches the teacher prompt (held-out accuracies in the manifest)
CACHE_NAME = f"tiny-default-v{CACHE_VERSION}"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
TRAIN_FILE = "train.parquet"
VAL_FILE = "val.parquet"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"  # the default spec's build, package data


@dataclass(frozen=True)
class TinyDefault:
    """A finished build. Paths are absolute; ``accuracy`` / ``teacher_accuracy`` are the sampled student /
    teacher-prompt accuracies when the warm start stopped (temperature 1.0, ``spec.n_check`` problems x
    ``spec.check_samples`` samples); ``heldout`` is the manifest's independent measurement on the validation
    problems (see :func:`~ssopd_verl.tiny_default.model.measure`)."""

    model_path: str  # model + tokenizer (save_pretrained layout; AutoTokenizer / AutoModelForCausalLM load it)
    train_file: str
    val_file: str
    accuracy: float
    steps: int
    cache_dir: str = ""
    teacher_accuracy: float = float("nan")
    heldout: dict = field(default_factory=dict, compare=False)
    data_source: str = DATA_SOURCE
    chat_template_kwargs: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict, repr=False, compare=False)


def default_cache_dir(spec: Optional[TinyDefaultSpec] = None) -> Path:
    """``$SSOPD_CACHE/tiny-default-v2`` (``$SSOPD_CACHE`` defaults to ``~/.cache/ssopd_verl``); a non-default spec
    gets a suffix with its digest."""
    root = Path(os.environ.get("SSOPD_CACHE") or Path.home() / ".cache" / "ssopd_verl").expanduser()
    name = CACHE_NAME
    if spec is not None and spec != TinyDefaultSpec():
        name += "-" + spec.digest()[:10]
    return root / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("ssopd-verl", "torch", "transformers", "tokenizers", "pandas", "pyarrow", "verl"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cached_tiny_default(
    cache_dir: Optional[os.PathLike | str] = None, spec: Optional[TinyDefaultSpec] = None
) -> Optional[TinyDefault]:
    """The build of ``spec`` (default: the default spec) if it is in the cache (``cache_dir`` or
    :func:`default_cache_dir`) and intact; None if it still has to be built. Never trains."""
    spec = spec or TinyDefaultSpec()
    return _load_cached(Path(cache_dir).expanduser().resolve() if cache_dir else default_cache_dir(spec), spec)


def _load_cached(cache_dir: Path, spec: TinyDefaultSpec) -> Optional[TinyDefault]:
    """The cached build if its manifest is complete, for this spec, and every file hash matches; else None."""
    manifest, problem = _check(cache_dir, spec)
    return None if problem else _result(cache_dir, manifest)


def _check(root: Path, spec: TinyDefaultSpec) -> tuple:
    """``(manifest, None)`` if ``root`` holds a finished build of ``spec`` whose files all match their sha256 in
    the manifest; else ``(manifest or None, what is wrong)``."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return None, f"no readable {MANIFEST} ({e})"
    if manifest.get("format") != "ssopd-tiny-default" or manifest.get("version") != CACHE_VERSION:
        return manifest, f"format/version {manifest.get('format')}/{manifest.get('version')}, expected v{CACHE_VERSION}"
    if manifest.get("spec") != spec.to_dict():
        return manifest, "built for another spec"
    files = manifest.get("files") or {}
    if not files:
        return manifest, "the manifest lists no files"
    for rel, digest in sorted(files.items()):
        p = root / rel
        if not p.is_file():
            return manifest, f"{rel} is missing"
        if _sha256(p) != digest:
            return manifest, f"{rel} does not match its sha256 in the manifest"
    return manifest, None


def _result(cache_dir: Path, manifest: dict) -> TinyDefault:
    return TinyDefault(
        model_path=str(cache_dir / MODEL_DIR),
        train_file=str(cache_dir / TRAIN_FILE),
        val_file=str(cache_dir / VAL_FILE),
        accuracy=float(manifest["accuracy"]),
        steps=int(manifest["steps"]),
        teacher_accuracy=float(manifest["teacher_accuracy"]),
        heldout=dict(manifest["heldout"]),
        cache_dir=str(cache_dir),
        data_source=manifest["data_source"],
        chat_template_kwargs=dict(manifest["chat_template_kwargs"]),
        manifest=manifest,
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _write_parquet(rows: list, path: Path) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path, index=False)


def _build_into(out: Path, spec: TinyDefaultSpec, progress: Optional[Callable[[str], None]]) -> dict:
    t0 = time.perf_counter()
    task = get_task(spec.task)
    splits = make_splits(spec)
    tokenizer = build_tokenizer(spec, splits["sft"])
    model = new_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    if progress:
        progress(
            f"tiny default: vocabulary {len(tokenizer)} tokens, model {n_params / 1e6:.2f}M parameters, "
            f"{len(splits['sft'])} warm-start problems"
        )
    with _torch_threads(spec.num_threads):
        accuracy, teacher_accuracy, steps, history = warm_start(model, tokenizer, spec, splits, progress)
        heldout = measure(
            model,
            tokenizer,
            splits["val"],
            samples=spec.heldout_samples,
            seed=spec.heldout_seed,
            max_new_tokens=spec.max_new_tokens,
        )
    heldout = {"split": "val", **heldout} if heldout else {}
    if progress and heldout:
        progress(
            f"held out ({heldout['problems']} val problems x {heldout['samples']}, temperature 1): student "
            f"{heldout['student_accuracy']:.3f}, teacher prompt {heldout['teacher_accuracy']:.3f}; greedy student "
            f"{heldout['student_greedy_accuracy']:.3f}"
        )

    model_dir = out / MODEL_DIR
    model_dir.mkdir(parents=True)
    save_model(model, tokenizer, model_dir)
    _write_parquet(parquet_rows(task, splits["train"], "train"), out / TRAIN_FILE)
    _write_parquet(parquet_rows(task, splits["val"], "val"), out / VAL_FILE)

    for p in out.rglob("*"):  # safetensors writes 0600; a shared cache should be readable
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    files = {str(p.relative_to(out)): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "format": "ssopd-tiny-default",
        "version": CACHE_VERSION,
        "spec": spec.to_dict(),
        "seed": spec.seed,
        "versions": _versions(),
        "torch_threads": spec.num_threads,
        "accuracy": accuracy,
        "teacher_accuracy": teacher_accuracy,
        "steps": steps,
        "history": history,
        "heldout": heldout,
        "teacher_prompt": {
            "builder": "ssopd_verl.teacher_context.build_teacher_context",
            "template": "ssopd.template default (teacher_context.DEFAULT_TEMPLATE)",
            "witness": "the problem's worked solution as response ids, witness_from_response(..., 'keep')",
            "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
        },
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "data_source": task.data_source,
        "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
        "rows": {"train": len(splits["train"]), "val": len(splits["val"]), "sft": len(splits["sft"])},
        "build_seconds": round(time.perf_counter() - t0, 2),
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last: marks completion
    return manifest


def build_tiny_default(
    cache_dir: Optional[os.PathLike | str] = None,
    *,
    force: bool = False,
    spec: Optional[TinyDefaultSpec] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> TinyDefault:
    """Build the tiny default into ``cache_dir`` (default :func:`default_cache_dir`) once, and return it.

    A finished build (manifest present, same spec, file hashes intact) is returned as is, without training or
    touching any file, unless ``force``. Otherwise it is built in a temporary sibling directory that replaces
    ``cache_dir`` once complete; concurrent callers wait on a sibling lock file ``.<name>.lock``. ``progress``
    receives one line per accuracy check. Raises RuntimeError if the warm start misses the band."""
    spec = spec or TinyDefaultSpec()
    cache_dir = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir(spec)
    if not force:
        cached = _load_cached(cache_dir, spec)
        if cached is not None:
            return cached
    with _file_lock(cache_dir.with_name(f".{cache_dir.name}.lock")):
        if not force:  # another process may have finished it while we waited
            cached = _load_cached(cache_dir, spec)
            if cached is not None:
                return cached
        for stale in cache_dir.parent.glob(cache_dir.name + ".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_dir.with_name(f"{cache_dir.name}.partial-{os.getpid()}")
        tmp.mkdir(parents=True)
        manifest = _publish(tmp, cache_dir, lambda: _build_into(tmp, spec, progress))
    return _result(cache_dir, manifest)


def _publish(tmp: Path, target: Path, fill: Callable[[], object]):
    """``fill()`` writes ``tmp``, which then replaces ``target`` in one rename; whatever interrupts it leaves no
    half-written ``target`` (``tmp`` is removed). Returns what ``fill`` returned."""
    try:
        result = fill()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


# The shipped copy and the overlays' choice.


def shipped_tiny_default(root: Optional[os.PathLike | str] = None) -> TinyDefault:
    """The default spec's build shipped with the package (``root``, default :data:`SHIPPED_DIR`): the same model
    on every machine. Checked against its manifest (format, version, spec, every file's sha256) without importing
    torch. Raises RuntimeError if anything is missing or changed: it is never rebuilt silently, since a rebuild on
    another CPU is another model."""
    root = Path(root).expanduser().resolve() if root is not None else SHIPPED_DIR
    manifest, problem = _check(root, TinyDefaultSpec())
    if problem:
        raise RuntimeError(
            f"the shipped tiny default in {root} is unusable: {problem}. Reinstall the package (or restore the files "
            "from git), or regenerate it on this machine with `python -m ssopd_verl.tiny_default --ship`."
        )
    return _result(root, manifest)


def ship_tiny_default(built: TinyDefault, root: Optional[os.PathLike | str] = None) -> TinyDefault:
    """Copy a finished build of the default spec into the package (``root``, default :data:`SHIPPED_DIR`),
    replacing the shipped copy: the manifest and the files it lists, nothing else. Returns the checked copy."""
    if built.manifest.get("spec") != TinyDefaultSpec().to_dict():
        raise ValueError("only a build of the default spec TinyDefaultSpec() is shipped; this one has another spec")
    root = Path(root).expanduser().resolve() if root is not None else SHIPPED_DIR
    tmp = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def copy_files():
        for rel in [MANIFEST, *built.manifest["files"]]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(built.cache_dir) / rel, tmp / rel)

    _publish(tmp, root, copy_files)
    return shipped_tiny_default(root)


def get_tiny_default(spec: Optional[TinyDefaultSpec] = None) -> TinyDefault:
    """The tiny default the overlays and tests use: the shipped copy for the default spec (no build, no torch
    import), otherwise (another task or seed) that spec's build, built into the cache on first use."""
    spec = spec or TinyDefaultSpec()
    if spec == TinyDefaultSpec():
        return shipped_tiny_default()
    # "ssopd: " so that scripts/run_tiny_cpu.sh, which shows only our lines, shows the first-use build's progress
    return build_tiny_default(spec=spec, progress=lambda line: print(f"ssopd: {line}", file=sys.stderr, flush=True))


# Hydra resolver: `${ssopd_tiny:model_path}` in the `+tiny=default` overlay, `${ssopd_tiny:model_path,addition3}`
# in `+tiny=addition3` (registered by the verl plugin).

RESOLVER = "ssopd_tiny"


def resolve_path(field_name: str, task: Optional[str] = None) -> str:
    """A path of the tiny default for a config interpolation (:func:`get_tiny_default`).

    ``${ssopd_tiny:model_path}`` (no task): the shipped default, ``TinyDefaultSpec()``; no build.
    ``${ssopd_tiny:model_path,addition3}``: the build of that task's preset, ``TinyDefaultSpec.for_task(task)``,
    the one ``python -m ssopd_verl.tiny_default --task addition3`` builds (same cache directory), built on first
    use."""
    allowed = ("model_path", "train_file", "val_file")
    if field_name not in allowed:
        raise ValueError(f"${{{RESOLVER}:{field_name}}}: expected one of {allowed}")
    spec = TinyDefaultSpec() if task is None else TinyDefaultSpec.for_task(str(task))
    return getattr(get_tiny_default(spec), field_name)
