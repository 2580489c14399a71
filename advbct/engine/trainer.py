"""One trainer for the old model, the independent model phi* and every compatible new model.

Plain DDP as torchvision's reference scripts: torchrun sets the ranks, a DistributedSampler shards the
list, SGD + MultiStepLR per epoch. The loss is L_cls (+ COMP_LOSS.WEIGHT x compatibility term). Each
epoch ends with an atomic ``last.pth``, so a killed run loses at most the epoch in progress.
"""

import logging
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from advbct import distributed as dist
from advbct.config import save_config
from advbct.data.workers import resolve_num_workers
from advbct.engine.builders import build_compatibility, build_new_model, build_train_dataset
from advbct.engine.precision import autocast_context, memory_format, resolve_amp
from advbct.engine.sync_bn import convert_sync_batchnorm
from advbct.errors import NonFiniteLossError, UserError
from advbct.models import load_checkpoint, save_checkpoint

LAST = "last.pth"
FINAL = "final.pth"
RELEASE_GLOBAL_BATCH = 4 * 256  # the release's recipe: 4 GPUs x 256 images


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logger(output_dir, rank):
    logger = logging.getLogger("advbct")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if rank == 0:
        fh = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    sh = logging.StreamHandler()
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    return logger


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


class Trainer:
    """Builds everything from a resolved config, then ``fit()``; ``fit`` returns the final metrics."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.device = dist.init_distributed()
        os.makedirs(cfg.OUTPUT, exist_ok=True)
        self.log = setup_logger(cfg.OUTPUT, self.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed-size batches: the fastest kernels, tuned once
        # TRAIN.AMP auto becomes the precision used here, which config.yaml and the checkpoints record
        cfg.TRAIN.AMP, note = resolve_amp(cfg.TRAIN.AMP, self.device)
        if note:
            self.log.info(note)
        if self.rank == 0:
            save_config(cfg, os.path.join(cfg.OUTPUT, "config.yaml"))
        seed_everything(cfg.SEED)

        num_classes = cfg.MODEL.NUM_CLASSES or None
        self.dataset, labels = build_train_dataset(cfg, self.device, num_classes=num_classes)
        self.num_classes = num_classes or int(labels.max()) + 1
        if cfg.TRAIN.BATCH_SIZE <= 0 or cfg.TRAIN.EPOCHS <= 0:
            raise UserError("TRAIN.BATCH_SIZE and TRAIN.EPOCHS must be positive")
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
        self.old_model, self.comp_loss = build_compatibility(cfg, self.num_classes, self.device)
        self.eval_set = periodic_eval_set(cfg)  # read and checked now, not after the first epoch
        model = build_new_model(cfg, self.num_classes).to(self.device)
        self.memory_format = memory_format(cfg.TRAIN.CHANNELS_LAST)
        model = model.to(memory_format=self.memory_format)
        if self.old_model is not None:
            self.old_model = self.old_model.to(memory_format=self.memory_format)
        if self.world > 1 and cfg.MODEL.SYNC_BN:
            # global batch statistics (also on CPU/gloo), in the loss module too: the original converts
            # its whole model, discriminator included
            model = convert_sync_batchnorm(model, self.device)
            if self.comp_loss is not None:
                self.comp_loss = convert_sync_batchnorm(self.comp_loss, self.device)
        self.model = model
        self.ddp = self._distributed(model)
        # the loss module owns learnable parts (elastic radii, discriminator): sync them as well. Every
        # one of them takes part in every step (a batch without old-class samples gives the elastic
        # weights a zero gradient, not none), so DDP need not search the graph for unused ones.
        self.comp_ddp = self.comp_loss
        if self.comp_loss is not None and any(p.requires_grad for p in self.comp_loss.parameters()):
            self.comp_ddp = self._distributed(self.comp_loss)

        params = list(model.parameters())
        if self.comp_loss is not None:
            params += [p for p in self.comp_loss.parameters() if p.requires_grad]
        t = cfg.TRAIN
        self.optimizer = torch.optim.SGD(params, lr=t.LR, momentum=t.MOMENTUM, weight_decay=t.WEIGHT_DECAY)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=t.LR_STEPS,
                                                              gamma=t.LR_GAMMA)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.AMP == "fp16")
        self.autocast = lambda: autocast_context(t.AMP, self.device)
        self.start_epoch = 0
        self._resume()
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(cfg.OUTPUT, "tb"))
        kind = cfg.COMP_LOSS.TYPE or "none"
        self.log.info(f"train {cfg.MODEL.ARCH}: {len(self.dataset)} images, {self.num_classes} classes, "
                      f"world {self.world} on {self.device.type}, compatibility: {kind}")
        self._check_recipe()

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

    # ------------------------------------------------------------------ checkpoints
    def _state(self, epoch):
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": epoch, "config": self.cfg.to_dict(), "num_classes": self.num_classes,
                 "rng": torch.get_rng_state()}
        if self.comp_loss is not None:
            state["comp_loss"] = self.comp_loss.state_dict()
        return state

    def _resume(self):
        resume = self.cfg.TRAIN.RESUME
        if not resume:
            return
        path = os.path.join(self.cfg.OUTPUT, LAST) if resume == "auto" else resume

        def read():  # rank 0's file decides for every rank: the others may not see its filesystem
            if not os.path.isfile(path):
                if resume == "auto":
                    return None  # nothing to resume: a fresh run
                raise UserError(f"TRAIN.RESUME: checkpoint not found: {path}")
            return load_checkpoint(path)

        state = dist.run_on_main(read)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved_amp = state.get("config", {}).get("TRAIN", {}).get("AMP", self.cfg.TRAIN.AMP)
        if saved_amp != self.cfg.TRAIN.AMP:  # e.g. resumed on another kind of GPU under TRAIN.AMP auto
            self.log.info(f"warning: {path} trained in TRAIN.AMP {saved_amp}; the run continues in "
                          f"{self.cfg.TRAIN.AMP}")
        if state["scaler"] and self.scaler.is_enabled():  # fp16 loss scale, carried from fp16 to fp16 only
            self.scaler.load_state_dict(state["scaler"])
        if self.comp_loss is not None and "comp_loss" in state:
            self.comp_loss.load_state_dict(state["comp_loss"])
        torch.set_rng_state(state["rng"].cpu())
        self.start_epoch = int(state["epoch"])
        self.log.info(f"resumed from {path} at epoch {self.start_epoch}")

    def _save(self, epoch):
        if self.rank != 0:
            return
        out = self.cfg.OUTPUT
        state = self._state(epoch)
        save_checkpoint(os.path.join(out, LAST), state)
        if epoch % self.cfg.TRAIN.SAVE_FREQ == 0:
            save_checkpoint(os.path.join(out, f"epoch_{epoch}.pth"), state)
        if epoch == self.cfg.TRAIN.EPOCHS:
            save_checkpoint(os.path.join(out, FINAL), {"model": self.model.state_dict(), "epoch": epoch,
                                                       "config": self.cfg.to_dict(),
                                                       "num_classes": self.num_classes})

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
                comp = self.comp_ddp(out["feat"].float(), feat_old, labels, new_classifier_weight=cls_w,
                                     progress=progress, epoch=epoch)
                total = total + comp["loss"]
                terms.update({k: v for k, v in comp.items() if k != "loss"})
                terms["comp"] = comp["loss"].detach()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        terms["total"] = total.detach()
        return terms

    def _check_finite(self, value, epoch, it):
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite loss ({value}) at epoch {epoch + 1}, iteration {it + 1}: training stopped; "
                f"the last good checkpoint {os.path.join(self.cfg.OUTPUT, LAST)} is intact "
                f"(lower TRAIN.LR or use TRAIN.AMP none)")

    def train_epoch(self, epoch):
        self.model.train()
        if self.comp_loss is not None:
            self.comp_loss.train()
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
        for epoch in range(self.start_epoch, cfg.TRAIN.EPOCHS):
            t0 = time.time()
            means = self.train_epoch(epoch)
            self.scheduler.step()
            self._save(epoch + 1)
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
