"""The .dsd-in, .dsd-out forms of calibration and fine-tuning (what ``dsdeploy calibrate`` and ``finetune`` run).

:func:`calibrate_artifact` and :func:`finetune_artifact` load a converted artifact and its source
model, resolve the preprocessing (the artifact's own, with overrides), run
:func:`dsdeploy.recover.reconstruct.calibrate_data` or :func:`dsdeploy.recover.finetune.finetune`,
and write the result (with its history entry) to a new artifact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from dsdeploy.conversion.artifact import load_artifact, load_source_model, save_artifact
from dsdeploy.data.datasets import first_item, load_data
from dsdeploy.data.labels import check_outputs, output_count
from dsdeploy.data.preprocessing import resolve
from dsdeploy.recover import distributed
from dsdeploy.recover.config import (
    CALIB_BATCHES,
    CALIB_CACHE_MB,
    CALIB_EVAL_IMAGES,
    CALIB_ROUNDS,
    CalibrationParams,
    FinetuneConfig,
    FinetuneResult,
)
from dsdeploy.recover.device import Precision, resolve_device
from dsdeploy.recover.distill import load_teacher
from dsdeploy.recover.distributed import Team
from dsdeploy.recover.finetune import finetune
from dsdeploy.recover.reconstruct import CalibrationReport, calibrate_data
from dsdeploy.recover.resume import run_identity


def calibrate_artifact(artifact_path: str, data: str, out: str, *, max_batches: int | None = CALIB_BATCHES,
                       batch_size: int = 64, seed: int = 0, ridge: float = 1e-6, progress: bool = True,
                       preprocess: dict[str, Any] | None = None, val_split: float = 0.2,
                       limit: int | None = None, trust_code: bool = False, rounds: int = CALIB_ROUNDS,
                       cache_mb: float | str = CALIB_CACHE_MB, block_reconstruct: float | str | None = None,
                       eval_images: int = CALIB_EVAL_IMAGES, device: str = "auto",
                       workers: int | None = None) -> CalibrationReport:
    """``dsdeploy calibrate``: load a .dsd, calibrate it against its source model, write ``out``.

    The preprocessing is :func:`dsdeploy.data.preprocessing.resolve` of the artifact's recorded
    preprocessing and input shape with ``preprocess`` overrides; ``out`` records what was used.
    ``trust_code``: import the ``pkg.module:factory`` the artifact records (see :mod:`dsdeploy.models.trust`).
    ``rounds``, ``cache_mb``: as in :func:`calibrate`; ``eval_images``: as in :func:`calibrate_data`.
    ``block_reconstruct``: seconds or a duration (``"90s"``) of block reconstruction afterwards (None/0: off).
    ``device``: as in :func:`calibrate`; the artifact written holds float32 CPU tensors whatever the device.
    """
    params = CalibrationParams(ridge=ridge, max_batches=max_batches, batch_size=batch_size, rounds=rounds,
                               cache_mb=cache_mb, block_reconstruct=block_reconstruct, eval_images=eval_images,
                               device=device)
    resolve_device(device, "calibrate.device")  # before any loading: an absent device is refused at once
    art = load_artifact(artifact_path, trust_code=trust_code)
    teacher = load_source_model(art)
    pre = resolve(art.metadata.get("preprocessing"), art.metadata.get("input_shape"), preprocess, data=data,
                  model=teacher)
    report = calibrate_data(art.model, teacher, art.plan, data, pre, max_batches=max_batches, seed=seed,
                            batch_size=batch_size, ridge=ridge, progress=progress, val_split=val_split, limit=limit,
                            labels=art.metadata.get("labels"), rounds=rounds, cache_mb=cache_mb,
                            block_reconstruct=params.block_reconstruct, eval_images=eval_images, device=device,
                            workers=workers)
    save_artifact(out, art.model, art.plan, art.source, {**art.metadata, "preprocessing": pre.to_dict()},
                  art.history + [report.history_entry(data=data, seed=seed)])
    return report


def finetune_artifact(student_path: str | Path, data: str, out: str | Path, config: FinetuneConfig, *,
                      teacher: str | None = None, teacher_weights: str | None = None, resume: bool = False,
                      limit: int | None = None, preprocess: dict[str, Any] | None = None,
                      val_split: float = 0.2, trust_code: bool = False) -> FinetuneResult:
    """``dsdeploy finetune``: fine-tune a .dsd against its source model (or ``teacher``); write the best to ``out``.

    ``out`` is rewritten whenever a trained epoch becomes the best, and written at the end with the
    model returned (the input itself when no epoch beat it: ``result.kept_input``).
    ``config.time_budget`` counts from this call's start: loading the artifact, teacher and data
    (``decode_seconds``), the evaluations and the training steps all count against it.
    The checkpoint records the digests of the student, data, split, teacher and the resolved
    preprocessing (size, resize, mean, std, channels); ``resume`` with
    any of them changed raises CheckpointError naming what differs.
    Data: ``load_data(data, val_split=, seed=config.seed, limit=)`` preprocessed per
    :func:`dsdeploy.data.preprocessing.resolve` (the artifact's own, ``preprocess`` overrides), labels
    mapped to the artifact's recorded labels by name; more data classes than outputs is a DataError.
    ``trust_code``: import the ``pkg.module:factory`` the artifact (or a ``.dsd`` teacher) records.
    ``config.nproc`` > 1 (outside a launcher): runs in that many data-parallel worker processes
    (:func:`dsdeploy.recover.launch.launch`) and returns rank 0's result; under a launcher
    (``WORLD_SIZE`` > 1) this process is one rank and only rank 0 writes ``out``.
    """
    config.validate()
    Precision(resolve_device(config.device, "finetune.device"), config.precision, "finetune.precision")  # fail fast
    if config.nproc > 1 and not distributed.launched():
        from dsdeploy.recover.launch import launch

        Team(world=config.nproc).split_batch(config.batch_size)  # refused here, before any process starts
        return launch(config.nproc, finetune_artifact, student_path=student_path, data=data, out=out, config=config,
                      teacher=teacher, teacher_weights=teacher_weights, resume=resume, limit=limit,
                      preprocess=preprocess, val_split=val_split, trust_code=trust_code)
    team = distributed.team()
    try:
        return _finetune_artifact(student_path, data, out, config, teacher, teacher_weights, resume, limit,
                                  preprocess, val_split, trust_code, team)
    finally:
        team.close()


def _finetune_artifact(student_path, data: str, out, config: FinetuneConfig, teacher, teacher_weights, resume: bool,
                       limit, preprocess, val_split: float, trust_code: bool, team: Team) -> FinetuneResult:
    started = time.perf_counter()
    art = load_artifact(student_path, trust_code=trust_code)
    teacher_model = load_teacher(art, teacher, teacher_weights, trust_code=trust_code)
    pre = resolve(art.metadata.get("preprocessing"), art.metadata.get("input_shape"), preprocess, data=data,
                  model=art.model, augment=config.augment)
    identity = run_identity(student=student_path, data=data, limit=limit, val_split=val_split, teacher=teacher,
                            teacher_weights=teacher_weights, preprocessing=pre.to_dict())
    t_data = time.perf_counter()
    splits = load_data(data, pre, seed=config.seed, labelled=False, limit=limit, val_split=val_split,
                       model_labels=art.metadata.get("labels"))
    for split in (splits.train, splits.val):
        if split is not None:
            len(split)  # decodes the images (into memory when they fit): data preparation, not training
    decode_s = time.perf_counter() - t_data
    if splits.classes and splits.train is not None and len(splits.train):
        check_outputs(splits.classes, output_count(art.model, first_item(splits.train)[0][None]), f"{student_path}")
    art.metadata = {**art.metadata, "preprocessing": pre.to_dict()}  # what the model was trained with

    def entry(res: FinetuneResult | None, record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        info = res.history_entry(config, data=data) if res else {"stage": "finetune", "data": data,
                                                                  "best_epoch": record["epoch"],
                                                                  "best_accuracy": record["val_acc"]}
        return art.history + [info]

    def save(model: nn.Module, history: list[dict[str, Any]]) -> None:
        save_artifact(out, model, art.plan, art.source, art.metadata, history)

    result = finetune(art.model, teacher_model, splits, config, out_path=out, resume=resume,
                      on_best=lambda model, record: save(model, entry(None, record)), started=started,
                      identity=identity, decode_seconds=decode_s, team=team)
    result.split = splits.split
    if team.main:
        save(art.model, entry(result))
    team.barrier()
    return result
