"""The end of a training run: the best weights, the class statistics that serve, the temperature, the
validation figures and the records enrollment and ensembles read (``validation.npz``, ``oof.npz``)."""
from __future__ import annotations

import time
import warnings

import numpy as np

from hier import artifact, fileio
from hier.artifact.files import METRICS, ONNX, OOF, PROTOTYPES, STATISTICS, VALIDATION
from hier.artifact.records import save_oof, save_validation
from hier.errors import HierWarning
from hier.export import export
from hier.metrics import evaluate_probs, fit_temperature, softmax
from hier.models.statistics import ClassStatistics, class_means
from hier.progress import progress_bar
from hier.runtime import Predictor
from hier.runtime.backend import onnx_providers


def finish(trainer, train_paths, train_y, val_paths, val_y) -> dict:
    """Reload the best weights of ``trainer``'s run, compute the class statistics that serve
    (``hier.models.statistics``) from the training photos, fit the temperature of the served scores on
    validation and store it with the metrics (and, beside them, the trained head's own figures on the
    same photos). Returns the metrics ({} without validation photos)."""
    out, taxonomy, cfg = trainer.out, trainer.taxonomy, trainer.cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HierWarning)        # the best weights have no statistics yet
        best, _ = artifact.load(out, trainer.dev)
    files = {}
    with progress_bar(trainer.console) as progress:
        # by the predictor that will embed enrolled shots (same views, same TTA): one geometry
        z = Predictor(best, workers=cfg.workers)(train_paths, progress)["embedding"]
    t = time.time()
    if best.cfg.head == "statistics":
        stats = ClassStatistics.fit(z, [taxonomy.classes[i] for i in train_y], best.fingerprint())
        best.set_statistics(stats, taxonomy)
        files[STATISTICS] = stats.save
    else:                        # the trained head serves: enrollment maps prototypes into its frame
        means = class_means(z, np.asarray(train_y), len(taxonomy))
        files[PROTOTYPES] = lambda p: fileio.save_npy(p, means)
    statistics_s = time.time() - t
    extra = {"merged_classes": trainer.merged}
    if not len(val_paths):
        artifact.save(out, best, taxonomy, extra=extra, files=files)
        _export(trainer)
        return {}
    # calibrate exactly what will be served: whole photos through the predictor, TTA as configured
    logits = Predictor(best, workers=cfg.workers)(val_paths)
    best.cfg.temperature = fit_temperature(logits["joint"], val_y)
    # held-out photos' embeddings: what enrollment sets each new class's score offset on
    files[VALIDATION] = lambda p: save_validation(p, logits["embedding"], val_y)
    files[OOF] = lambda p: save_oof(p, val_paths, val_y, logits["joint"], taxonomy.classes, trainer.data_dir)
    metrics = evaluate_probs(softmax(logits["joint"], best.cfg.temperature), val_y, taxonomy,
                             logits=logits["joint"], heads=logits)
    if best.cfg.head == "statistics":
        head = evaluate_probs(softmax(logits["trained"], fit_temperature(logits["trained"], val_y)), val_y, taxonomy)
        metrics.update(trained_head_top1=head["top1"], trained_head_log_loss=head["log_loss"])
    metrics.update(head=best.cfg.head, statistics_s=round(statistics_s, 3), temperature=best.cfg.temperature,
                   best_epoch=artifact.read_config(out)["metrics"].get("best_epoch"))
    files[METRICS] = lambda p: fileio.write_json(p, metrics)
    artifact.save(out, best, taxonomy, metrics, extra=extra, files=files)
    _export(trainer)
    return metrics


def _export(trainer) -> None:
    """The ONNX export ``hier predict`` runs on (``--no-export``: none; no ONNX Runtime: none)."""
    if trainer.cfg.export and onnx_providers():
        t = time.time()
        export(trainer.out)
        trainer.console.print(f"ONNX export for `hier predict`: {trainer.out / ONNX} ({time.time() - t:.0f} s)")
