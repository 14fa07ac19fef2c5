"""Fine-tuning a backbone with a linear head (the base-vs-fine-tuned study is
:mod:`latentmap.finetune_study`).

``finetune(cfg)`` trains on the ``train`` part of a seeded, stratified holdout split and
evaluates on the ``holdout`` part after every epoch; it saves the backbone in its own format
(transformers ``save_pretrained`` folder, or a timm ``model.safetensors``) with a
``latentmap.json`` that records the base model, the dataset, the split and how to reload it.

"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from latentmap import data, machine, settings
from latentmap.config import instantiate_node
from latentmap.errors import ConfigError
from latentmap.extract import Rows, collate, loader_workers
from latentmap.task import _sweep_job, tracked_task
from latentmap.tracking import Tracker

log = logging.getLogger(__name__)

RECORD = "latentmap.json"
# A parameter's block index: encoder.layer.3., encoder.layers.3., stages.1., blocks.4., layer.7.
# (counted from 0), or timm's ResNet stages layer1. .. layer4. (counted from 1).
_BLOCK = re.compile(r"(?:^|\.)(?:(?:layer|layers|blocks|stages)\.(\d+)|layer(\d+))\.")


def _block_of(name: str) -> int | None:
    """The block a parameter belongs to, from 0, or None for one outside the numbered blocks."""
    match = _BLOCK.search(name)
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) is not None else int(match.group(2)) - 1


def freeze_first_blocks(module, count: int, model_name: str) -> int:
    """Freeze the stem (every parameter before the first block) and blocks ``0..count-1``.

    Returns the number of frozen parameter tensors. Raises ConfigError when the model's
    parameter names show no numbered blocks to count.
    """
    settings.require("frozen_layers", count)
    if count == 0:
        return 0
    named = list(module.named_parameters())
    blocks = {block for name, _ in named if (block := _block_of(name)) is not None}
    if not blocks:
        raise ConfigError(f"frozen_layers={count}: {model_name} has no numbered blocks "
                          "(layer.N / layers.N / layerN / blocks.N / stages.N) to freeze; use frozen_layers=0")
    if count > len(blocks):  # every block frozen already at len(blocks): a larger count is a mistake
        raise ConfigError(f"frozen_layers={count} is more than the {len(blocks)} blocks of {model_name}: use "
                          f"0..{len(blocks)} ({len(blocks)} freezes every block, and the head alone learns)")
    frozen, seen_block = 0, False
    for name, parameter in named:
        block = _block_of(name)
        if block is not None:
            seen_block = True
            if block < count:
                parameter.requires_grad_(False)
                frozen += 1
        elif not seen_block:
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def source_part(cfg_dataset: DictConfig, part: str):
    """The dataset source of ``cfg_dataset`` set to one part of its holdout split (train or holdout)."""
    node = OmegaConf.to_container(cfg_dataset, resolve=True)
    node["part"] = part
    return instantiate_node(OmegaConf.create(node), "dataset")


def _loader(dataset, backbone, batch_size: int, shuffle: bool, seed: int, num_workers: int | None,
            max_pixels: int | None, intensity: tuple[float, float] | None, skip: bool):
    """Batches of (pixel values, labels); with ``skip`` (dataset.on_error=skip) an unreadable image
    leaves its batch with a warning, and a batch left empty is None."""
    from functools import partial

    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(Rows(dataset), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=loader_workers(num_workers, len(dataset)),
                      collate_fn=partial(collate, backbone=backbone, max_pixels=max_pixels, with_labels=True,
                                         intensity=intensity, drop_unreadable=skip),
                      drop_last=shuffle and len(dataset) > batch_size)


def _train_mode(module) -> None:
    """Training mode, except batch norm, which keeps its running statistics: small fine-tuning
    batches give poor statistics, and checkpoints with batch norm folded into the convolutions
    (identity statistics) break outright under batch statistics."""
    import torch

    module.train()
    for child in module.modules():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            child.eval()


def _accuracy(backbone, head, loader) -> float:
    import torch

    backbone.module.eval()
    head.eval()
    correct = total = 0
    with torch.inference_mode():
        for pixel_values, labels in filter(None, loader):
            logits = head(backbone.embed_with_grad(pixel_values))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def _readable_as_umask_allows(path: Path) -> None:
    """A folder 0777, a file 0666, less the process's umask: what mkdir and open give without a
    temporary folder's private mode."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def checkpoint_digest(folder: Path) -> str:
    """sha256 of a checkpoint folder's files other than its record (names and bytes): what the
    fine-tuning wrote, which the study checks before it reads the weights as the fine-tuned ones."""
    import hashlib

    from latentmap.models.base import file_sha256

    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != RECORD
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        digest.update(f"{file.relative_to(folder).as_posix()}|{file_sha256(file)}".encode())
    return digest.hexdigest()


