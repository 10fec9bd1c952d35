"""Distillation fine-tuning of a converted model: the training loop.

One :class:`FinetuneConfig` holds every knob. The loop trains for ``epochs`` or sizes
itself to a ``time_budget`` (from the measured speed of the first steps), evaluates on
the validation split after each epoch, keeps the best weights, stops early on a
plateau, and writes an atomic checkpoint plus the per-epoch history after each epoch.
Each epoch's data order and RNG state derive from ``seed`` and the epoch number, so a
run killed at any point and resumed with ``resume=True`` ends with exactly the weights
of an uninterrupted run (on CPU).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dsdeploy.conversion.block import ds_blocks
from dsdeploy.errors import DataError
from dsdeploy.fsutil import write_json
from dsdeploy.recover.config import FinetuneConfig, FinetuneResult
from dsdeploy.recover.distill import (
    Distiller,
    LossWeights,
    evaluate,
    following_norms,
    fresh_parameters,
    init_parameters,
)
from dsdeploy.recover.resume import (
    SignalGuard,
    check_resumable,
    cpu_state_dict,
    interrupted,
    load_checkpoint,
    rng_state,
    run_identity,
    save_checkpoint,
    set_rng_state,
)
from dsdeploy.recover.schedule import Schedule, steps_for_budget

MEASURE_STEPS = 8


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order, augmentation and dropout."""
    return (seed * 1_000_003 + epoch) % (2 ** 63)


