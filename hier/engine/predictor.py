"""The one batched forward pass: photos in, embeddings, head logits and calibrated probabilities out.

Every command goes through ``Predictor`` (predict, evaluate, enroll, index, similar, the temperature
fit at the end of training), with the artifact's own TTA setting and temperature, so an embedding or a
probability for a photo is the same whichever command computed it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from hier import artifact, fileio
from hier.data import ImageDataset, eval_transform, loader
from hier.errors import HierError, HierWarning
from hier.metrics import answer_class, softmax
from hier.models import HierNet


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def decode_workers(photos: int, cpus: int | None) -> int:
    """Decoding processes beside the network when a caller does not say: none for a handful of photos
    (starting one costs more than it saves), else one per spare core, at most 4. Measured on 2 cores with
    ONNX Runtime: 1 worker decodes the next batch while the network runs, +13% photos/s (README)."""
    if photos < 2 * 32 or not cpus or cpus < 2:
        return 0
    return min(4, cpus - 1)


class Predictor:
    """``Predictor(net)(images)`` -> {"joint", "fine", "model", "brand", "embedding", "probs", "answer"}
    (and ``trained``, the trained head's joint, when the class statistics serve).

    ``images``: paths, ``Crop`` boxes, PIL images or uint8 arrays. With TTA (the artifact's ``cfg.tta``
    unless overridden) the flipped view is added: joint scores are averaged as log-probabilities (a
    geometric mean of the two views' distributions), embeddings averaged and re-normalised. ``probs``
    applies the artifact's temperature to ``joint``.

    ``onnx``: an ``hier export`` file of the trunk + embedding (the costly part; the heads stay here, so
    enrolled classes need no re-export). ONNX Runtime computes the embeddings then, of the photos and,
    with TTA, of their mirror images in the same batch; the outputs equal the eager model's to ~1e-6.
    ``session``: any object with ``views`` and ``run(images) -> (V, N, D) embeddings`` instead
    (``OrtSession``, ``OpenVinoSession``). An export holds one view (V = 1), so ``tta=False`` halves its
    work; an older export of both views (V = 2) computes both whatever ``tta`` says.
    """

    def __init__(self, net: HierNet, tta: bool | None = None, batch_size: int = 64, workers: int | None = None,
                 onnx: str | Path | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 session: "OrtSession | OpenVinoSession | None" = None):
        self.net = net.eval()
        self.tta = net.cfg.tta if tta is None else tta
        self.batch_size, self.workers = batch_size, workers
        self.session = OrtSession(onnx, providers) if session is None and onnx is not None else session
        self.views = self.session.views if self.session is not None else 0

    def _embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One embedding per view (the photo, and its mirror image with TTA)."""
        if self.session is not None:
            images = x.cpu().numpy()
            if self.views >= 2:                  # an older export: both views inside the graph
                z = self.session.run(images)[:2 if self.tta else 1]
            elif self.tta:                       # the mirror images as more photos of the batch
                z = self.session.run(np.concatenate([images, images[..., ::-1]]))[0].reshape(2, len(images), -1)
            else:
                z = self.session.run(images)
            return list(torch.from_numpy(np.ascontiguousarray(z)).to(x.device))
        return [self.net.embed(v) for v in ([x, x.flip(3)] if self.tta else [x])]

    @torch.no_grad()
    def batches(self, images: list, progress=None) -> Iterator[dict[str, np.ndarray]]:
        """The outputs batch by batch (``__call__``'s keys), so a caller that keeps only some of them
        never holds every photo's logits (a gallery of 1M photos: the embeddings, not 6 GB of scores)."""
        net, cfg = self.net, self.net.cfg
        dev = next(net.parameters()).device
        images = list(images)
        workers = decode_workers(len(images), os.cpu_count()) if self.workers is None else self.workers
        data = loader(ImageDataset(images, None, eval_transform(cfg.img_size, cfg.mean, cfg.std), cfg.img_size),
                      self.batch_size, workers=workers)
        task = progress.add_task("predict", total=len(images), info="") if progress else None
        maps = (net.fine_to_model.cpu().numpy(), net.fine_to_brand.cpu().numpy())
        for x, _ in data:
            zs = self._embeddings(x.to(dev))
            outs = [net.heads(z) for z in zs]
            out = {k: torch.stack([o[k] for o in outs]).mean(0) for k in ("fine", "model", "brand")}
            for k in [k for k in ("joint", "trained") if k in outs[0]]:
                out[k] = torch.stack([torch.log_softmax(o[k], 1) for o in outs]).mean(0) if self.tta else outs[0][k]
            out["embedding"] = F.normalize(torch.stack(zs).mean(0), dim=1)
            out = {k: v.float().cpu().numpy() for k, v in out.items()}
            out["probs"] = softmax(out["joint"], cfg.temperature)
            out["answer"] = answer_class(out["probs"], *maps)          # ``metrics.answer``'s fine class
            if progress:
                progress.advance(task, len(x))
            yield out

    def __call__(self, images: list, progress=None, keep: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Every photo's outputs, concatenated; ``keep`` names the ones to hold (all by default)."""
        chunks: dict[str, list] = {}
        for out in self.batches(images, progress):
            for k, v in out.items():
                if keep is None or k in keep:
                    chunks.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in chunks.items()}

    @torch.no_grad()
    def probs_of(self, embeddings: np.ndarray) -> np.ndarray:
        """Calibrated fine-class probabilities of stored embeddings (a gallery's listings, answered again
        by the head of now): the heads on the (view-averaged) embedding, the artifact's temperature."""
        dev = next(self.net.parameters()).device
        joint = self.net.heads(torch.from_numpy(np.ascontiguousarray(embeddings, np.float32)).to(dev))["joint"]
        return softmax(joint.float().cpu().numpy(), self.net.cfg.temperature)


class OrtSession:
    """ONNX Runtime on an export file: ``run(images (N, 3, H, W) float32) -> embeddings (V, N, D)``."""

    def __init__(self, path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort
        self.session = ort.InferenceSession(str(path), providers=list(providers))
        self.views = self.session.get_outputs()[0].shape[0]

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": images})[0]


class OpenVinoSession:
    """OpenVINO compiling the same export file for the CPU, ``OrtSession``'s contract. Precision is
    pinned (f32 unless asked: the CPU plugin would pick bf16 on its own where the CPU has it, which
    changes answers); the THROUGHPUT hint runs several streams, so a batch is split over the infer
    requests it asks for and their outputs joined in order.

    It compiles on its first batch, in the process that runs it: a server that loads the artifact, then
    forks its workers (gunicorn ``--preload``) compiles in each worker. A process forked after the model
    compiled cannot use it (measured: the child hangs on a batch, aborts compiling again, and may hang at
    exit), so there the same file runs on ONNX Runtime, which runs on in a child (same outputs to ~1e-6;
    said once)."""

    def __init__(self, path: str | Path, precision: str = "f32"):
        self.path, self.precision = str(path), precision
        self.views = openvino_core().read_model(self.path).outputs[0].get_partial_shape()[0].get_length()
        self.pid, self.in_child, self._compiled = None, None, None
        self.setup = threading.Lock()             # the first batch's compile, once across threads

    def compiled(self):
        """The compiled model of this process (compiled now on first use)."""
        with self.setup:
            if self._compiled is None:
                import openvino as ov
                self._compiled = openvino_core().compile_model(self.path, "CPU", {
                    "INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "THROUGHPUT"})
                self.queue = ov.AsyncInferQueue(self._compiled)     # as many requests as the hint asks for
                self.lock = threading.Lock()  # one batch at a time through the queue (threads of a service)
                self.pid = os.getpid()
            return self._compiled

    def _onnx_runtime(self) -> "OrtSession":
        with self.setup:
            if self.in_child is None:
                warnings.warn(f"{self.path}: OpenVINO compiled it before this process was forked and cannot run "
                              "here; answering with ONNX Runtime on the same file (load the artifact after forking, "
                              "or start workers with 'spawn', to keep OpenVINO)", HierWarning, stacklevel=3)
                self.in_child = OrtSession(self.path)
            return self.in_child

    def run(self, images: np.ndarray) -> np.ndarray:
        if self.pid is not None and os.getpid() != self.pid:
            return self._onnx_runtime().run(images)
        self.compiled()
        chunks = np.array_split(images, min(len(self.queue), len(images)))
        out: list = [None] * len(chunks)

        def done(request, i):
            out[i] = request.get_output_tensor(0).data.copy()
        with self.lock:
            self.queue.set_callback(done)
            for i, chunk in enumerate(chunks):
                self.queue.start_async({0: np.ascontiguousarray(chunk)}, i)
            self.queue.wait_all()
        return np.concatenate(out, 1)


@functools.cache
def openvino_core():
    """The process's one OpenVINO ``Core``: a second Core in a process that already compiled models
    crashes later (SIGSEGV; ultralytics met it too, ultralytics#25864), so every session shares this."""
    import openvino as ov
    return ov.Core()


class ViewEmbedder(torch.nn.Module):
    """What ``hier export`` writes: normalised images (N, 3, H, W) -> embeddings (1, N, D), the leading
    axis the views (``Predictor`` feeds TTA's mirror images as more photos; exports before it held 2)."""

    def __init__(self, net: HierNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images)[None]


def export_onnx(net: HierNet, path: Path) -> None:
    """The trunk + embedding of ``net`` as ONNX (opset 17, dynamic batch), one view: with TTA the
    predictor adds the mirror images to the batch, so ``--no-tta`` costs half. The TorchScript exporter
    needs only the ``onnx`` package."""
    x = torch.randn(2, 3, net.cfg.img_size, net.cfg.img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ViewEmbedder(net.eval()), x, str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "n"}, "embeddings": {1: "n"}})


BACKENDS = ("auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-bf16")
INT8 = "model.int8.onnx"          # ``hier export --int8``: the same graph, weights and activations in int8
EXPORTS = {"onnx": artifact.ONNX, "int8": INT8}       # config.json key -> file
CALIBRATION_PHOTOS = 256          # training photos the int8 activation ranges are calibrated on
INT8_TOLERANCE = 0.003            # top-1 change past which ``hier export --int8`` says so


def export(path: str | Path) -> Path:
    """``hier export``: ARTIFACT/model.onnx, with the fingerprint of the weights it holds in config.json."""
    path = Path(path)
    with fileio.locked(path):
        net, _ = artifact.load(path)
        config = artifact.read_config(path)
        config["onnx"] = {"file": artifact.ONNX, "fingerprint": net.fingerprint(), "views": 1}
        fileio.atomic_write_all({path / artifact.ONNX: lambda p: export_onnx(net, p),
                                   path / artifact.CONFIG: lambda p: fileio.write_json(p, config)})
    return path / artifact.ONNX


def float_nodes(model, keep: tuple[str, ...] = ("stem", "head")) -> list[str]:
    """Names of the nodes int8 leaves in float: ``stem``, the first convolution (raw pixels in, where
    8 bits lose most; each view's, in an older two-view export); ``head``, every node after the last
    convolution (pooling, the embedding projection, the L2 normalisation); ``last-conv``, the last
    convolution too; ``depthwise``, every grouped convolution. Read from the graph, so it holds for any
    trunk."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reach(start, step) -> set[str]:
        seen, todo = set(), list(start)
        while todo:
            n = todo.pop()
            for m in step(n):
                if m.name not in seen:
                    seen.add(m.name)
                    todo.append(m)
        return seen
    up = lambda n: [producer[i] for i in n.input if i in producer]                    # noqa: E731
    down = lambda n: [m for o in n.output for m in consumers.get(o, [])]             # noqa: E731
    convs = [n for n in nodes if n.op_type == "Conv"]
    conv_names = {n.name for n in convs}
    out = set()
    if "stem" in keep:
        out |= {n.name for n in convs if not reach([n], up) & conv_names}
    last = [n for n in convs if not reach([n], down) & conv_names]
    if "head" in keep:
        out |= reach(last, down)
    if "last-conv" in keep:
        out |= {n.name for n in last}
    if "depthwise" in keep:
        out |= {n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)}
    return sorted(out)


def split_photos(path: Path, data: Path | None, taxonomy) -> tuple[list[Path], list[Path], list[str]]:
    """(training photos, validation photos, validation labels) of ``data`` (default: the data the
    artifact was trained on, from train.json), split as ``hier train`` split it: same layout, exclusions,
    car crops, ``val_frac``/``seed``/``fold`` (another folder: its own photos, the same split rule)."""
    from hier.engine.trainer import TrainConfig, prepare
    from hier.data import split_indices
    run = fileio.read_json(path / "train.json") if (path / "train.json").is_file() else {}
    cfg = TrainConfig(**{k: v for k, v in run.get("train", {}).items() if k in TrainConfig.__dataclass_fields__})
    own = data is None
    data = Path(data or run.get("data") or "")
    if not str(data) or not data.is_dir():
        raise HierError(f"--int8 calibrates on photos: the training data {str(data) or '(none in train.json)'} "
                        "is not a folder here; pass --data DIR (labelled photos of the artifact's classes)")
    images, _ = prepare(data, taxonomy, cfg.layout)
    if cfg.exclude and own:
        from hier.audit import apply_exclude, read_exclude
        images, _ = apply_exclude(images, read_exclude(cfg.exclude, data))
    paths = images.paths
    if cfg.crop == "yolo":
        from hier.data.detect import CarDetector
        paths, _ = CarDetector(cfg.detector).crops(paths)
    tr, va = split_indices(images.labels, cfg.val_frac, cfg.seed, cfg.fold, cfg.folds)
    if len(va) == 0:
        raise HierError(f"{data}: no validation photos (val_frac 0) to measure what int8 changes on")
    return [paths[i] for i in tr], [paths[i] for i in va], [images.labels[i] for i in va]


class _Calibration:
    """onnxruntime.quantization's ``CalibrationDataReader`` over the photos as the predictor feeds them,
    in batches; ``set_range`` is what ORT's ``CalibStridedMinMax`` calls to calibrate one batch at a time
    (ranges merged), so memory holds one batch's intermediate tensors, not every photo's."""

    def __init__(self, photos: list, cfg, batch_size: int = 16):
        self.photos, self.cfg, self.batch_size = photos, cfg, batch_size
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.photos) // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        b, cfg = self.batch_size, self.cfg
        chunk = self.photos[start_index * b:end_index * b]
        self.data = iter(loader(ImageDataset(chunk, None, eval_transform(cfg.img_size, cfg.mean, cfg.std),
                                             cfg.img_size), b, workers=0))

    def get_next(self):
        batch = next(self.data, None)
        return None if batch is None else {"images": batch[0].numpy()}


def quantize_int8(fp32: Path, out: Path, photos: list, cfg, keep: tuple[str, ...], reduce_range: bool = False) -> None:
    """Static int8 (QDQ, per-channel weights, min-max ranges over ``photos``), ``keep`` in float.
    ``reduce_range``: 7-bit weights, ORT's remedy for the U8S8 saturation of AVX2 CPUs without VNNI."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))          # shape inference + fusions, as ORT's docs advise
        quantize_static(str(pre), str(out), _Calibration(photos, cfg), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=float_nodes(onnx.load(str(pre)), keep),
                        extra_options={"CalibStridedMinMax": 1})      # one batch at a time


def compare(fp32: Predictor, other: Predictor, photos: list, y: np.ndarray, taxonomy) -> dict:
    """What a backend changes against fp32 on labelled photos: top-1 and log loss of the answer
    (``metrics.evaluate_probs``), and the cosine of each photo's two embeddings."""
    from hier.metrics import evaluate_probs
    a, b = fp32(photos, keep=("probs", "embedding")), other(photos, keep=("probs", "embedding"))
    ea, eb = evaluate_probs(a["probs"], y, taxonomy), evaluate_probs(b["probs"], y, taxonomy)
    cos = (a["embedding"] * b["embedding"]).sum(1)
    return {"photos": int(len(y)), "top1_fp32": ea["top1"], "top1": eb["top1"], "log_loss_fp32": ea["log_loss"],
            "log_loss": eb["log_loss"], "top1_change": eb["top1"] - ea["top1"],
            "log_loss_change": eb["log_loss"] - ea["log_loss"],
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def export_int8(path: str | Path, data: str | Path | None = None, photos: int = CALIBRATION_PHOTOS,
                keep: tuple[str, ...] = ("stem", "head"), reduce_range: bool = True) -> dict:
    """``hier export --int8``: ARTIFACT/model.int8.onnx, calibrated on ``photos`` of the artifact's
    own training photos (or ``data``'s, split the same way), then measured against fp32 on the
    validation photos; the change is stored in config.json["int8"] and returned. An explicit choice:
    ``auto`` never picks it. ``reduce_range`` (7-bit weights) by default: on this AVX2 CPU without VNNI
    full-range weights lost 1.3 points of top-1, 7-bit ones none (README, "Prediction speed")."""
    path = Path(path)
    with fileio.locked(path):
        net, taxonomy = artifact.load(path)
        if not export_is_fresh(path, net):
            export(path)
        train, val, labels = split_photos(path, Path(data) if data else None, taxonomy)
        pick = np.random.default_rng(0).permutation(len(train))[:photos]
        with tempfile_path(path, INT8) as tmp:
            quantize_int8(path / artifact.ONNX, tmp, [train[i] for i in sorted(pick)], net.cfg, keep, reduce_range)
            y = np.array([taxonomy.class_index[c] for c in labels])
            change = compare(Predictor(net, onnx=path / artifact.ONNX), Predictor(net, onnx=tmp), val, y, taxonomy)
            config = artifact.read_config(path)
            config["int8"] = {"file": INT8, "fingerprint": net.fingerprint(), "views": config["onnx"].get("views", 1),
                              "calibration_photos": len(pick), "float": list(keep), "reduce_range": reduce_range,
                              "validation": change}
            fileio.atomic_write_all({path / INT8: lambda p: p.write_bytes(tmp.read_bytes()),
                                       path / artifact.CONFIG: lambda p: fileio.write_json(p, config)})
    return config["int8"]


@contextlib.contextmanager
def tempfile_path(folder: Path, name: str) -> Iterator[Path]:
    """A scratch file beside ``name`` in ``folder``, removed on the way out."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def choose_backend(requested: str, export_fresh: bool, providers: list[str], device: str,
                   openvino: bool = False, int8_fresh: bool = False) -> tuple[str, tuple]:
    """(``torch`` | ``onnx`` | ``onnx-int8`` | ``openvino`` | ``openvino-bf16``, ONNX Runtime providers
    to use) for a net on ``device``, given whether the artifact holds an up-to-date export (and int8
    export), the providers ONNX Runtime offers (empty: not installed) and whether OpenVINO is installed.
    ``auto`` takes ONNX Runtime only where it runs on the net's own device: on a GPU host with the CPU
    build of ONNX Runtime, eager CUDA is faster than ONNX on the CPU; on a CPU it takes OpenVINO (f32,
    the same answers to 1e-5) when installed, 1.1-1.2x ONNX Runtime's photos/s here (README,
    bench_speed); it never takes int8 or bf16 (they change answers). A pure function, tested on CPU."""
    if requested not in BACKENDS:
        raise HierError(f"unknown backend {requested!r}; choose {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch", ()
    if requested.startswith("openvino"):
        if not openvino:
            raise HierError(f"--backend {requested} needs OpenVINO (pip install 'hier[openvino]')")
        if not export_fresh:
            raise HierError("no up-to-date ONNX export (run `hier export`)")
        return requested, ()
    if requested == "onnx-int8":
        if not int8_fresh:
            raise HierError("no up-to-date int8 export (run `hier export ARTIFACT --int8`)")
        if not providers:
            raise HierError("--backend onnx-int8 needs onnxruntime (pip install onnxruntime)")
        return "onnx-int8", ("CPUExecutionProvider",)
    if requested == "onnx" and not (export_fresh and providers):
        raise HierError("no up-to-date ONNX export (run `hier export`)" if not export_fresh else
                        "--backend onnx needs onnxruntime (pip install onnxruntime or onnxruntime-gpu)")
    if not (export_fresh and providers):
        return "torch", ()
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in providers:
            return "onnx", ("CUDAExecutionProvider", "CPUExecutionProvider")
        return ("onnx", ("CPUExecutionProvider",)) if requested == "onnx" else ("torch", ())
    if requested == "auto" and openvino:
        return "openvino", ()
    return "onnx", ("CPUExecutionProvider",)


def onnx_providers() -> list[str]:
    """The execution providers of the installed ONNX Runtime (empty when it is not installed)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime as ort
    return list(ort.get_available_providers())


def has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


def export_is_fresh(path: Path, net: HierNet, kind: str = "onnx") -> bool:
    """The artifact holds an export (``onnx``, or ``int8``) of these very weights."""
    saved = artifact.read_config(path).get(kind, {})
    return (path / EXPORTS[kind]).is_file() and saved.get("fingerprint") == net.fingerprint()


def export_on_first_use(path: Path) -> bool:
    """Export a missing or stale ONNX file now (under the artifact's lock, as ``hier export``), so
    ``auto`` is fast without the user knowing about ONNX; an artifact that cannot be written (read-only,
    disk full) answers on eager PyTorch with one warning."""
    try:
        export(path)
        return True
    except (HierError, OSError, RuntimeError) as e:
        warnings.warn(f"{path}: could not write its ONNX export ({str(e).splitlines()[0][:120]}); answering with "
                      "eager PyTorch, slower", HierWarning, stacklevel=3)
        return False


def artifact_predictor(path: str | Path, net: HierNet, backend: str = "auto", **kw) -> Predictor:
    """The artifact's predictor, on the backend ``choose_backend`` picks: ONNX Runtime when it runs on
    the net's device, eager PyTorch otherwise, OpenVINO or int8 when asked. ``auto`` exports the weights
    first when the export is missing or stale (after ``hier train --resume``); every explicit backend
    refuses a stale export. The caller holds the artifact's lock when it compares versions
    (``artifact.stamp``) across this call."""
    path = Path(path)
    if backend not in BACKENDS:
        raise HierError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend == "torch":
        return Predictor(net, **kw)
    providers, where = onnx_providers(), str(next(net.parameters()).device)
    fresh = export_is_fresh(path, net)
    if backend == "auto" and choose_backend("auto", True, providers, where)[0] == "onnx":
        if not fresh:
            fresh = export_on_first_use(path)
        elif artifact.read_config(path)["onnx"].get("views", 2) != 1 and os.access(path, os.W_OK):
            with contextlib.suppress(HierError, OSError, RuntimeError):   # else it serves as it is
                export(path)     # an older hier's export of both views: one view halves --no-tta's work
    try:
        kind, providers = choose_backend(backend, fresh, providers, where, has_openvino(),
                                         backend == "onnx-int8" and export_is_fresh(path, net, "int8"))
    except HierError as e:
        raise HierError(f"{path}: {e}") from None
    if kind == "torch":                 # no usable export (or ONNX Runtime not installed): eager PyTorch
        return Predictor(net, **kw)
    if kind.startswith("openvino"):
        return Predictor(net, session=OpenVinoSession(path / artifact.ONNX, "bf16" if kind.endswith("bf16") else "f32"),
                         **kw)
    if kind == "onnx-int8":
        return Predictor(net, onnx=path / INT8, providers=providers, **kw)
    return Predictor(net, onnx=path / artifact.ONNX, providers=providers, **kw)
