"""One trainer for the old model, the independent model phi* and every compatible new model.

Plain DDP as torchvision's reference scripts: torchrun sets the ranks, a DistributedSampler shards the
list, SGD + MultiStepLR per epoch. The loss is L_cls (+ COMP_LOSS.WEIGHT x compatibility term, and one more
per model of OLD_MODEL.EARLIER_WEIGHTS). Each epoch ends with an atomic ``last.pth``, so a killed run loses at
most the epoch in progress.

Every input (data, models, old checkpoint, meta, evaluation set, the checkpoint to resume and OUTPUT
itself) is checked before the first file is written: a refused run leaves OUTPUT as it found it.
"""

import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from advbct import distributed as dist
from advbct.config import flat_config, save_config
from advbct.data.workers import resolve_num_workers
from advbct.engine.builders import (build_compatibility, build_earlier_compatibility, build_new_model, build_teacher,
                                    build_train_dataset)
from advbct.engine.precision import autocast_context, memory_format, resolve_amp
from advbct.engine.sync_bn import convert_sync_batchnorm
from advbct.errors import NonFiniteLossError, UserError
from advbct.io import is_temporary
from advbct.models import load_checkpoint, save_checkpoint

LAST = "last.pth"
FINAL = "final.pth"
CONFIG = "config.yaml"
LOG = "log.txt"
TB = "tb"
EPOCH_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pth$")
RELEASE_GLOBAL_BATCH = 4 * 256  # the release's recipe: 4 GPUs x 256 images
RESUMABLE_PARTS = ("model", "optimizer", "scheduler", "rng", "epoch", "config")  # what _state writes

# The config keys a resumed run may set otherwise than the checkpoint it continues (``.*``: a whole
# section): how long to train (TRAIN.EPOCHS; the LR milestones stay as saved), how often to log, save and
# evaluate, the evaluation itself, where to write, where the images are read from (DATA.ROOT: a copy on the
# compute node; the list stays the same), how to compute (precision, memory layout, decoding, loader
# workers), and the sections the training never reads (TRANSFORM: fitted after it; GENERATIONS: the chain's
# evaluation). Every other key changes the training itself: a resume that sets one otherwise is refused.
RESUME_MAY_CHANGE = ("OUTPUT", "TRAIN.RESUME", "TRAIN.OVERWRITE", "TRAIN.EPOCHS", "TRAIN.PRINT_FREQ",
                     "TRAIN.SAVE_FREQ", "TRAIN.EVAL_FREQ", "TRAIN.AMP", "TRAIN.CHANNELS_LAST", "DATA.ROOT",
                     "DATA.DECODE", "DATA.NUM_WORKERS", "EVAL.*", "NEW_MODEL.*", "TRANSFORM.*", "GENERATIONS.*")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


class _HeldRecords(logging.Handler):
    """Keeps the records logged before OUTPUT may be written, for log.txt once it is opened."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def setup_logger(rank):
    """The ``advbct`` logger: the console at once; on rank 0 also log.txt, whose records are held until
    :func:`open_log_file` (nothing is written into OUTPUT before every input is checked)."""
    logger = logging.getLogger("advbct")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    sh = logging.StreamHandler()
    sh.setFormatter(LOG_FORMAT)
    logger.addHandler(sh)
    if rank == 0:
        logger.addHandler(_HeldRecords())
    return logger


def open_log_file(logger, output_dir):
    """Append ``logger``'s records to ``output_dir``/log.txt from now on, those held so far first."""
    fh = logging.FileHandler(os.path.join(output_dir, LOG))
    fh.setFormatter(LOG_FORMAT)
    for handler in list(logger.handlers):
        if isinstance(handler, _HeldRecords):
            logger.removeHandler(handler)
            for record in handler.records:
                fh.handle(record)
    logger.addHandler(fh)


