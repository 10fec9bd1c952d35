"""Distillation fine-tuning of a converted model: the run around the training epochs.

One :class:`FinetuneConfig` holds every knob. The input model is scored first
(:mod:`dsdeploy.recover.check`: validation accuracy, or what replaces it) and is the best
so far, epoch 0; each trained epoch is scored the same way and kept only when it beats
the best, so the model returned is never worse than the input by that measure. The run
trains for ``epochs`` or sizes itself to a ``time_budget`` from the pace of the training
steps alone (:mod:`dsdeploy.recover.budget`), warms the learning rate up, stops early on a
plateau, and writes an atomic checkpoint plus the per-epoch history after each epoch.
Each epoch's data order and RNG state derive from ``seed`` and the epoch number, so a
run killed at any point and resumed with ``resume=True`` ends with exactly the weights
of an uninterrupted run (on CPU).

Under a multi-process launcher (``torchrun``, or ``nproc`` > 1: :mod:`dsdeploy.recover.launch`)
the student trains as DistributedDataParallel (:mod:`dsdeploy.recover.distributed`): rank 0
scores the models, sizes the time budget and decides what is kept, and broadcasts it; only
rank 0 writes the checkpoint, history and artifact while the others wait, and reads the
checkpoint on resume for all of them (so only rank 0's machine needs it). The checkpoint
records the number of processes, and a resume with another number is refused.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsdeploy.data.datasets import make_loader
from dsdeploy.data.loader import release_loaders
from dsdeploy.errors import ConfigError, DataError
from dsdeploy.fsutil import write_json
from dsdeploy.recover import distributed
from dsdeploy.recover.budget import Budget
from dsdeploy.recover.check import ModelCheck, model_check
from dsdeploy.recover.config import FinetuneConfig, FinetuneResult
from dsdeploy.recover.device import Precision, placed, resolve_device
from dsdeploy.recover.distill import Distiller, LossWeights, fresh_parameters, init_parameters
from dsdeploy.recover.distributed import Team
from dsdeploy.recover.epoch import (  # noqa: F401 (epoch_seed, steps_per_epoch, train_loader: public here too)
    epoch_seed,
    epoch_steps,
    make_optimizer,
    steps_per_epoch,
    train_epoch,
    train_loader,
    trainable_modules,
)
from dsdeploy.recover.resume import (
    SignalGuard,
    check_resumable,
    check_world,
    cpu_state_dict,
    interrupted,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dsdeploy.recover.schedule import Schedule

EVAL_SHARE = 0.05  # under a time budget, one evaluation may take about this share of it


def _memory_format(cfg: FinetuneConfig, student: nn.Module, teacher: nn.Module | None,
                   fmt: torch.memory_format) -> None:
    if cfg.channels_last:
        for m in (student, teacher):
            if m is not None:
                m.to(memory_format=fmt)


def _warmup_steps(cfg: FinetuneConfig, spe: int, total: int) -> int:
    """Warmup steps: ``warmup_epochs`` of an epoch (at least 1 when > 0), at most a tenth of ``total``."""
    if not cfg.warmup_epochs:
        return 0
    return min(max(1, math.ceil(cfg.warmup_epochs * spe)), max(1, total // 10))


def _prepare(data: Any) -> tuple[torch.Tensor, float]:
    """Decode what the splits still hold undecoded; (an example batch, seconds it took)."""
    t = time.perf_counter()
    if data.train is None or len(data.train) == 0:
        raise DataError("fine-tuning needs a training split with images")
    if data.val is not None:
        len(data.val)
    example = next(iter(make_loader(data.train, 2, shuffle=False)))[0]
    return example, time.perf_counter() - t


def finetune(student: nn.Module, teacher: nn.Module | None, data: Any, config: FinetuneConfig, *,
             out_path: str | Path, resume: bool = False,
             on_best: Callable[[nn.Module, dict[str, Any]], None] | None = None,
             started: float | None = None, identity: dict[str, Any] | None = None,
             decode_seconds: float = 0.0, team: Team | None = None) -> FinetuneResult:
    """Fine-tune ``student`` IN PLACE by distillation; it ends holding the best of its input and each epoch.

    The input is scored before the first step and is the best so far (epoch 0); an epoch
    replaces the best only when it scores higher, so when none does the student ends with
    its input weights, unchanged, and the result says so (``kept_input``, ``warning``).

    Args:
        student: the converted model.
        teacher: the original model (None: cross-entropy only; needs labels).
        data: a :class:`dsdeploy.data.datasets.DataSplits` (``train`` required; ``val`` picks the best
            epoch; without it a fixed subset of ``train`` does: see :mod:`dsdeploy.recover.check`).
        config: all options.
        out_path: the output artifact path; the checkpoint (``OUT.ckpt``) and history
            (``OUT.history.json``) default to names beside it.
        resume: continue from the checkpoint (a fresh start when there is none yet).
        on_best: called with (student, epoch record) whenever a trained epoch becomes the best.
        started: ``time.perf_counter()`` when the time budget's clock started (default: on
            entry), so a caller's model and data loading count against the budget.
        identity: digests of the run's inputs (:func:`dsdeploy.recover.resume.run_identity`), stored
            in the checkpoint; a resume with a different identity or options is refused (None:
            the options only).
        decode_seconds: data preparation the caller already did (added to ``decode_seconds``).
        team: the processes training together (default: joins the launcher's process group when
            ``WORLD_SIZE`` > 1, else this process alone). Every rank returns the same result and
            ends holding the same weights; ``on_best`` and the checkpoint/history writes happen on
            rank 0 only.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM (exit code 130); the last completed epoch's
            checkpoint stays valid for ``resume=True``.
        CheckpointError: ``resume`` with a checkpoint of another run (inputs or options differ)
            or of an older format.
        DataError: no training images, or no teacher and no labels.
        ConfigError: ``config.nproc`` > 1 outside a launcher (this function trains in-memory models:
            use :func:`dsdeploy.recover.artifact_steps.finetune_artifact`, or start the processes with torchrun); a batch size the
            processes do not divide.
    """
    config.validate()
    if team is None and config.nproc > 1 and not distributed.launched():
        raise ConfigError("finetune.nproc > 1 starts worker processes, which load the student and data from "
                          "files: fine-tune a .dsd path (finetune_artifact), or start this code with torchrun")
    own = team is None
    team = team or distributed.team()
    try:
        return _finetune(student, teacher, data, config, out_path, resume, on_best, started, identity,
                         decode_seconds, team)
    finally:
        if own:
            team.close()


def _finetune(student, teacher, data, config: FinetuneConfig, out_path, resume: bool, on_best, started,
              identity, decode_seconds: float, team: Team) -> FinetuneResult:
    device = resolve_device(config.device, "finetune.device")
    amp = Precision(device, config.precision, "finetune.precision")
    clock = started if started is not None else time.perf_counter()
    out = Path(out_path)
    ckpt_path = Path(config.checkpoint_path or out.with_suffix(".ckpt"))
    hist_path = Path(config.history_path or out.with_suffix(".history.json"))
    example, prep_s = _prepare(data)
    labelled = bool(data.classes)
    if teacher is None and not labelled:
        raise DataError("without a teacher, fine-tuning needs labelled data")
    check = model_check(data, teacher, labelled)
    ck = team.on_main(lambda: load_checkpoint(ckpt_path) if ckpt_path.is_file() else None) if resume else None
    if ck is not None:
        check_resumable(ck, config.trajectory(), identity, ckpt_path)
        check_world(ck, team.world, ckpt_path)
    _memory_format(config, student, teacher, torch.channels_last)
    try:
        with placed(device, student, teacher):  # each model goes back where it was (fp32: autocast keeps params so)
            return _run(student, teacher, data, config, check, ck, example.to(device), (ckpt_path, hist_path),
                        {"clock": clock, "decode": decode_seconds + prep_s, "identity": identity or {}, "amp": amp,
                         "team": team}, on_best if team.main else None)
    finally:
        _memory_format(config, student, teacher, torch.contiguous_format)
        release_loaders(data.train)  # worker processes end now, not at a garbage collection (5 s each)


def _run(student, teacher, data, config: FinetuneConfig, check: ModelCheck, ck: dict[str, Any] | None,
         example: torch.Tensor, paths: tuple[Path, Path], run: dict[str, Any],
         on_best: Callable | None) -> FinetuneResult:
    ckpt_path, hist_path = paths
    cl = config.channels_last
    amp = run["amp"]
    check.precision = config.precision
    team: Team = run["team"]
    t = time.perf_counter()
    if ck is not None:  # the same images as before the interruption
        check.max_batches, check.basis = ck["check_batches"], ck["checked_on"]
    elif config.time_budget and config.mode != "none" and team.main:
        check.fit_to(student, EVAL_SHARE * config.time_budget, cl)  # each evaluation: a small share of the budget
    check.max_batches, check.basis = team.share((check.max_batches, check.basis))  # rank 0 scores; all agree
    teacher_acc = team.on_main(check.score, teacher, cl) if check.accuracy and teacher is not None else None
    st: dict[str, Any] = {"epoch": 0, "step": 0, "best_score": None, "best_epoch": 0, "best_state": None,
                          "input_score": None, "bad_epochs": 0, "history": [], "elapsed": 0.0, "done": None,
                          "times": {"decode": 0.0, "train": 0.0, "eval": 0.0}, "check_batches": check.max_batches,
                          "checked_on": check.basis}
    t_input = time.perf_counter()
    if ck is None:
        st["input_score"] = st["best_score"] = team.on_main(check.score, student, cl)
        st["best_state"] = cpu_state_dict(student)  # the input: returned unchanged when no epoch beats it
    input_eval, evals = time.perf_counter() - t_input, time.perf_counter() - t
    result = FinetuneResult(None, 0, 0, 0, "none", None, teacher_acc, 0.0, checkpoint=str(ckpt_path),
                            history_file=str(hist_path), checked_on=check.basis, time_budget=config.time_budget,
                            processes=team.world)
    if config.mode == "none":
        st["times"]["decode"], st["times"]["eval"] = run["decode"], evals
        return _finish(result, student, st, check, Budget(None, run["clock"]))

    torch.manual_seed(config.seed)
    if config.init != "none":
        init_parameters(student, fresh_parameters(student, teacher, config.reinit), config.init)
    modules = trainable_modules(student, config.mode, example)
    train_ids = {id(p) for m in modules for p in m.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in train_ids)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = make_optimizer(params, config)
    spe = epoch_steps(len(data.train), config.batch_size, team)
    cap = config.epochs * spe if config.epochs else None
    total = cap or 10 ** 6  # a time budget sizes it once the pace is known
    sched = Schedule(config.schedule, config.lr, total_steps=total,
                     warmup_steps=_warmup_steps(config, spe, total if cap else 10 * spe))
    if ck is not None:
        student.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched = Schedule(**ck["schedule"])
        st.update({k: ck[k] for k in st})
        set_rng_state(ck["rng"])
        amp.load_state_dict(ck.get("scaler"))
        result.resumed_from = st["epoch"]
    st["times"]["decode"] += run["decode"]
    st["times"]["eval"] += evals
    budget = Budget(config.time_budget, run["clock"], spent=st["elapsed"], trained=st["times"]["train"])
    budget.evaluation_took(input_eval)
    sizing = {"spe": spe, "warmup": _warmup_steps(config, spe, 10 * spe), "cap": cap}
    distiller = Distiller(student, teacher, LossWeights(config.kd_weight, config.feature_weight,
                                                        config.ce_weight, config.temperature),
                          runner=team.wrap(student))
    save_s = 0.0
    if team.share(budget.over()):  # the data and the first evaluations took the whole budget: nothing trains
        st["done"] = "budget"
    try:
        with SignalGuard() as guard:
            while st["done"] is None and st["step"] < sched.total_steps:
                record = train_epoch(distiller, modules, params, opt, sched, data.train, st, config, guard,
                                     budget, sizing, team, amp=amp)
                if record is None or team.agree(guard.signum is not None):
                    raise interrupted(guard.signum or signal.SIGINT, st["epoch"], ckpt_path)
                st["times"]["train"] += record["train_seconds"]
                t_eval = time.perf_counter()
                score = team.on_main(check.score, student, cl)
                record["score"] = score
                record["val_acc"] = score if check.accuracy else None
                st["epoch"] += 1
                st["history"].append(record)
                improved = score is not None and (st["best_score"] is None or score > st["best_score"])
                if improved:
                    st["best_score"], st["best_epoch"], st["bad_epochs"] = score, st["epoch"], 0
                    st["best_state"] = cpu_state_dict(student)
                else:
                    st["bad_epochs"] += 1
                record["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
                st["times"]["eval"] += record["eval_seconds"]
                budget.evaluation_took(record["eval_seconds"] + save_s)
                if config.time_budget and not (config.patience and st["bad_epochs"] >= config.patience):
                    budget.resize(sched, st["step"], spe, 0, sizing["warmup"], cap)
                team.follow_schedule(sched, False)  # rank 0's sizing
                if config.patience and st["bad_epochs"] >= config.patience:
                    st["done"] = "early-stop"
                elif st["step"] >= sched.total_steps:
                    st["done"] = "budget" if config.time_budget and (cap is None or st["step"] < cap) else "completed"
                record["seconds"] = round(budget.elapsed() - st["elapsed"], 3)  # this epoch's, all included
                st["elapsed"] = budget.elapsed()
                t_save = time.perf_counter()
                if team.main:
                    _save(ckpt_path, student, opt, sched, {**st, "scaler": amp.state_dict()}, config, run["identity"],
                          team.world)
                    write_json(hist_path, st["history"])
                team.barrier()
                save_s = time.perf_counter() - t_save
                if improved and on_best is not None:
                    on_best(student, record)
    finally:
        distiller.close()
    return _finish(result, student, st, check, budget)


def _finish(result: FinetuneResult, student: nn.Module, st: dict[str, Any], check: ModelCheck,
            budget: Budget) -> FinetuneResult:
    """Load the best weights into ``student`` and fill ``result`` (scores, verdict, warning, times)."""
    if st["best_state"] is not None:
        student.load_state_dict(st["best_state"])
    student.eval()
    hist, before, best = st["history"], st["input_score"], st["best_score"]
    result.score_before, result.best_score = before, best
    result.accuracy_before = before if check.accuracy else None
    result.best_accuracy = best if check.accuracy else None
    result.best_epoch, result.epochs, result.steps = st["best_epoch"], st["epoch"], st["step"]
    result.stopped = st["done"] or ("completed" if hist else "none")
    result.history = hist
    last = hist[-1].get("score") if hist else None
    result.kept_input = bool(hist) and st["best_epoch"] == 0
    result.worse_than_input = last is not None and before is not None and last < before
    show = check.describe
    if not hist and result.stopped == "budget":
        result.kept_input = True
        result.warning = (f"the time budget was spent before training could start (data {st['times']['decode']:.0f}s, "
                          f"evaluation {st['times']['eval']:.0f}s): the input model is returned unchanged")
    elif before is None and hist:
        result.warning = f"the model could not be checked ({check.basis} gave no score): the last epoch is returned"
    elif result.kept_input:
        trained = max((h["score"] for h in hist if h.get("score") is not None), default=None)
        result.warning = (f"fine-tuning did not improve on the input ({check.basis}: input {show(before)}, best "
                          f"epoch {show(trained)}); the input model is returned unchanged")
    elif result.worse_than_input:
        result.warning = (f"the last epoch is worse than the input ({check.basis}: {show(last)} vs "
                          f"{show(before)}); epoch {st['best_epoch']} ({show(best)}) is returned")
    times = st["times"]
    result.decode_seconds, result.train_seconds, result.eval_seconds = (round(times[k], 3) for k in
                                                                        ("decode", "train", "eval"))
    result.seconds = budget.elapsed()
    return result


def _save(path: Path, student: nn.Module, opt, sched: Schedule, st: dict[str, Any], cfg: FinetuneConfig,
          identity: dict[str, Any], world: int = 1) -> None:
    save_checkpoint(path, {"model": cpu_state_dict(student), "optimizer": opt.state_dict(),
                           "schedule": sched.to_dict(), "rng": rng_state(), "config": cfg.trajectory(),
                           "identity": identity, "world_size": world, **st})
