"""Evaluate two checkpoints (scripts/test.sh): load, check, embed, score, print, write results.json."""

import contextlib
import copy
import os

try:
    import fcntl
except ImportError:  # no flock (Windows): evaluations sharing EVAL.SAVE_DIR are not detected there
    fcntl = None

from advbct import distributed as dist
from advbct.config import save_config
from advbct.errors import UserError, one_line
from advbct.evaluation import backfill, feature_cache, test_sets
from advbct.evaluation.protocol import evaluate_models, load_test_set
from advbct.io import write_json_atomic
from advbct.losses.build import needs_transformation
from advbct.models import check_same_embedding, load_trained_model, read_checkpoint
from advbct.models.transformation import load_transformation


def format_result(result):
    """Human-readable lines: self/cross (and old self) E/M/H mAP (revisited), else the test set's headline
    (mAP@100 for GLDv2); a model evaluated alone (no OLD_MODEL.WEIGHTS) prints a plain self-test line."""
    lines = [f"== {result['dataset']} =="]
    alone = "cross_test" not in result  # one model (scripts/test_old.sh): its self-test, not a new model's
    for key, name in (("self_test", "self-test" if alone else "self-test  (new/new)"),
                      ("cross_test", "cross-test (new/old)"), ("old_self_test", "old self   (old/old)")):
        if key not in result:
            continue
        m = result[key]
        if isinstance(m.get("mAP"), dict) and {"easy", "medium", "hard"} <= set(m["mAP"]):
            e, med, h = (m["mAP"][p] for p in ("easy", "medium", "hard"))
            lines.append(f"{name}: mAP E {e:6.2f}  M {med:6.2f}  H {h:6.2f}")
        else:  # any other metric: its headline number, by the name the test set gives it
            spec = test_sets.get(result["dataset"])
            lines.append(f"{name}: {spec.metric.name} {spec.headline(m):6.2f}")
    if "backfill" in result:
        b = result["backfill"]
        pts = "  ".join(f"{r:.2f}:{v:.2f}" for r, v in zip(b["ratios"], b["values"]))
        lines.append(f"backfill ({b['metric']}): {pts}")
    return "\n".join(lines)


def evaluation_jobs(cfg):
    """One config per test set named in EVAL.DATASET, each as that set would be given alone.

    EVAL.DATASET is one name or several separated by commas (``rparis6k,roxford5k,gldv2``): several are
    evaluated in one process, the models loaded once, each set's results.json written to
    EVAL.SAVE_DIR/<dataset>/ as soon as it is scored. EVAL.ROOT is then one root for every set or one per
    set, comma-separated in the same order.
    """
    names = [n.strip() for n in cfg.EVAL.DATASET.split(",")]
    for name in names:
        test_sets.get(name, "EVAL.DATASET", "or several of them separated by commas")
    if len(set(names)) != len(names):
        raise UserError(f"EVAL.DATASET '{cfg.EVAL.DATASET}': a test set is named twice")
    if len(names) == 1:
        return [cfg]
    roots = [r.strip() for r in cfg.EVAL.ROOT.split(",")] if "," in cfg.EVAL.ROOT else [cfg.EVAL.ROOT] * len(names)
    if len(roots) != len(names):
        raise UserError(f"EVAL.ROOT: {len(roots)} roots for the {len(names)} test sets of EVAL.DATASET "
                        f"(expected one root, or one per set separated by commas)")
    jobs = []
    for name, root in zip(names, roots):
        job = copy.deepcopy(cfg)
        job.EVAL.DATASET, job.EVAL.ROOT, job.EVAL.SAVE_DIR = name, root, os.path.join(cfg.EVAL.SAVE_DIR, name)
        jobs.append(job)
    return jobs


LOCK_NAME = ".evaluation.lock"  # in each EVAL.SAVE_DIR, while an evaluation writes there