def run_files(folder):
    """The checkpoints of a run in ``folder`` (last.pth, final.pth, epoch_N.pth by N); [] when none."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    epochs = sorted((int(m.group(1)), n) for n in names if (m := EPOCH_CHECKPOINT.match(n)))
    return [n for n in (LAST, FINAL) if n in names] + [n for _, n in epochs]


def _either(names):
    """``a``, ``a or b``, ``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _listed(names, most=4):
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def read_resumable(path):
    """The checkpoint at ``path`` if it can continue a run (what ``Trainer._state`` writes); a UserError
    naming what it lacks and the files of its folder that can, otherwise (e.g. a weights-only final.pth)."""
    state = load_checkpoint(path)
    missing = [k for k in RESUMABLE_PARTS if k not in state]
    if not missing:
        return state
    what = "weights only; " if "model" in state else ""
    folder = os.path.dirname(os.path.abspath(path))
    usable = [n for n in run_files(folder) if n != FINAL and not os.path.samefile(os.path.join(folder, n), path)]
    hint = (f"resume from {_either(usable)} in its folder" if usable
            else "its folder holds no last.pth or epoch_N.pth to resume from")
    raise UserError(f"{path}: not a resumable checkpoint ({what}it lacks {', '.join(missing)}): {hint}")


def may_change_on_resume(key):
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUME_MAY_CHANGE)


def _shown(value):
    """A config value as on the command line (``true``, ``''``, ``[5, 10]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "''" if value == "" else str(value)


def periodic_eval_set(cfg):
    """The test set of TRAIN.EVAL_FREQ's evaluations (one, EVAL.DATASET at EVAL.ROOT), or None when off."""
    if not cfg.TRAIN.EVAL_FREQ:
        return None
    from advbct.evaluation.evaluate import evaluation_jobs
    from advbct.evaluation.protocol import load_test_set
    if len(evaluation_jobs(cfg)) > 1:  # also rejects unknown names, as scripts/test.sh does
        raise UserError(f"EVAL.DATASET '{cfg.EVAL.DATASET}': the evaluation during training (TRAIN.EVAL_FREQ) "
                        f"takes one test set")
    return load_test_set(cfg.EVAL.DATASET, cfg.EVAL.ROOT, cfg.EVAL.GLDV2_SPLIT)


@dataclass
class EarlierTerm:
    """The compatibility term against one model of OLD_MODEL.EARLIER_WEIGHTS: that frozen model, its loss and
    the loss as the step calls it (under DDP when it has learnable parts)."""

    old_model: torch.nn.Module
    loss: torch.nn.Module
    ddp: torch.nn.Module


def loss_aux(loss, out, images, teacher):
    """What the compatibility ``loss`` reads besides the embeddings (CompatibilityLoss.aux_inputs): the new
    model's ``branch`` from its outputs ``out``, the frozen ``teacher``'s embeddings of ``images``; None for none."""
    names = loss.aux_inputs
    aux = {"branch": out["branch"].float()} if "branch" in names else {}
    if "teacher" in names:
        with torch.no_grad():
            aux["teacher"] = teacher.embed(images).float()
    return aux or None