def held_out_digest(dataset) -> str:
    """sha256 of the held-out images as a study finds them again: each image's class folder and file
    name (a moved dataset folder keeps them) or, without a file, its row index, with its label. Images
    added to or removed from the folder move the split, and change it."""
    import hashlib

    raw = data.undecoded(dataset)
    labels = data.labels_of(dataset)
    digest, position = hashlib.sha256(), 0
    for batch in raw.with_format("arrow").iter(batch_size=16_384):  # a hub dataset's image bytes a batch at a time
        paths = batch.column("image").combine_chunks().field("path").to_pylist()
        for path, index in zip(paths, batch.column("index").to_pylist()):
            where = "/".join(Path(path).parts[-2:]) if path else f"row {index}"
            digest.update(f"{where}|{labels[position] if labels is not None else ''}\n".encode())
            position += 1
    return digest.hexdigest()


def _save_atomically(backbone, head, folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write the checkpoint into a temporary sibling, then rename it into place."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        _readable_as_umask_allows(staging)  # mkdtemp's 0700: colleagues on a shared machine could not read it
        reload = backbone.save(staging)
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                  str(staging / "head.safetensors"))
        # The reload config must name the final folder, not the staging one.
        reload = json.loads(json.dumps(reload).replace(str(staging.resolve()), str(folder.resolve())))
        record = {**record, "reload": reload, "checkpoint_sha256": checkpoint_digest(staging)}
        (staging / RECORD).write_text(json.dumps(record, indent=2))
        for file in staging.rglob("*"):
            _readable_as_umask_allows(file)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return record


def _say_what_the_study_refuses(held_set, names: list[str]) -> None:
    """The fine-tuning study (experiment=finetune_study) scores the held-out images with run.py's
    metric settings: held-out images it would refuse with its defaults (a class of 1 image, k too
    large for N) are said now, in one WARNING line, while dataset.holdout or dataset.limit can still
    change; only fine-tuning again changes them afterwards."""
    from latentmap import metrics
    from latentmap.settings import CONF_DIR

    defaults = OmegaConf.load(CONF_DIR / "metrics" / "default.yaml")
    try:
        metrics.check(len(held_set), data.labels_of(held_set), int(defaults.k), int(defaults.folds),
                      halves=int(defaults.bootstrap), names=names)
    except ConfigError as error:
        log.warning("the fine-tuning study would refuse these %d held-out images with its default metrics (%s): "
                    "raise dataset.holdout or dataset.limit now, or run the study with smaller metrics.* later",
                    len(held_set), error)


