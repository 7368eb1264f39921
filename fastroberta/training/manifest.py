"""A checkpoint's manifest: the size and SHA-256 of every file, written last; a checkpoint is intact when its
manifest exists and every file matches it."""
import hashlib
import json
import os

from fastroberta.training.output import atomic_write

MANIFEST = "manifest.json"


def _files_under(folder):
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _digests(folder, names):
    return {n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": file_digest(os.path.join(folder, n))}
            for n in names}


def write_manifest(folder, rank=0, world_size=1):
    """Checksum every file of ``folder`` (the ranks share the work) and let rank 0 write the manifest."""
    import torch.distributed as dist
    names = _files_under(folder)
    mine = _digests(folder, names[rank::world_size])
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    else:
        parts = [mine]
    if rank == 0:
        files = {}
        for part in parts:
            files.update(part)
        atomic_write(os.path.join(folder, MANIFEST), json.dumps({"format": 1, "files": files}, indent=1))


def verify_checkpoint(folder):
    """None when ``folder`` is an intact checkpoint, else what is wrong with it (one phrase)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return "it does not exist"
    if not os.path.isfile(manifest_path):
        return f"it has no {MANIFEST} (its save never completed, or an older fastroberta wrote it)"
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, entry in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} were written"
        if file_digest(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None
