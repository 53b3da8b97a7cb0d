"""The inference backends beside ONNX Runtime fp32: OpenVINO on the same export, and the int8 export; and
the export's config.json written as UTF-8 under an ASCII locale."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from conftest import hier_ascii, run_cli

from hier import artifact, fileio
from hier.artifact.files import INT8
from hier.errors import HierError
from hier.export.auto import artifact_predictor
from hier.export.int8 import split_photos
from hier.export.onnx import export
from hier.runtime import Predictor
from hier.runtime.backend import choose_backend
from hier.runtime.sessions import OpenVinoSession, OrtSession

CPU = ["CPUExecutionProvider"]


def test_choose_backend_new_choices():
    assert choose_backend("openvino", True, CPU, "cpu", openvino=True) == ("openvino", ())
    assert choose_backend("openvino-bf16", True, [], "cuda:0", openvino=True) == ("openvino-bf16", ())
    assert choose_backend("onnx-int8", True, CPU, "cpu", int8_fresh=True) == ("onnx-int8", ("CPUExecutionProvider",))
    # auto never picks a backend that changes answers; on a CPU, OpenVINO f32 when installed (faster here)
    assert choose_backend("auto", True, CPU, "cpu", openvino=True, int8_fresh=True) == ("openvino", ())
    assert choose_backend("auto", True, CPU, "cpu", openvino=False, int8_fresh=True) == ("onnx", ("CPUExecutionProvider",))
    assert choose_backend("auto", False, CPU, "cpu", openvino=True) == ("torch", ())      # no export: eager
    assert choose_backend("auto", True, CPU + ["CUDAExecutionProvider"], "cuda:0", openvino=True)[0] == "onnx"
    with pytest.raises(HierError, match=r"pip install .hier\[openvino\]."):
        choose_backend("openvino", True, CPU, "cpu", openvino=False)
    with pytest.raises(HierError, match="no up-to-date ONNX export"):
        choose_backend("openvino", False, CPU, "cpu", openvino=True)
    with pytest.raises(HierError, match="--int8"):
        choose_backend("onnx-int8", True, CPU, "cpu", int8_fresh=False)
    with pytest.raises(HierError, match="needs onnxruntime"):
        choose_backend("onnx-int8", True, [], "cpu", int8_fresh=True)
    with pytest.raises(HierError, match="unknown backend 'int8'"):
        choose_backend("int8", True, CPU, "cpu")


def photos_of(demo_data, n=20):
    return sorted(demo_data.train_dir.glob("*/*.jpg"))[::3][:n]


def test_openvino_equals_eager_and_onnx_runtime(art, demo_data):
    pytest.importorskip("openvino")
    export(art)
    net, _ = artifact.load(art)
    photos = photos_of(demo_data)
    ov = artifact_predictor(art, net, "openvino", batch_size=8)     # 3 batches, the last one short
    assert isinstance(ov.session, OpenVinoSession) and ov.session.views == 1
    assert "float32" in str(ov.session.compiled().get_property("INFERENCE_PRECISION_HINT"))
    got, eager = ov(photos), Predictor(net, batch_size=8)(photos)
    ort = artifact_predictor(art, net, "onnx", batch_size=8)(photos)
    for ref in (eager, ort):
        assert np.abs(got["embedding"] - ref["embedding"]).max() < 1e-5
        assert np.abs(got["probs"] - ref["probs"]).max() < 1e-5
    assert (got["answer"] == eager["answer"]).all()
    assert isinstance(artifact_predictor(art, net, "auto").session, OpenVinoSession)   # installed: auto's
    # a service's threads at once: each batch through the one infer queue whole, not interleaved
    from concurrent.futures import ThreadPoolExecutor
    batches = [np.random.default_rng(i).normal(size=(5, 3, 64, 64)).astype(np.float32) for i in range(6)]
    alone = [ov.session.run(b) for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ov.session.run, batches))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert _in_forked_child(lambda: ov.session.run(batches[0])) == pytest.approx(alone[0], abs=1e-6)


def _in_forked_child(work, timeout: float = 60.0):
    """``work()``'s result computed in a forked child (the parent's objects inherited), or a failure when
    the child hangs past ``timeout`` or dies: what a pre-forking server's worker would meet."""
    import os
    import pickle
    import select
    import signal

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                                    # the child: never back into pytest
        try:
            os.write(write, pickle.dumps(work()))
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the forked child hung for {timeout:.0f} s")
        data = b"".join(iter(lambda: os.read(read, 1 << 20), b""))
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert data, "the forked child died without an answer"
    return pickle.loads(data)