def _prepare_finetune(cfg: DictConfig):
    """The checks a user's mistake can fail before any work (no MLflow run is created for them; in a
    sweep, a FAILED run marked refused), the
    two parts of the split and the model: (train set, held-out set, class names, the loaded backbone
    with its first ``frozen_layers`` blocks frozen, the number of frozen parameter tensors)."""
    target = str(cfg.model.get("_target_", ""))
    if target and not getattr(_class_of(target), "TRAINABLE", True):
        raise ConfigError(f"model={cfg.model.get('name', target)}: {target} has no weights to fine-tune; "
                          "choose a network, e.g. model=mobilenet_v2")
    if not cfg.dataset.holdout:
        raise ConfigError("dataset.holdout=0.0: fine-tuning needs held-out images, e.g. dataset.holdout=0.3")
    seed = int(cfg.seed)
    train_set = source_part(cfg.dataset, "train").load(seed=seed)
    held_set = source_part(cfg.dataset, "holdout").load(seed=seed)
    names = data.class_names(train_set)
    if names is None or len(names) < 2:
        raise ConfigError("fine-tuning needs a labelled dataset with at least 2 classes")
    _say_what_the_study_refuses(held_set, names)
    # The model, loaded and its first blocks frozen here, so that a frozen_layers it cannot take is
    # refused before the run exists. Seeded as the task was before it loads: the same weights.
    import torch

    torch.manual_seed(seed)
    backbone = instantiate_node(cfg.model, "model")
    folder = checkpoint_folder(cfg, backbone.name)
    replaces = _check_replaceable(folder, cfg)  # before the weights load: a name taken is refused at once
    backbone.load(cfg.device)
    frozen = freeze_first_blocks(backbone.module, cfg.frozen_layers, backbone.name)
    return train_set, held_set, names, backbone, frozen, (folder, replaces)


def checkpoint_folder(cfg: DictConfig, model_name: str) -> Path:
    """Where the checkpoint goes: ``checkpoint_dir/<name>`` (by default ``<model>-<source>-seed<seed>``),
    followed in a sweep by what the sweep varies in this job (``-optimizer.lr-0.001``), so that a
    sweep's jobs do not write one folder. The name stays a plain Hydra value (no ``=`` or ``,``), so
    that ``finetuned=`` or ``model.name=`` takes it as it is."""
    from latentmap.tracking.run import SWEPT_ENV, _job_overrides

    if cfg.name and (Path(str(cfg.name)).name != str(cfg.name) or str(cfg.name) in (".", "..")):
        raise ConfigError(f"name={cfg.name!r} is a folder name inside checkpoint_dir, without '/' or '..': "
                          f"e.g. name={_plain(str(cfg.name))}, or checkpoint_dir= for another place")
    name = str(cfg.name) if cfg.name else \
        f"{Path(model_name).name}-{Path(str(cfg.dataset._target_)).suffix[1:]}-seed{int(cfg.seed)}"
    overrides = _job_overrides() if _sweep_job() else {}
    for key in os.environ.get(SWEPT_ENV, "").split(","):
        if key and key in overrides and key != "name" and not (key == "seed" and not cfg.name):
            name += f"-{key}-{_plain(overrides[key])}"
    return Path(str(cfg.checkpoint_dir)) / name


def _plain(value: str) -> str:
    """A swept value as part of a folder name: letters, digits, ``.``, ``_`` and ``-`` kept, any other
    run of characters one ``_`` (``/data/a/train``: ``data_a_train``); a long one cut, with a hash of
    the whole so that two values stay two names."""
    import hashlib

    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("_") or "_"
    if len(plain) > 48:
        plain = f"{plain[:36]}_{hashlib.sha256(value.encode()).hexdigest()[:8]}"
    return plain


def _check_replaceable(folder: Path, cfg: DictConfig) -> bool:
    """Refuse, before any training, to replace what ``folder`` holds: an earlier checkpoint unless
    ``overwrite=true``, anything else (a folder latentmap did not write) always; an empty folder is
    nothing to lose; a checkpoint_dir that cannot be written (checked here, not after the training).
    Whether the save may replace the folder there now."""
    from latentmap.targets import cannot_make

    if (why := cannot_make(folder.parent)) is not None:
        raise ConfigError(f"checkpoint_dir={str(cfg.checkpoint_dir)!r}: {folder.parent} cannot be written ({why}): "
                          "choose a writable checkpoint_dir=")
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return folder.exists()
    key = f"name={cfg.name}" if cfg.name else f"the default name {folder.name!r}"
    if not (folder / RECORD).is_file():
        raise ConfigError(f"{key}: {folder} exists and is not a latentmap checkpoint; "
                          "choose another name= or checkpoint_dir=")
    if not bool(cfg.overwrite):
        raise ConfigError(f"{key}: {folder} already holds a fine-tuned checkpoint; choose another name=, "
                          "or overwrite=true to replace it")
    return True