class SaveDirLock:
    """Exclusive flock on ``<dir>/.evaluation.lock`` of every directory an evaluation writes results to,
    held from before the first image is embedded to the last file written: a second evaluation into one
    of them is refused up front instead of mixing its files with the first's."""

    def __init__(self, directories):
        self.directories = list(dict.fromkeys(os.path.abspath(d) for d in directories))
        self._held, self._created = [], []

    def acquire(self):
        """Create the directories and lock each; UserError (nothing left held) when one is held elsewhere."""
        try:
            for directory in self.directories:
                self._make(directory)
                held = self._lock(directory)
                if held is not None:
                    self._held.append(held)
        except BaseException:
            self.release()
            raise

    def _make(self, directory):
        missing, top = [], directory
        while not os.path.isdir(top) and top != os.path.dirname(top):
            missing.append(top)
            top = os.path.dirname(top)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise UserError(f"EVAL.SAVE_DIR: cannot create {directory} ({one_line(str(exc))})") from None
        self._created.extend(missing)  # deepest first: removed again, when empty, by release()

    def _lock(self, directory):
        """``(fd, path)`` of the lock now held on ``directory``; None where the file system has no flock."""
        if fcntl is None:
            return None
        path = os.path.join(directory, LOCK_NAME)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise UserError(f"EVAL.SAVE_DIR {directory}: cannot write there ({one_line(str(exc))})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"EVAL.SAVE_DIR {directory}: another evaluation is writing there now "
                                f"(pid {holder})") from None
            except OSError as exc:  # e.g. a network file system without locks: go on, unguarded
                os.close(fd)
                print(f"warning: EVAL.SAVE_DIR {directory}: cannot lock {LOCK_NAME} ({one_line(str(exc))}); "
                      f"another evaluation writing there at the same time would not be detected")
                return None
            # a holder that just finished removed the file we opened: lock the one now at the path
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd, path

    def release(self):
        """Remove and unlock the lock files, then the directories acquire() created if they stayed empty."""
        for fd, path in reversed(self._held):
            with contextlib.suppress(OSError):
                os.remove(path)  # still holding the lock: a waiting opener sees another inode and retries
            os.close(fd)
        self._held = []
        for directory in sorted(self._created, key=lambda d: d.count(os.sep), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        self._created = []


def write_results(save_dir, cfg, result):
    """config.yaml then results.json, each atomically, an older results.json removed first: a results.json
    on disk always comes with the config.yaml of its own run, even after a crash in between. Its path."""
    path = os.path.join(save_dir, "results.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    save_config(cfg, os.path.join(save_dir, "config.yaml"))
    write_json_atomic(path, result)
    return path


def check_needs_transformation(cfg, new_checkpoint):
    """Refuse the cross test of a new model whose training method maps old embeddings afterwards (FCT: the
    saved COMP_LOSS.TYPE of ``new_checkpoint``, the new model's checkpoint dict, read through the method
    registry) when EVAL.OLD_TRANSFORM is empty."""
    if cfg.EVAL.OLD_TRANSFORM or not cfg.OLD_MODEL.WEIGHTS:
        return
    saved = new_checkpoint.get("config")
    comp = saved.get("COMP_LOSS") if isinstance(saved, dict) else None
    try:  # another release's config (the original's yacs one) may hold other keys and types: not a method here
        needs = isinstance(comp, dict) and needs_transformation(comp)
    except (TypeError, ValueError, UserError):
        needs = False
    if needs:
        raise UserError(f"NEW_MODEL.WEIGHTS {cfg.NEW_MODEL.WEIGHTS} was trained with COMP_LOSS.TYPE "
                        f"{comp['TYPE']}, whose cross test maps the old gallery: set EVAL.OLD_TRANSFORM "
                        f"(written by scripts/train_transformation.sh)")


def run_evaluation(cfg):
    """Everything is checked (datasets, checkpoints, embedding sizes, the transformation) before the first
    image is embedded.

    Returns the result dict of each test set of EVAL.DATASET, in order.
    """
    if cfg.EVAL.DATASET_TYPE != "landmark":
        raise UserError(f"EVAL.DATASET_TYPE: only 'landmark' is implemented, got '{cfg.EVAL.DATASET_TYPE}'")
    backfill.check_config(cfg)  # a bad EVAL.BACKFILL_* key fails here, not after the extraction
    if cfg.EVAL.OLD_TRANSFORM and not cfg.OLD_MODEL.WEIGHTS:
        raise UserError(f"EVAL.OLD_TRANSFORM {cfg.EVAL.OLD_TRANSFORM} is set but OLD_MODEL.WEIGHTS is empty: "
                        f"the transformation maps the old model's gallery")
    _, _, device = dist.init_distributed()  # first: rank 0 alone checks the test sets' images
    lock = None
    try:
        job_cfgs = evaluation_jobs(cfg)
        lock = SaveDirLock([job.EVAL.SAVE_DIR for job in job_cfgs])
        dist.run_on_main(lock.acquire)  # rank 0 writes the results, so rank 0 holds the lock
        jobs = [(job, load_test_set(job.EVAL.DATASET, job.EVAL.ROOT, job.EVAL.GLDV2_SPLIT)) for job in job_cfgs]
        with_old = bool(cfg.OLD_MODEL.WEIGHTS)
        if with_old and cfg.EVAL.OLD_FEATURES_CACHE:
            feature_cache.check_directory(cfg.EVAL.OLD_FEATURES_CACHE)
        transform = load_transformation(cfg.EVAL.OLD_TRANSFORM, device=device) if cfg.EVAL.OLD_TRANSFORM else None
        new_checkpoint = read_checkpoint(cfg.NEW_MODEL.WEIGHTS, "NEW_MODEL.WEIGHTS")  # read once, for both
        check_needs_transformation(cfg, new_checkpoint)
        new = load_trained_model(cfg.NEW_MODEL.ARCH, cfg.NEW_MODEL.WEIGHTS, "NEW_MODEL.WEIGHTS", device=device,
                                 checkpoint=new_checkpoint)
        old = (load_trained_model(cfg.OLD_MODEL.ARCH, cfg.OLD_MODEL.WEIGHTS, "OLD_MODEL.WEIGHTS", device=device)
               if with_old else None)
        if with_old and transform is None:  # each checkpoint is read once, by load_trained_model
            check_same_embedding(new, old, cfg.NEW_MODEL.WEIGHTS, cfg.OLD_MODEL.WEIGHTS)
        # (with a transformation, evaluate_models checks its dims against the models before embedding)
        models = {"new_model": {"arch": cfg.NEW_MODEL.ARCH, "weights": cfg.NEW_MODEL.WEIGHTS}}
        if with_old:
            models["old_model"] = {"arch": cfg.OLD_MODEL.ARCH, "weights": cfg.OLD_MODEL.WEIGHTS}
        if transform is not None:
            models["old_transform"] = {"path": cfg.EVAL.OLD_TRANSFORM, "kind": transform.kind}
        results = []
        for job_cfg, test_set in jobs:
            result = evaluate_models(new, old, job_cfg, test_set=test_set, old_transform=transform)
            result.update(models)
            path = dist.run_on_main(write_results, job_cfg.EVAL.SAVE_DIR, job_cfg, result)
            if dist.is_main_process():
                print(format_result(result))
                print(f"results: {path}")
            results.append(result)
        dist.finish()
        return results
    finally:
        if lock is not None:
            lock.release()
        dist.cleanup()