def test_missing_openvino_is_one_line(art, demo_data, monkeypatch, capsys):
    export(art)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    net, _ = artifact.load(art)
    with pytest.raises(HierError, match=r"pip install .hier\[openvino\]."):
        artifact_predictor(art, net, "openvino")
    code, out, err = run_cli("predict", art, photos_of(demo_data, 1)[0], "--backend", "openvino", capsys=capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "pip install 'hier[openvino]'" in err


def test_int8_export_records_its_change_and_refuses_when_stale(art, capsys):
    code, out, err = run_cli("export", art, "--int8", "--photos", "40", capsys=capsys)
    assert code == 0, err
    assert (art / INT8).is_file() and "int8 vs fp32 on" in out
    saved = artifact.read_config(art)["int8"]
    v = saved["validation"]
    assert saved["calibration_photos"] == 40 and saved["float"] == ["stem", "head"] and saved["reduce_range"]
    # the recorded figures are those of the validation split training used, fp32 and int8 alike
    net, tax = artifact.load(art)
    _, val, labels = split_photos(art, None, tax)
    y = np.array([tax.class_index[c] for c in labels])
    assert v["photos"] == len(val) > 0
    fp32 = Predictor(net, onnx=art / artifact.ONNX)(val)
    int8 = artifact_predictor(art, net, "onnx-int8")
    assert int8.session.session._model_path.endswith(INT8)
    got = int8(val)
    assert v["top1_fp32"] == pytest.approx(float((fp32["answer"] == y).mean()))
    assert v["top1"] == pytest.approx(float((got["answer"] == y).mean()))
    cos = (fp32["embedding"] * got["embedding"]).sum(1)
    assert v["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-5) and 0.5 < v["cosine_mean"] <= 1.0 + 1e-6
    assert np.abs(got["embedding"] - fp32["embedding"]).max() > 1e-6          # int8 really ran
    # int8 inside, the stem and head kept in float
    model = onnx.load(str(art / INT8))
    kinds = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    producer = {o: n for n in model.graph.node for o in n.output}
    stems = [n for n in model.graph.node if n.op_type == "Conv" and "conv_stem" in n.name]
    assert len(stems) == (2 if net.cfg.tta else 1) and all(producer.get(n.input[1]) is None or producer[n.input[1]].op_type != "DequantizeLinear"
                                   for n in stems)
    # stale: weights other than those quantised are refused, never answered on
    config = artifact.read_config(art)
    config["int8"]["fingerprint"] = "other weights"
    fileio.write_json(art / artifact.CONFIG, config)
    with pytest.raises(HierError, match="no up-to-date int8 export"):
        artifact_predictor(art, net, "onnx-int8")


def test_int8_without_its_data_is_one_line(art, tmp_path, capsys):
    run = fileio.read_json(art / "train.json")
    run["data"] = str(tmp_path / "moved")
    fileio.write_json(art / "train.json", run)
    code, _, err = run_cli("export", art, "--int8", capsys=capsys)
    assert code == 2 and "pass --data DIR" in err and err.strip().count("\n") == 0
    assert not (art / INT8).exists()


def test_the_export_holds_one_view_so_no_tta_halves_the_work_and_an_older_two_view_export_still_serves(art, demo_data,
                                                                                                        tmp_path):
    """With TTA the mirror images go through the one-view graph as more photos of the batch; without,
    only the photos: half the images, and each answer equals eager PyTorch's of the same setting. An
    export of both views (what hier wrote before) answers as before."""
    import torch
    export(art)
    net, _ = artifact.load(art)
    assert artifact.read_config(art)["onnx"]["views"] == 1
    photos = photos_of(demo_data, 8)
    seen = []

    class Counting(OrtSession):
        def run(self, images):
            seen.append(len(images))
            return super().run(images)
    for tta in (True, False):
        seen.clear()
        got = Predictor(net, tta=tta, batch_size=4, session=Counting(art / artifact.ONNX))(photos)
        eager = Predictor(net, tta=tta, batch_size=4)(photos)
        assert seen == [4 * (2 if tta else 1)] * 2
        assert np.abs(got["embedding"] - eager["embedding"]).max() < 1e-5
        assert np.abs(got["probs"] - eager["probs"]).max() < 1e-5

    class BothViews(torch.nn.Module):                   # the export of hier before one-view graphs
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return torch.stack([self.net.embed(x), self.net.embed(x.flip(3))])
    with torch.no_grad():
        torch.onnx.export(BothViews(), torch.randn(2, 3, net.cfg.img_size, net.cfg.img_size), str(tmp_path / "old.onnx"),
                          dynamo=False, opset_version=17, input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "n"}, "embeddings": {1: "n"}})
    for tta in (True, False):
        old = Predictor(net, tta=tta, batch_size=4, onnx=tmp_path / "old.onnx")
        assert old.views == 2
        eager = Predictor(net, tta=tta, batch_size=4)(photos)
        assert np.abs(old(photos)["probs"] - eager["probs"]).max() < 1e-5
    (tmp_path / "old.onnx").replace(art / artifact.ONNX)          # the artifact holding such an export
    config = artifact.read_config(art)
    fileio.write_json(art / artifact.CONFIG, config | {"onnx": config["onnx"] | {"views": 2}})
    assert artifact_predictor(art, net, "onnx").views == 2         # an explicit backend serves it as it is
    assert artifact_predictor(art, net, "auto").views == 1         # auto writes it anew, one view
    assert artifact.read_config(art)["onnx"]["views"] == 1


