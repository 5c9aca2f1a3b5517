"""Teacher outputs computed once per (training image, view) and read back while training.

Teachers are frozen, so what they say about an augmented image never changes: FKD (Shen and Xing,
ECCV 2022) stores it once. The catch is augmentation. Here every training image has ``views``
pre-drawn augmentations, each a pure function of (image index, view): every random choice of crop,
flip, RandAugment and erasing comes from that seed, so the view can be replayed exactly. The cache
holds each teacher's logits for every (image, view); during training each sample picks one of its
views from (seed, epoch, sample, copy), the student sees that very view, replayed, and the
teachers' outputs are read instead of computed.

- Storage: every class's logit in fp16 (default), or with ``top_k`` the k largest logits (fp16),
  their classes and the log-sum-exp of all logits (fp32). A top-k cache gives the teachers'
  probabilities of those k classes exactly and spreads the rest of the mass evenly over the other
  classes; the losses it can serve are those marked ``probabilities_only`` (``kl`` at tau 1 with
  ``mean_prob``, ``hard``), whose teacher side is then exact on the top k.
- Views: by default one per image per epoch and repeated-augmentation copy (FKD keeps one per image
  per epoch), so no view is used twice by a run; each image walks through its views in an order
  drawn from (seed, image). Fewer views are reused; the copies of one image in one epoch always get
  distinct views. A cache is shared by every run with the same teacher, data and augmentation,
  whatever its seed: such runs draw their views from the same pool.
- Mixup/cutmix: the student sees the mix of two replayed views and the teachers' cached
  probabilities are mixed with the same coefficient (for cutmix, the pasted area's share). This
  approximates what a teacher would say about the mixed image, and only losses that use the teachers'
  probabilities at temperature 1 accept it. Mixing pairs come from the (per-process) batch, as online.
- One directory per teacher, ``<root>/<teacher name>-<weights hash>``, built in chunks of images
  that each land atomically, so a build resumes where it stopped, and several processes can build
  disjoint chunks (by global image index). Its ``key.json`` records everything the outputs depend
  on; a cache whose key differs from the run's is refused, naming what differs.
- Integrity: at open, every array's header, shape and dtype must be the key's; each chunk's marker
  records a checksum of its rows, checked when a process first reads that chunk (caches reach tens
  of GB: not all at open), or of every chunk by ``kdkit cache build --verify``. Chunks built before
  checksums were recorded are read unchecked.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import PIL
import timm
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from kdkit.builder.data import fingerprint, replay
from kdkit.errors import reason
from kdkit.errors import KdkitError
from kdkit.recipe.sections import CacheSettings, cache_root
from kdkit.recipe.toml import diff_tables
from kdkit.store import lock
from kdkit.store.atomic import atomic_write
from kdkit.train.processes import Processes

CHUNK = 256  # images per chunk: the unit of building, resuming and sharding
FORMAT = 1


class TeacherOutputs:
    """One teacher's cache: memory-mapped arrays of (image, view) outputs and the chunks already built."""

    def __init__(self, path: Path, key: dict, images: int, classes: int):
        self.path, self.key, self.images, self.classes = path, key, images, classes
        self.views, self.top_k = key["views"], key["top_k"]
        self.chunks = -(-images // CHUNK)
        shapes = ({"logits": ((images, self.views, classes), np.float16)} if not self.top_k else
                  {"values": ((images, self.views, self.top_k), np.float16),
                   "classes": ((images, self.views, self.top_k), np.int32),
                   "lse": ((images, self.views), np.float32)})
        self.files = {name: path / f"{name}.npy" for name in shapes}
        self.shapes = shapes
        self.checked: set[int] = set()  # chunks whose checksums this process has compared

    # --- building ---------------------------------------------------------------------------------

    def lock(self, waiting=None) -> None:
        """Make this process the cache's one builder (``kdkit.store.lock.acquire``), its folder created first."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock.acquire(self.path, waiting)

    def unlock(self) -> None:
        lock.release(self.path)

    def create(self) -> None:
        """Make the directory, the key and the arrays (sparse files), or check an existing one's key."""
        key_file = self.path / "key.json"
        if key_file.is_file():
            existing = self._read_json(key_file)
            if not isinstance(existing, dict):
                raise self._damaged(key_file, "not a JSON object")
            changes = diff_tables(existing, self.key)
            if changes:
                raise KdkitError(f"{self.path}: this teacher-output cache was built for another setting: "
                                 f"{'; '.join(changes)}. Remove it, or set teacher_cache.root elsewhere")
            self._map("r")  # the arrays' headers, shapes and dtypes
            return
        (self.path / "chunks").mkdir(parents=True, exist_ok=True)
        for name, (shape, dtype) in self.shapes.items():
            np.lib.format.open_memmap(self.files[name], mode="w+", dtype=dtype, shape=shape).flush()
        atomic_write(key_file, lambda tmp: tmp.write_text(json.dumps(self.key, indent=2) + "\n"))

    def done(self, chunk: int) -> bool:
        return (self.path / "chunks" / f"{chunk}.done").is_file()

    @property
    def complete(self) -> bool:
        return (self.path / "complete.json").is_file()

    def write_chunk(self, chunk: int, outputs: torch.Tensor, seconds: float) -> None:
        """Store chunk ``chunk``'s logits, (images, views, classes) in fp32, then mark it done with the
        seconds it took to compute."""
        start = chunk * CHUNK
        arrays = self._map("r+")
        end = start + outputs.shape[0]
        if self.top_k:
            values, classes = outputs.topk(self.top_k, dim=-1)
            arrays["values"][start:end] = values.half().numpy()
            arrays["classes"][start:end] = classes.int().numpy()
            arrays["lse"][start:end] = outputs.logsumexp(-1).numpy()
        else:
            arrays["logits"][start:end] = outputs.half().numpy()
        for array in arrays.values():
            array.flush()
        record = {"seconds": round(seconds, 3), "blake2b": self._checksums(chunk, arrays)}
        atomic_write(self._marker_file(chunk), lambda tmp: tmp.write_text(json.dumps(record) + "\n"))

    def finish(self) -> None:
        """Mark the cache complete once every chunk is done (the main process, after all have built)."""
        missing = [c for c in range(self.chunks) if not self.done(c)]
        if missing:
            raise KdkitError(f"{self.path}: {len(missing)} chunks of the teacher-output cache are not built")
        size = sum(f.stat().st_size for f in self.files.values())
        # every chunk's time, whichever process or sitting built it (one process: the build's wall time)
        build_s = sum(self._marker(c)["seconds"] for c in range(self.chunks))
        record = {"images": self.images, "views": self.views, "top_k": self.top_k, "bytes": size,
                  "bytes_per_image": size / self.images, "build_s": round(build_s, 1)}
        atomic_write(self.path / "complete.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))

    # --- reading ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Map the arrays of a complete cache (checked against the key) and read its record."""
        complete = self.path / "complete.json"
        self.record = self._read_json(complete, "delete it; kdkit cache build --verify RECIPE checks the chunks "
                                                "and writes it again")
        expected = {"images": self.images, "views": self.views, "top_k": self.top_k}
        if not isinstance(self.record, dict) or {k: self.record.get(k) for k in expected} != expected:
            raise self._damaged(complete, f"does not record this cache's {expected}")
        self.arrays = self._map("r")

    def check_chunk(self, chunk: int) -> bool:
        """Compare a chunk's rows with the checksums recorded when it was written; False when it has none
        (built by a kdkit before checksums). A mismatch is refused, naming the arrays."""
        expected = self._marker(chunk).get("blake2b")
        if expected is None:
            self.checked.add(chunk)
            return False
        found = self._checksums(chunk, self.arrays)
        wrong = [name for name in self.files if found[name] != expected.get(name)]
        if wrong:
            rows = f"images {chunk * CHUNK}-{min((chunk + 1) * CHUNK, self.images) - 1}"
            raise self._damaged(self.files[wrong[0]], f"chunk {chunk} ({rows}) does not match the checksum "
                                f"recorded when it was written ({', '.join(wrong)})")
        self.checked.add(chunk)
        return True

    def verify(self) -> int:
        """Check every chunk's checksums; the number of chunks that have none (built before checksums)."""
        return sum(not self.check_chunk(chunk) for chunk in range(self.chunks))

    def log_probs(self, indices: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """What the loss gets as this teacher's logits for these (image, view) pairs, fp32 (B, classes):
        the stored logits, or for a top-k cache log-probabilities (the top k exact, the rest even)."""
        i, v = indices.numpy(), views.numpy()
        for chunk in set((i // CHUNK).tolist()) - self.checked:
            self.check_chunk(chunk)
        if not self.top_k:
            return torch.from_numpy(self.arrays["logits"][i, v].astype(np.float32))
        values = torch.from_numpy(self.arrays["values"][i, v].astype(np.float32))
        classes = torch.from_numpy(self.arrays["classes"][i, v].astype(np.int64))
        top = values - torch.from_numpy(self.arrays["lse"][i, v]).unsqueeze(-1)
        rest = (1 - top.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / max(self.classes - self.top_k, 1)
        out = rest.log().expand(-1, self.classes).clone()
        return out.scatter_(-1, classes, top)

    # --- integrity --------------------------------------------------------------------------------

    def _map(self, mode: str) -> dict[str, np.memmap]:
        """The arrays memory-mapped; a bad header, shape or dtype is refused, naming the file."""
        arrays = {}
        for name, (shape, dtype) in self.shapes.items():
            try:
                array = np.lib.format.open_memmap(self.files[name], mode=mode)
            except (OSError, ValueError) as exc:  # truncated, a bad header, not an .npy file
                raise self._damaged(self.files[name], f"cannot read the array ({reason(exc)})") from None
            if array.shape != shape or array.dtype != dtype:
                raise self._damaged(self.files[name], f"holds {array.dtype} {array.shape}, the key needs "
                                    f"{np.dtype(dtype)} {shape}")
            arrays[name] = array
        return arrays

    def _checksums(self, chunk: int, arrays: dict[str, np.ndarray]) -> dict[str, str]:
        rows = slice(chunk * CHUNK, min((chunk + 1) * CHUNK, self.images))
        return {name: hashlib.blake2b(np.ascontiguousarray(array[rows]), digest_size=16).hexdigest()
                for name, array in arrays.items()}

    def _marker_file(self, chunk: int) -> Path:
        return self.path / "chunks" / f"{chunk}.done"

    def _marker(self, chunk: int) -> dict:
        """A built chunk's record: its build seconds and checksums (an earlier kdkit wrote the seconds alone)."""
        record = self._read_json(self._marker_file(chunk))
        if isinstance(record, (int, float)) and not isinstance(record, bool):
            return {"seconds": float(record)}
        if not isinstance(record, dict) or not isinstance(record.get("seconds"), (int, float)):
            raise self._damaged(self._marker_file(chunk), "not a chunk record")
        return record

    def _read_json(self, file: Path, fix: str = ""):
        try:
            return json.loads(file.read_bytes())
        except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8, not JSON
            raise self._damaged(file, f"cannot read it ({reason(exc)})", fix) from None

    def _damaged(self, file: Path, what: str, fix: str = "") -> KdkitError:
        fix = fix or f"remove {self.path} and build the cache again (kdkit cache build RECIPE)"
        return KdkitError(f"{file}: {what}: the teacher-output cache is damaged; {fix}")


def cache_key(exp, parts, name: str, teacher, views: int, top_k: int) -> dict:
    """Everything a teacher's cached outputs depend on (the key.json of its cache)."""
    augment = exp.augment
    return {
        "format": FORMAT, "teacher": name, "weights": parts.teacher_hashes[name],
        "teacher_input": {"mean": teacher.mean_kd.flatten().tolist(), "std": teacher.std_kd.flatten().tolist(),
                          "size": teacher.input_size, "class_index": teacher.class_index, "bf16": teacher.bf16},
        "data": parts.splits.identity(), "train_images": fingerprint(parts.train_indices),
        "image_size": exp.data.image_size, "mean": list(parts.splits.mean), "std": list(parts.splits.std),
        "augment": {k: v for k, v in asdict(augment).items() if k in VIEW_AUGMENTATION},
        "views": views, "top_k": top_k,
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
                     "timm": str(timm.__version__), "pillow": PIL.__version__},
    }


# What makes a view: mixing, label smoothing and repeated augmentation act later, in training.
VIEW_AUGMENTATION = ("rand_augment", "random_erasing", "interpolation", "crop_scale", "hflip")


def views_of(exp) -> int:
    return exp.teacher_cache.views or exp.train.epochs * exp.augment.repeated_aug


def open_caches(exp, parts, device, *, build: bool = True, processes: Processes = Processes(),
                progress=None, waiting=None) -> dict[str, TeacherOutputs]:
    """Every needed teacher's cache, built first where missing or unfinished (unless ``build`` is false).

    Several processes build it together: each its share of the chunks (by global image index), under
    the lock that rank 0 holds on the cache's folder. A cache another command is building is refused,
    or with ``waiting`` (``kdkit.store.lock.acquire``'s) waited for, then reused.
    """
    settings: CacheSettings = exp.teacher_cache
    root = Path(settings.root) if settings.root else cache_root() / "teacher_outputs"
    views = views_of(exp)
    caches = {}
    for name, teacher in parts.teachers.items():
        key = cache_key(exp, parts, name, teacher, views, settings.top_k)
        cache = TeacherOutputs(root / f"{name}-{key['weights']}", key, len(parts.train_set), parts.splits.num_classes)
        if not cache.complete:
            if not build:
                raise KdkitError(f"{cache.path}: the teacher-output cache of {name!r} is not built yet "
                                 "(kdkit cache build RECIPE builds it)")
            processes.on_main(lambda: cache.lock(waiting))
            try:
                processes.on_main(cache.create)  # or checks the key of one built while this process waited
                if not cache.complete:
                    build_cache(cache, exp, parts, teacher, device, rank=processes.rank, world=processes.world,
                                progress=progress)
                    processes.wait_for_all()  # the shares may be uneven (a build resumed)
                    if not cache.complete:
                        processes.on_main(lambda: cache.finish())
            finally:
                if processes.is_main:
                    cache.unlock()
        else:
            cache.create()  # checks the key
        cache.open()
        caches[name] = cache
    return caches


class _Views(Dataset):
    """The (index, view) images of one chunk, for a loader's workers."""

    def __init__(self, dataset: Dataset, keys: list[tuple[int, int]]):
        self.dataset, self.keys = dataset, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return replay(self.dataset, *self.keys[i])[0]


@torch.no_grad()
def build_cache(cache: TeacherOutputs, exp, parts, teacher, device, *, rank: int = 0, world: int = 1,
                progress=None) -> None:
    """Run the teacher once on every (image, view) of this process's chunks that are not done yet."""
    mean, std = parts.normalization(device)
    todo = [c for c in range(cache.chunks) if c % world == rank and not cache.done(c)]
    if progress is not None:
        progress.start(f"teacher outputs of {cache.key['teacher']!r}", len(todo) * CHUNK * cache.views)
    for chunk in todo:
        start = time.perf_counter()
        indices = range(chunk * CHUNK, min((chunk + 1) * CHUNK, cache.images))
        keys = [(index, view) for index in indices for view in range(cache.views)]
        loader = DataLoader(_Views(parts.train_set, keys), batch_size=exp.data.batch_size_eval,
                            num_workers=exp.data.workers)
        outputs = []
        for images in loader:
            outputs.append(teacher.logits(images.to(device), mean, std).float().cpu())
            if progress is not None:
                progress.advance(len(images))
        cache.write_chunk(chunk, torch.cat(outputs).view(len(indices), cache.views, -1), time.perf_counter() - start)
    if progress is not None:
        progress.stop()


def mix_teacher_outputs(logits: torch.Tensor, lam: float) -> torch.Tensor:
    """The teacher's output for a mixed batch from its outputs on the unmixed views: the log of the
    probabilities mixed as timm mixes the images (each with the batch reversed, coefficient ``lam``)."""
    if lam == 1.0:
        return logits
    probs = logits.softmax(-1)
    return (lam * probs + (1 - lam) * probs.flip(0)).log()


def summary_of(caches: dict[str, TeacherOutputs]) -> dict:
    """What a run's summary records of the caches it read."""
    out = {}
    for name, cache in caches.items():
        out[name] = {"path": str(cache.path), **cache.record}
    return out