def _note_overfitting(history: list[float]) -> None:
    """Say so when the held-out accuracy peaked before the last epoch: the checkpoint is the last
    epoch's (choosing the best epoch by the held-out images would leak them into the study that
    later measures on them)."""
    best = max(range(1, len(history)), key=history.__getitem__, default=0)
    if best and best < len(history) - 1 and history[best] > history[-1]:
        log.warning("held-out accuracy peaked at epoch %d (%.4f) and ended at %.4f: the checkpoint is the last "
                    "epoch's (the held-out images, which the study measures on, do not choose it)",
                    best, history[best], history[-1])


def _class_of(target: str):
    """The class a ``_target_`` names, or None where it cannot be imported (instantiation reports it)."""
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception:  # noqa: BLE001 (a bad target is reported, with its key, where the model is built)
        return None


@tracked_task(prepare=_prepare_finetune, role="finetune",
              describe=lambda cfg: f"finetune {Path(str(cfg.model.get('name', 'model'))).name} · {cfg.epochs} "
                                   f"epoch{'' if str(cfg.epochs) == '1' else 's'}")
def finetune(cfg: DictConfig, tracker: Tracker, prepared) -> dict[str, float]:
    """Fine-tune ``cfg.model`` with a linear head on the train part of ``cfg.dataset``."""
    import torch
    from tqdm.auto import tqdm

    train_set, held_set, names, backbone, frozen, (folder, replaces) = prepared
    seed = int(cfg.seed)
    base_weights = backbone.identity().get("weights")  # the base's files, before any training step
    held_out = held_out_digest(held_set)  # before the training: a failure here loses no epoch
    loading = (cfg.num_workers, cfg.dataset.max_image_pixels, data.intensity_of(cfg.dataset),
               cfg.dataset.on_error == "skip")
    train_loader = _loader(train_set, backbone, int(cfg.batch_size), True, seed, *loading)
    held_loader = _loader(held_set, backbone, int(cfg.batch_size), False, seed, *loading)
    with torch.inference_mode():
        probe, _ = next(filter(None, iter(held_loader)), (None, None))
        if probe is None:
            raise ConfigError(f"none of the {len(held_set)} held-out images could be read (the warnings above name "
                              "them): replace the files, or choose a dataset whose images read")

        width = backbone.embed_with_grad(probe).shape[1]
    head = torch.nn.Linear(width, len(names)).to(backbone.device)
    base_lr = float(cfg.optimizer.lr)
    groups = [{"params": [p for p in backbone.module.parameters() if p.requires_grad], "lr": base_lr},
              {"params": list(head.parameters()), "lr": base_lr * float(cfg.head_lr_multiplier)}]
    optimizer = instantiate_node(cfg.optimizer, "optimizer")(params=groups)
    tracker.set_tags({"base_model": backbone.name, "frozen_tensors": str(frozen),
                      "n_train": str(len(train_set)), "n_heldout": str(len(held_set))})
    # On the CPU, activations and gradients reuse freed memory instead of faulting in fresh pages
    # (machine.py).
    with machine.reuse_freed_memory(bool(cfg.reuse_freed_memory) and backbone.device == "cpu"):
        scores = {"heldout_acc": _accuracy(backbone, head, held_loader)}
        tracker.log_metrics(scores, step=0)
        history = [scores["heldout_acc"]]
        log.info("before fine-tuning: held-out accuracy %.3f (linear head at random)", scores["heldout_acc"])
        loss_fn = torch.nn.CrossEntropyLoss()
        for epoch in range(1, int(cfg.epochs) + 1):
            _train_mode(backbone.module)
            head.train()
            total_loss = correct = seen = 0
            for pixel_values, labels in filter(None, tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}",
                                                         unit="batch")):
                labels = labels.to(backbone.device)
                logits = head(backbone.embed_with_grad(pixel_values))
                loss = loss_fn(logits, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
            if not seen:
                raise ConfigError(f"none of the {len(train_set)} training images could be read (the warnings above "
                                  "name them): replace the files, or choose a dataset whose images read")
            scores = {"train_loss": total_loss / seen, "train_acc": correct / seen,
                      "heldout_acc": _accuracy(backbone, head, held_loader)}
            tracker.log_metrics(scores, step=epoch)
            history.append(scores["heldout_acc"])
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    _note_overfitting(history)
    if folder.exists() and not replaces:
        # Written by another job since this one began (a parallel sweep): keep both.
        taken = folder
        folder = next(taken.with_name(f"{taken.name}-{i}") for i in range(2, 10_000)
                      if not taken.with_name(f"{taken.name}-{i}").exists())
        log.warning("%s was written while this job trained; saving to %s instead", taken, folder)
    record = _save_atomically(backbone, head, folder, {
        "base_model": _local_paths_absolute(OmegaConf.to_container(cfg.model, resolve=True)),
        "dataset": _local_paths_absolute(OmegaConf.to_container(cfg.dataset, resolve=True)),
        "base_weights": base_weights,  # what the study checks the base it reloads against
        "seed": seed, "classes": names, "heldout_acc": scores["heldout_acc"],
        "heldout": held_out,  # the study refuses other held-out images (a changed folder)
    })
    tracker.set_tags({"checkpoint": str(folder.resolve()), "reload": json.dumps(record["reload"])})
    log.info("saved the fine-tuned backbone to %s", folder.resolve())
    return scores


_PATH_KEYS = ("name", "path", "checkpoint_path")  # the keys of a model or dataset node that may name a local path


def _local_paths_absolute(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with each of its :data:`_PATH_KEYS` that names an existing local file or folder made
    absolute, so that a study run from another folder reads the same base model and images (a
    relative ``dataset.path`` was recorded as typed). Hub ids (``google/vit-base-patch16-224``) that
    are no local path stay as they are, and so does a ``name`` without a folder in it (``resnet18``)."""
    def looks_local(key: str, value) -> bool:  # a bare name (timm's resnet18) is a model's, even beside ./resnet18
        return (key in _PATH_KEYS and isinstance(value, str) and bool(value) and Path(value).expanduser().exists()
                and (key != "name" or "/" in value or os.sep in value or value.startswith((".", "~"))))

    return {key: str(Path(value).expanduser().resolve()) if looks_local(key, value) else value
            for key, value in node.items()}


def read_record(folder: str) -> dict[str, Any]:
    """The record a fine-tuning wrote beside its checkpoint (a ConfigError line when there is none),
    its reload config pointed at ``folder``: the checkpoint is read where it is now, wherever it was
    written (its record names the folder it was saved to, which a move or copy leaves behind)."""
    path = Path(folder).expanduser() / RECORD
    if not path.is_file():
        raise ConfigError(f"finetuned={folder!r} has no {RECORD} ({path.resolve()}): "
                          "point it at a folder written by scripts/finetune.py")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"finetuned={folder!r}: its {RECORD} cannot be read ({error}): the fine-tuning that wrote "
                          "it did not finish, or the file was edited; fine-tune again") from error
    lacking = [key for key in ("base_model", "dataset", "seed", "reload") if not isinstance(record, dict)
               or key not in record]
    if lacking:
        raise ConfigError(f"finetuned={folder!r}: its {RECORD} lacks {', '.join(lacking)}: it was not written by "
                          "scripts/finetune.py, or was edited; fine-tune again")
    reload = record.get("reload") or {}
    written = (str(Path(reload["checkpoint_path"]).parent) if reload.get("checkpoint_path")
               else reload.get("name"))
    here = str(path.parent.resolve())
    if written and written != here and Path(written).is_absolute():
        log.info("%s was written to %s: reading the checkpoint where it is now, %s", RECORD, written, here)
        record["reload"] = {key: value.replace(written, here, 1) if isinstance(value, str) and value.startswith(written)
                            else value for key, value in reload.items()}
    return record