FORKED_WORKER = """
import os, sys, numpy as np
from hier.runtime.sessions import OpenVinoSession
session = OpenVinoSession(sys.argv[1])                     # loaded before the fork, as gunicorn --preload does
x = np.random.default_rng(0).normal(size=(3, 3, int(sys.argv[2]), int(sys.argv[2]))).astype(np.float32)
pid = os.fork()
if pid == 0:                                               # the worker: compiles its own, runs, exits normally
    np.save(sys.argv[3], session.run(x))
    sys.exit(0)
_, status = os.waitpid(pid, 0)
np.testing.assert_allclose(np.load(sys.argv[3]), session.run(x), atol=1e-5)
print("worker-status", status, "parent-compiled-after-the-fork", session.pid == os.getpid())
"""


def test_an_openvino_session_loaded_before_a_fork_compiles_in_each_worker(art, tmp_path):
    """A session made before forking has not compiled: the worker compiles its own, answers as the parent
    does and exits normally (a worker of a process that had compiled hangs at a batch or at exit)."""
    pytest.importorskip("openvino")
    import subprocess
    import sys
    export(art)
    size = artifact.read_config(art)["model"]["img_size"]
    r = subprocess.run([sys.executable, "-c", FORKED_WORKER, str(art / artifact.ONNX), str(size), str(tmp_path / "z.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["worker-status", "0", "parent-compiled-after-the-fork", "True"], r.stderr[-2000:]


# --- an ASCII locale (issue 15, item 11) ----------------------------------------------------------------

@pytest.mark.slow
def test_export_writes_config_json_as_utf8_under_an_ascii_locale(art):
    """Before: ``export`` wrote config.json in the locale's encoding: UnicodeEncodeError on a Korean name."""
    config = json.loads((art / "config.json").read_text(encoding="utf-8"))
    config["note"] = "신형모델_2025"
    (art / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    run = hier_ascii("export", art)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    saved = json.loads((art / "config.json").read_bytes().decode("utf-8"))
    assert saved["note"] == "신형모델_2025" and saved["onnx"]["file"] == "model.onnx"
    assert (art / "model.onnx").stat().st_size > 10_000