def _seed_epoch(dataset: Any, seed: int) -> None:
    torch.manual_seed(seed)
    if hasattr(dataset, "set_epoch_seed"):
        dataset.set_epoch_seed(seed)
    elif isinstance(getattr(dataset, "_gen", None), torch.Generator):  # dsdeploy.data.datasets.ImageDataset augmentation
        dataset._gen.manual_seed(seed)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of :func:`train_loader` (a short last batch is dropped)."""
    return max(1, n // batch_size) if n > batch_size else 1


def train_loader(dataset: Any, batch_size: int, seed: int) -> Any:
    """The shuffled training loader of one epoch (order fixed by ``seed``).

    When the split holds more than one batch, the short last batch is dropped: a batch of
    one image cannot train BatchNorm (``BatchNorm1d`` refuses it, 2d gets a zero variance).
    """
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      num_workers=0, drop_last=len(dataset) > batch_size)


def trainable_modules(student: nn.Module, mode: str, example: torch.Tensor) -> list[nn.Module]:
    """The modules trained in ``mode``: everything (full) or the DS blocks plus the norms right after them."""
    if mode == "full":
        return [student]
    norms = following_norms(student, example)
    names = list(norms) + list(norms.values())
    names += [n for n in ds_blocks(student) if n not in norms]
    return [student.get_submodule(n) for n in sorted(set(names))]


def _set_train(student: nn.Module, modules: list[nn.Module]) -> None:
    student.eval()
    for m in modules:
        m.train()


def _memory_format(cfg: FinetuneConfig, student: nn.Module, teacher: nn.Module | None,
                   fmt: torch.memory_format) -> None:
    if cfg.channels_last:
        for m in (student, teacher):
            if m is not None:
                m.to(memory_format=fmt)


def _optimizer(params: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def finetune(student: nn.Module, teacher: nn.Module | None, data: Any, config: FinetuneConfig, *,
             out_path: str | Path, resume: bool = False,
             on_best: Callable[[nn.Module, dict[str, Any]], None] | None = None,
             started: float | None = None, identity: dict[str, Any] | None = None) -> FinetuneResult:
    """Fine-tune ``student`` IN PLACE by distillation from ``teacher``; it ends holding the best weights.

    Args:
        student: the converted model.
        teacher: the original model (None: cross-entropy only; needs labels).
        data: a :class:`dsdeploy.data.datasets.DataSplits` (``train`` required; ``val`` picks the best epoch).
        config: all options.
        out_path: the output artifact path; the checkpoint (``OUT.ckpt``) and history
            (``OUT.history.json``) default to names beside it.
        resume: continue from the checkpoint (a fresh start when there is none yet).
        on_best: called with (student, epoch record) whenever the validation score improves.
        started: ``time.perf_counter()`` when the time budget's clock started (default:
            on entry), so a caller's data loading can count against the budget.
        identity: digests of the run's inputs (:func:`dsdeploy.recover.resume.run_identity`), stored
            in the checkpoint; a resume with a different identity or options is refused (None:
            the options only).

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM (exit code 130); the last completed epoch's
            checkpoint stays valid for ``resume=True``.
        CheckpointError: ``resume`` with a checkpoint of another run (inputs or options differ).
    """
    from dsdeploy.data.datasets import make_loader

    config.validate()
    t0 = time.perf_counter()
    out = Path(out_path)
    ckpt_path = Path(config.checkpoint_path or out.with_suffix(".ckpt"))
    hist_path = Path(config.history_path or out.with_suffix(".history.json"))
    if data.train is None or len(data.train) == 0:
        raise DataError("fine-tuning needs a training split with images")
    labelled = bool(data.classes)
    if teacher is None and not labelled:
        raise DataError("without a teacher, fine-tuning needs labelled data")
    val_loader = make_loader(data.val, 256, shuffle=False) if data.val is not None and labelled else None
    acc_before = evaluate(student, val_loader) if val_loader else None
    teacher_acc = evaluate(teacher, val_loader) if val_loader and teacher is not None else None
    result = FinetuneResult(acc_before, -1, 0, 0, "none", acc_before, teacher_acc, 0.0,
                            checkpoint=str(ckpt_path), history_file=str(hist_path))
    if config.mode == "none":
        result.best_epoch, result.seconds = 0, time.perf_counter() - t0
        return result

    torch.manual_seed(config.seed)
    if config.init != "none":
        init_parameters(student, fresh_parameters(student, teacher, config.reinit), config.init)
    example = next(iter(make_loader(data.train, 2, shuffle=False)))[0]
    modules = trainable_modules(student, config.mode, example)
    train_ids = {id(p) for m in modules for p in m.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in train_ids)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = _optimizer(params, config)
    spe = steps_per_epoch(len(data.train), config.batch_size)
    sched = Schedule(config.schedule, config.lr, total_steps=(config.epochs or 10 ** 6) * spe,
                     warmup_steps=round(config.warmup_epochs * spe))
    st: dict[str, Any] = {"epoch": 0, "step": 0, "best_acc": None, "best_epoch": -1, "best_state": None,
                          "bad_epochs": 0, "history": [], "elapsed": 0.0, "sized": config.time_budget is None,
                          "done": None}
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        check_resumable(ck, config.trajectory(), identity, ckpt_path)
        student.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched = Schedule(**ck["schedule"])
        st.update({k: ck[k] for k in st})
        set_rng_state(ck["rng"])
        result.resumed_from = st["epoch"]
    _memory_format(config, student, teacher, torch.channels_last)
    distiller = Distiller(student, teacher, LossWeights(config.kd_weight, config.feature_weight,
                                                        config.ce_weight, config.temperature))
    eval_images = len(data.val) if val_loader else 0
    fresh_start = started if started is not None else t0
    run_start = (time.perf_counter() - st["elapsed"]) if result.resumed_from is not None else fresh_start
    try:
        with SignalGuard() as guard:
            while st["done"] is None and st["step"] < sched.total_steps:
                record = _train_epoch(distiller, modules, params, opt, sched, data.train, st, config, guard,
                                      (spe, eval_images, run_start))
                t_eval = time.perf_counter()
                val = evaluate(student, val_loader, channels_last=config.channels_last) \
                    if val_loader and record is not None else None
                if record is None or guard.signum is not None:
                    raise interrupted(guard.signum or signal.SIGINT, st["epoch"], ckpt_path)
                record["val_acc"] = val
                record["seconds"] = round(time.perf_counter() - run_start - st["elapsed"], 3)
                st["epoch"] += 1
                st["history"].append(record)
                improved = val is None or st["best_acc"] is None or val > st["best_acc"]
                if improved:
                    st["best_acc"], st["best_epoch"], st["bad_epochs"] = val, st["epoch"], 0
                    st["best_state"] = cpu_state_dict(student)
                else:
                    st["bad_epochs"] += 1
                if config.patience and st["bad_epochs"] >= config.patience:
                    st["done"] = "early-stop"
                elif st["step"] >= sched.total_steps:
                    st["done"] = "budget" if config.time_budget else "completed"
                st["elapsed"] = time.perf_counter() - run_start
                if config.time_budget and st["done"] is None:
                    eval_s = time.perf_counter() - t_eval
                    step_s = record["train_seconds"] / max(1, record["steps"])
                    sched.total_steps = st["step"] + steps_for_budget(config.time_budget, st["elapsed"], step_s,
                                                                      spe, eval_s)
                _save(ckpt_path, student, opt, sched, st, config, identity or {})
                write_json(hist_path, st["history"])
                if improved and on_best is not None:
                    on_best(student, record)
    finally:
        distiller.close()
        _memory_format(config, student, teacher, torch.contiguous_format)
    if st["best_state"] is not None:
        student.load_state_dict(st["best_state"])
    student.eval()
    result.best_accuracy, result.best_epoch, result.epochs = st["best_acc"], st["best_epoch"], st["epoch"]
    result.steps, result.stopped, result.history = st["step"], st["done"] or "completed", st["history"]
    result.seconds = time.perf_counter() - t0
    return result


def _train_epoch(distiller: Distiller, modules, params, opt, sched: Schedule, train, st, cfg: FinetuneConfig,
                 guard: SignalGuard, timing: tuple[int, int, float]) -> dict[str, Any] | None:
    """One pass over the training data (or until the schedule/budget ends): the epoch record, None on a signal.

    ``timing`` is (steps per epoch, validation images, run start time) for budget sizing.
    """
    from tqdm import tqdm

    spe, eval_images, run_start = timing
    eval_s = 0.0

    seed = epoch_seed(cfg.seed, st["epoch"])
    _seed_epoch(train, seed)
    loader = train_loader(train, cfg.batch_size, seed)
    _set_train(distiller.student, modules)
    bar = tqdm(loader, total=min(spe, sched.total_steps - st["step"]), desc=f"epoch {st['epoch'] + 1}",
               unit="batch", disable=not cfg.progress, leave=False)
    loss_sum = correct = labelled = seen = steps = 0
    t_start = time.perf_counter()
    lr = sched.lr_at(st["step"])
    for x, y in bar:
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = sched.lr_at(st["step"])
        for g in opt.param_groups:
            g["lr"] = lr
        loss, logits, _parts = distiller(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        st["step"] += 1
        steps += 1
        n = x.shape[0]
        seen += n
        loss_sum += float(loss.detach()) * n
        mask = y >= 0
        labelled += int(mask.sum())
        correct += int((logits.detach().argmax(1)[mask] == y[mask]).sum())
        if cfg.progress:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / max(1, labelled):.3f}",
                            ips=f"{seen / (time.perf_counter() - t_start):.0f}", refresh=False)
        if guard.signum is not None:
            bar.close()
            return None
        if cfg.time_budget and steps == MEASURE_STEPS:
            step_s = (time.perf_counter() - t_start) / steps
            eval_s = step_s * eval_images / cfg.batch_size / 3  # a forward pass ~ 1/3 of a training step
            if not st["sized"]:
                st["sized"] = True
                sched.total_steps = st["step"] + steps_for_budget(cfg.time_budget, time.perf_counter() - run_start,
                                                                  step_s, spe, eval_s)
                bar.total = min(spe, sched.total_steps - st["step"] + steps)
        if st["step"] >= sched.total_steps or (cfg.time_budget and time.perf_counter() - run_start
                                               > cfg.time_budget * 0.98 - eval_s):
            sched.total_steps = min(sched.total_steps, st["step"])
            break
    bar.close()
    secs = time.perf_counter() - t_start
    return {"epoch": st["epoch"] + 1, "train_loss": loss_sum / max(1, seen),
            "train_acc": correct / labelled if labelled else None, "val_acc": None, "lr": lr,
            "images_per_s": seen / max(secs, 1e-9), "seconds": 0.0, "train_seconds": round(secs, 3),
            "steps": steps, "step": st["step"]}


def _save(path: Path, student: nn.Module, opt, sched: Schedule, st: dict[str, Any], cfg: FinetuneConfig,
          identity: dict[str, Any]) -> None:
    save_checkpoint(path, {"model": cpu_state_dict(student), "optimizer": opt.state_dict(),
                           "schedule": sched.to_dict(), "rng": rng_state(), "config": cfg.trajectory(),
                           "identity": identity, **st})


def finetune_artifact(student_path: str | Path, data: str, out: str | Path, config: FinetuneConfig, *,
                      teacher: str | None = None, teacher_weights: str | None = None, resume: bool = False,
                      limit: int | None = None, preprocess: dict[str, Any] | None = None,
                      val_split: float = 0.2, trust_code: bool = False) -> FinetuneResult:
    """``dsdeploy finetune``: fine-tune a .dsd against its source model (or ``teacher``); write the best to ``out``.

    ``out`` is rewritten whenever validation improves, so it always holds the best weights so far.
    The checkpoint records the digests of the student, data, split, teacher and the resolved
    preprocessing (size, resize, mean, std, channels); ``resume`` with
    any of them changed raises CheckpointError naming what differs.
    Data: ``load_data(data, val_split=, seed=config.seed, limit=)`` preprocessed per
    :func:`dsdeploy.data.preprocessing.resolve` (the artifact's own, ``preprocess`` overrides), labels
    mapped to the artifact's recorded labels by name; more data classes than outputs is a DataError.
    ``trust_code``: import the ``pkg.module:factory`` the artifact (or a ``.dsd`` teacher) records.
    """
    from dsdeploy.conversion.artifact import load_artifact, save_artifact
    from dsdeploy.data.datasets import load_data
    from dsdeploy.data.labels import check_outputs, output_count
    from dsdeploy.data.preprocessing import resolve
    from dsdeploy.recover.distill import load_teacher

    config.validate()
    started = time.perf_counter()
    art = load_artifact(student_path, trust_code=trust_code)
    teacher_model = load_teacher(art, teacher, teacher_weights, trust_code=trust_code)
    pre = resolve(art.metadata.get("preprocessing"), art.metadata.get("input_shape"), preprocess, data=data,
                  model=art.model, augment=config.augment)
    identity = run_identity(student=student_path, data=data, limit=limit, val_split=val_split, teacher=teacher,
                            teacher_weights=teacher_weights, preprocessing=pre.to_dict())
    splits = load_data(data, pre, seed=config.seed, labelled=False, limit=limit, val_split=val_split,
                       model_labels=art.metadata.get("labels"))
    if splits.classes and splits.train is not None and len(splits.train):
        check_outputs(splits.classes, output_count(art.model, splits.train[0][0][None]), f"{student_path}")
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
                      identity=identity)
    result.split = splits.split
    save(art.model, entry(result))
    return result