class Trainer:
    """Builds everything from a resolved config, then ``fit()``; ``fit`` returns the final metrics."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.device = dist.init_distributed()
        self.log = setup_logger(self.rank)  # log.txt gets these lines once OUTPUT may be written
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed-size batches: the fastest kernels, tuned once
        # TRAIN.AMP auto becomes the precision used here, which config.yaml and the checkpoints record
        cfg.TRAIN.AMP, note = resolve_amp(cfg.TRAIN.AMP, self.device)
        if note:
            self.log.info(note)
        # rank 0's OUTPUT and checkpoint decide for every rank: the others may not see its filesystem
        self.resume_path, state = dist.run_on_main(self._inspect_output)
        if state is not None:
            self._adopt_config(state)
        seed_everything(cfg.SEED)

        num_classes = cfg.MODEL.NUM_CLASSES or None
        self.dataset, labels = build_train_dataset(cfg, self.device, num_classes=num_classes)
        self.num_classes = num_classes or int(labels.max()) + 1
        t = cfg.TRAIN
        if min(t.BATCH_SIZE, t.EPOCHS, t.SAVE_FREQ, t.PRINT_FREQ) <= 0 or t.EVAL_FREQ < 0:
            raise UserError("TRAIN.BATCH_SIZE, TRAIN.EPOCHS, TRAIN.SAVE_FREQ and TRAIN.PRINT_FREQ must be positive, "
                            "TRAIN.EVAL_FREQ 0 (off) or positive")
        self.sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank,
                                          shuffle=True, seed=cfg.SEED, drop_last=False)
        workers = resolve_num_workers(cfg.DATA.NUM_WORKERS, "DATA.NUM_WORKERS")  # after init: knows the local ranks
        self.loader = DataLoader(self.dataset, batch_size=cfg.TRAIN.BATCH_SIZE, sampler=self.sampler,
                                 collate_fn=self.dataset.collate,
                                 num_workers=workers, drop_last=len(self.dataset) >= self.world * cfg.TRAIN.BATCH_SIZE,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        self.iters_per_epoch = len(self.loader)
        if cfg.TRAIN.MAX_ITERS_PER_EPOCH:
            self.iters_per_epoch = min(self.iters_per_epoch, cfg.TRAIN.MAX_ITERS_PER_EPOCH)

        # compatibility first: its checks (old checkpoint, meta) must fail before any heavy work
        self.teacher = build_teacher(cfg, self.device)  # BT²'s phi*; None for the other methods
        self.old_model, self.comp_loss = build_compatibility(cfg, self.num_classes, self.device)
        # OLD_MODEL.EARLIER_WEIGHTS: one more term per earlier model
        self.earlier = [EarlierTerm(m, loss, loss) for m, loss in
                        build_earlier_compatibility(cfg, self.num_classes, self.device)]
        self.eval_set = periodic_eval_set(cfg)  # read and checked now, not after the first epoch
        model = build_new_model(cfg, self.num_classes).to(self.device)
        self.memory_format = memory_format(cfg.TRAIN.CHANNELS_LAST)
        model = model.to(memory_format=self.memory_format)
        if self.old_model is not None:
            self.old_model = self.old_model.to(memory_format=self.memory_format)
        for term in self.earlier:
            term.old_model = term.old_model.to(memory_format=self.memory_format)
        if self.teacher is not None:
            self.teacher = self.teacher.to(memory_format=self.memory_format)
        if self.world > 1 and cfg.MODEL.SYNC_BN:
            # global batch statistics (also on CPU/gloo), in the loss module too: the original converts
            # its whole model, discriminator included
            model = convert_sync_batchnorm(model, self.device)
            if self.comp_loss is not None:
                self.comp_loss = convert_sync_batchnorm(self.comp_loss, self.device)
            for term in self.earlier:
                term.loss = term.ddp = convert_sync_batchnorm(term.loss, self.device)
        self.model = model
        self.ddp = self._distributed(model)
        # the loss module owns learnable parts (elastic radii, discriminator): sync them as well. Every
        # one of them takes part in every step (a batch without old-class samples gives the elastic
        # weights a zero gradient, not none), so DDP need not search the graph for unused ones.
        self.comp_ddp = self.comp_loss
        if self.comp_loss is not None and any(p.requires_grad for p in self.comp_loss.parameters()):
            self.comp_ddp = self._distributed(self.comp_loss)
        for term in self.earlier:
            if any(p.requires_grad for p in term.loss.parameters()):
                term.ddp = self._distributed(term.loss)

        params = list(model.parameters())
        for loss in [self.comp_loss] + [term.loss for term in self.earlier]:
            if loss is not None:
                params += [p for p in loss.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=t.LR, momentum=t.MOMENTUM, weight_decay=t.WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=t.LR_STEPS,
                                                              gamma=t.LR_GAMMA)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.AMP == "fp16")
        self.autocast = lambda: autocast_context(t.AMP, self.device)
        self.start_epoch = 0
        self.saved = None  # (path, epoch) of the last good checkpoint on rank 0's disk
        if state is not None:
            self._resume(state)
        kind = cfg.COMP_LOSS.TYPE or "none"
        self.log.info(f"train {cfg.MODEL.ARCH}: {len(self.dataset)} images, {self.num_classes} classes, "
                      f"world {self.world} on {self.device.type}, compatibility: {kind}")
        self._check_recipe()
        self.writer = None
        self._open_output()  # every input is checked: the first write into OUTPUT

    def _distributed(self, module):
        """``module`` under DDP on several processes (gradients reduced straight from the buckets), else itself."""
        if self.world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)

    def _check_recipe(self):
        """Name a global batch other than the release's (4 GPUs x 256): TRAIN.LR is not rescaled for it."""
        t = self.cfg.TRAIN
        if self.world * t.BATCH_SIZE != RELEASE_GLOBAL_BATCH:
            self.log.info(f"note: global batch {self.world} x {t.BATCH_SIZE} = {self.world * t.BATCH_SIZE} "
                          f"images, the release trained with {RELEASE_GLOBAL_BATCH} (4 GPUs x 256); "
                          f"TRAIN.LR {t.LR} is used as given")

    # ------------------------------------------------------------------ OUTPUT and resuming
    def _inspect_output(self):
        """Rank 0, before anything is written: refuse a run that would replace the run in OUTPUT unasked;
        ``(path, state)`` of the checkpoint to resume from, ``(None, None)`` for a fresh run."""
        out, t = self.cfg.OUTPUT, self.cfg.TRAIN
        if os.path.exists(out) and not os.path.isdir(out):
            raise UserError(f"OUTPUT {out} is a file, not a folder")
        found = _listed(run_files(out))
        if t.RESUME == "auto":
            if t.OVERWRITE:
                raise UserError(f"TRAIN.RESUME auto continues the run in {out} and TRAIN.OVERWRITE true starts "
                                f"it over: pass one of them")
            path = os.path.join(out, LAST)
            if os.path.isfile(path):
                return path, read_resumable(path)
            if found:
                raise UserError(f"OUTPUT {out} holds a run ({found}) but no {LAST} to continue from: pass "
                                f"TRAIN.RESUME {os.path.join(out, 'epoch_N.pth')} to continue from a saved epoch, "
                                f"or TRAIN.OVERWRITE true to start over")
            return None, None  # nothing to resume: a fresh run
        if t.RESUME:
            if not os.path.isfile(t.RESUME):
                raise UserError(f"TRAIN.RESUME: checkpoint not found: {t.RESUME}")
            own = os.path.join(out, LAST)
            if found and not t.OVERWRITE and not (os.path.isfile(own) and os.path.samefile(t.RESUME, own)):
                # a run is continued from its own last.pth only: another start would mix two runs' checkpoints
                raise UserError(f"OUTPUT {out} holds a run ({found}), continued from its {LAST} only, not from "
                                f"{t.RESUME}: pass TRAIN.OVERWRITE true to replace that run's checkpoints (the one "
                                f"resumed from is kept), or choose another OUTPUT")
            return t.RESUME, read_resumable(t.RESUME)
        if found and not t.OVERWRITE:
            raise UserError(f"OUTPUT {out} already holds a run ({found}): pass TRAIN.RESUME auto to continue it, "
                            f"or TRAIN.OVERWRITE true to start over (its checkpoints are then removed)")
        return None, None

    def _adopt_config(self, state):
        """A resume continues the checkpoint's run: only the keys of RESUME_MAY_CHANGE may differ from its
        config (a UserError lists the others), and this run's config takes the saved values of the rest."""
        path, cfg = self.resume_path, self.cfg
        saved, mine = flat_config(state["config"]), flat_config(cfg.to_dict())
        fixed = [k for k in mine if k in saved and not may_change_on_resume(k)]
        differ = [k for k in fixed if saved[k] != mine[k]]
        if differ:
            changes = ", ".join(f"{k} {_shown(saved[k])} -> {_shown(mine[k])}" for k in differ)
            raise UserError(f"TRAIN.RESUME {path}: this run changes keys that stay as saved on resume: {changes} "
                            f"(saved -> requested); resume with the saved values, or start a new run (another "
                            f"OUTPUT, or TRAIN.OVERWRITE true without TRAIN.RESUME)")
        epoch = int(state["epoch"])
        if cfg.TRAIN.EPOCHS < epoch:
            raise UserError(f"TRAIN.RESUME {path}: the checkpoint is at epoch {epoch}, past TRAIN.EPOCHS "
                            f"{cfg.TRAIN.EPOCHS}: set TRAIN.EPOCHS {epoch} or more")
        for key in fixed:  # equal values; the saved ones (types included) are what the run continues with
            *sections, name = key.split(".")
            node = cfg
            for section in sections:
                node = node[section]
            node[name] = saved[key]

    def _resume(self, state):
        """Load the checkpoint's model, optimizer, schedule, loss scale, loss module and RNG state."""
        path = self.resume_path
        saved_classes = state.get("num_classes")
        if saved_classes is not None and int(saved_classes) != self.num_classes:
            raise UserError(f"TRAIN.RESUME {path}: its classifier has {saved_classes} classes, this run's "
                            f"{self.num_classes} (DATA.TRAIN_LIST {self.cfg.DATA.TRAIN_LIST} changed since?)")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.comp_loss is not None and "comp_loss" in state:
                self.comp_loss.load_state_dict(state["comp_loss"])
            for term, saved in zip(self.earlier, state.get("earlier_comp_losses", [])):
                term.loss.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as exc:  # the config keys agree: a file of another kind
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"TRAIN.RESUME {path}: its state does not fit this run although its config keys "
                            f"agree ({first})") from exc
        saved_amp = state["config"].get("TRAIN", {}).get("AMP", self.cfg.TRAIN.AMP)
        if saved_amp != self.cfg.TRAIN.AMP:  # e.g. resumed on another kind of GPU under TRAIN.AMP auto
            self.log.info(f"warning: {path} trained in TRAIN.AMP {saved_amp}; the run continues in "
                          f"{self.cfg.TRAIN.AMP}")
        if state.get("scaler") and self.scaler.is_enabled():  # fp16 loss scale, carried from fp16 to fp16 only
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        self.start_epoch = int(state["epoch"])
        self.saved = (path, self.start_epoch)
        self.log.info(f"resumed from {path} at epoch {self.start_epoch}")

    def _open_output(self):
        """Rank 0, once every input is checked: create OUTPUT, remove what an earlier run left there
        (temporaries of killed writes; with TRAIN.OVERWRITE its files), then log.txt, config.yaml, tb/."""
        if self.rank != 0:
            return
        out = self.cfg.OUTPUT
        os.makedirs(out, exist_ok=True)
        replaced = self._remove_previous_run() if self.cfg.TRAIN.OVERWRITE else []
        temporaries = [n for n in os.listdir(out) if is_temporary(n) and os.path.isfile(os.path.join(out, n))]
        for name in temporaries:  # advbct.io's, of a write a kill interrupted; tb/ is tensorboard's own
            os.remove(os.path.join(out, name))
        open_log_file(self.log, out)
        if replaced:
            self.log.info(f"TRAIN.OVERWRITE: removed the previous run's {_listed(replaced)} from {out}")
        if temporaries:
            self.log.info(f"removed {len(temporaries)} temporary file(s) of interrupted writes from {out}")
        save_config(self.cfg, os.path.join(out, CONFIG))
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(out, TB))

    def _remove_previous_run(self):
        """TRAIN.OVERWRITE: remove the checkpoints, log.txt and tensorboard events of the run in OUTPUT (not
        the checkpoint this run resumes from); the names removed."""
        out = self.cfg.OUTPUT
        keep = os.path.abspath(self.resume_path) if self.resume_path else None
        names = [n for n in run_files(out) + [LOG] if os.path.abspath(os.path.join(out, n)) != keep]
        tb = os.path.join(out, TB)
        events = sorted(os.path.join(TB, n) for n in (os.listdir(tb) if os.path.isdir(tb) else ())
                        if n.startswith("events.out.tfevents."))
        removed = []
        for name in names + events:
            path = os.path.join(out, name)
            if os.path.isfile(path):
                os.remove(path)
                removed.append(name)
        return removed

    # ------------------------------------------------------------------ checkpoints
    def _state(self, epoch):
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": epoch, "config": self.cfg.to_dict(), "num_classes": self.num_classes,
                 "rng": torch.get_rng_state()}
        if self.comp_loss is not None:
            state["comp_loss"] = self.comp_loss.state_dict()
        if self.earlier:
            state["earlier_comp_losses"] = [term.loss.state_dict() for term in self.earlier]
        return state

    def _checkpoint_names(self, epoch):
        """The checkpoints of the end of ``epoch`` in the order written: epoch_N.pth (every TRAIN.SAVE_FREQ
        epochs), last.pth, final.pth (last epoch). A kill between two writes loses none: a resume redoes
        the epoch while its last.pth is missing, and writes a missing final.pth."""
        t = self.cfg.TRAIN
        return ([f"epoch_{epoch}.pth"] if epoch % t.SAVE_FREQ == 0 else []) + [LAST] + \
            ([FINAL] if epoch == t.EPOCHS else [])

    def _save(self, epoch):
        if self.rank == 0:
            self._write(epoch, self._checkpoint_names(epoch))

    def _write(self, epoch, names):
        state = None
        for name in names:
            path = os.path.join(self.cfg.OUTPUT, name)
            if name == FINAL:  # the weights alone: what evaluation and the next model read
                save_checkpoint(path, {"model": self.model.state_dict(), "epoch": epoch,
                                       "config": self.cfg.to_dict(), "num_classes": self.num_classes})
            else:
                state = state or self._state(epoch)
                save_checkpoint(path, state)

    def _complete_resumed_epoch(self):
        """Rank 0, resumed from OUTPUT's own last.pth: write the checkpoints of that epoch still missing
        (final.pth, when a kill came between last.pth and it)."""
        out = self.cfg.OUTPUT
        own = os.path.join(out, LAST)
        if self.rank != 0 or not self.start_epoch or not os.path.isfile(own) \
                or not os.path.samefile(self.resume_path, own):
            return
        self._write(self.start_epoch, [n for n in self._checkpoint_names(self.start_epoch)
                                       if not os.path.isfile(os.path.join(out, n))])

    # ------------------------------------------------------------------ training
    def _step(self, images, labels, epoch, progress):
        with self.autocast():
            out = self.ddp(images, labels)
            logits = out["logits"].float()
            cls_loss = F.cross_entropy(logits, labels)
            terms = {"cls": cls_loss.detach()}
            total = cls_loss
            if self.comp_loss is not None:
                feat_old = None  # BCT, LCE, UniBCT read only the old classifier / class meta: no old forward
                if self.comp_loss.needs_old_features:
                    with torch.no_grad():
                        feat_old = self.old_model.embed(images).float()
                cls_w = self.model.classifier.weight if self.model.classifier is not None else None
                aux = loss_aux(self.comp_loss, out, images, self.teacher)  # the same for every term: one method
                comp = self.comp_ddp(out["feat"].float(), feat_old, labels, new_classifier_weight=cls_w,
                                     progress=progress, epoch=epoch, aux=aux)
                total = total + comp["loss"]
                terms.update({k: v for k, v in comp.items() if k != "loss"})
                terms["comp"] = comp["loss"].detach()
                for j, term in enumerate(self.earlier, 1):  # oldest first: earlier1_*
                    feat_j = None
                    if term.loss.needs_old_features:
                        with torch.no_grad():
                            feat_j = term.old_model.embed(images).float()
                    comp = term.ddp(out["feat"].float(), feat_j, labels, new_classifier_weight=cls_w,
                                    progress=progress, epoch=epoch, aux=aux)
                    total = total + comp["loss"]
                    terms.update({f"earlier{j}_{k}": v for k, v in comp.items() if k != "loss"})
                    terms[f"earlier{j}_comp"] = comp["loss"].detach()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        terms["total"] = total.detach()
        return terms

    def _check_finite(self, value, epoch, it):
        if not math.isfinite(value):
            if self.saved:
                kept = f"the last good checkpoint is {self.saved[0]} (epoch {self.saved[1]})"
            else:
                kept = "no checkpoint was written"
            hint = "lower TRAIN.LR" + (" or use TRAIN.AMP none" if self.cfg.TRAIN.AMP != "none" else "")
            raise NonFiniteLossError(f"non-finite loss ({value}) at epoch {epoch + 1}, iteration {it + 1}: "
                                     f"training stopped; {kept}; {hint}")

    def train_epoch(self, epoch):
        self.model.train()
        for loss in [self.comp_loss] + [term.loss for term in self.earlier]:
            if loss is not None:
                loss.train()
        self.sampler.set_epoch(epoch)
        total_steps = self.cfg.TRAIN.EPOCHS * self.iters_per_epoch
        sums, count = {}, 0
        bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{self.cfg.TRAIN.EPOCHS}",
                   disable=self.rank != 0, leave=False, dynamic_ncols=True)
        try:  # close the bar on errors too, so that a one-line error message starts on its own line
            for it, (images, labels, _) in enumerate(self.loader):
                if it >= self.iters_per_epoch:
                    break
                images = self.dataset.to_device(images, self.device, self.memory_format)
                labels = labels.to(self.device, non_blocking=True)
                step = epoch * self.iters_per_epoch + it
                terms = self._step(images, labels, epoch, step / max(total_steps, 1))
                for k, v in terms.items():  # device-side running sums: no host sync per step
                    sums[k] = sums.get(k, 0.0) + v.float()
                count += 1
                if (it + 1) % self.cfg.TRAIN.PRINT_FREQ == 0 or it + 1 == self.iters_per_epoch:
                    now = {k: float(v) for k, v in terms.items()}
                    self._check_finite(now["total"], epoch, it)
                    bar.set_postfix(loss=f"{now['total']:.3f}")
                    if self.writer is not None:
                        for k, v in now.items():
                            self.writer.add_scalar(f"train/{k}", v, step)
                        self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
                bar.update(1)
        finally:
            bar.close()
        means = dist.mean_over_ranks({k: v / max(count, 1) for k, v in sums.items()})
        self._check_finite(means.get("total", 0.0), epoch, count - 1)
        return means

    def fit(self):
        cfg = self.cfg
        history = []
        self._complete_resumed_epoch()
        for epoch in range(self.start_epoch, cfg.TRAIN.EPOCHS):
            t0 = time.time()
            means = self.train_epoch(epoch)
            self.scheduler.step()
            self._save(epoch + 1)
            self.saved = (os.path.join(cfg.OUTPUT, LAST), epoch + 1)
            dist.barrier()
            msg = " ".join(f"{k} {v:.4f}" for k, v in sorted(means.items()))
            self.log.info(f"epoch {epoch + 1}/{cfg.TRAIN.EPOCHS} ({time.time() - t0:.1f}s): {msg}")
            history.append(means)
            if cfg.TRAIN.EVAL_FREQ and (epoch + 1) % cfg.TRAIN.EVAL_FREQ == 0:
                self.periodic_eval(epoch + 1)
        if self.writer is not None:
            self.writer.close()
        return history

    def periodic_eval(self, epoch):
        """Self-test (and cross-test when there is an old model) on EVAL.DATASET, logged to tensorboard."""
        from advbct.evaluation.protocol import evaluate_models, headline
        cfg = self.cfg
        result = evaluate_models(self.model, self.old_model, cfg, progress=False, test_set=self.eval_set)
        if self.writer is not None:
            for name, value in headline(result).items():
                self.writer.add_scalar(f"eval/{name}", value, epoch)
        self.log.info(f"eval epoch {epoch}: " + " ".join(f"{k} {v:.2f}" for k, v in headline(result).items()))
