"""Device and backend decisions as pure functions: what a GPU host would do, checked on CPU."""
import pytest

from hier import HierError
from hier.runtime.backend import choose_backend


def test_the_backend_choice_fits_the_device():
    """Before: ``auto`` took CPU ONNX Runtime for a net on CUDA (and fed it a CUDA tensor's .numpy())."""
    cpu_ort, gpu_ort = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_backend("auto", True, cpu_ort, "cpu") == ("onnx", ("CPUExecutionProvider",))
    assert choose_backend("auto", True, cpu_ort, "cuda:0") == ("torch", ())          # eager CUDA, not CPU ONNX
    assert choose_backend("auto", True, gpu_ort, "cuda:0") == ("onnx", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert choose_backend("onnx", True, cpu_ort, "cuda") == ("onnx", ("CPUExecutionProvider",))   # asked for
    assert choose_backend("auto", False, gpu_ort, "cuda") == choose_backend("auto", True, [], "cpu") == ("torch", ())
    assert choose_backend("torch", True, gpu_ort, "cuda") == ("torch", ())
    for args, message in ((("onnx", False, cpu_ort, "cpu"), "hier export"), (("onnx", True, [], "cpu"), "onnxruntime"),
                          (("fast", True, cpu_ort, "cpu"), "unknown backend")):
        with pytest.raises(HierError, match=message):
            choose_backend(*args)


def test_where_a_gallery_lives():
    """Before: every load moved the index to the GPUs, edits included (no remove_ids there) and HNSW
    (no GPU version): `index remove` and `similar` on HNSW raised on a GPU host."""
    from hier.gallery.gpu import placement
    assert [placement(k, 2, "search") for k in ("flat", "ivf", "hnsw", "pq")] == ["gpu", "gpu", "cpu", "cpu"]
    assert {placement(k, g, "edit") for k in ("flat", "ivf", "hnsw", "pq") for g in (0, 1, 8)} == {"cpu"}
    assert {placement(k, 0, "search") for k in ("flat", "ivf", "hnsw", "pq")} == {"cpu"}
    with pytest.raises(ValueError):
        placement("flat", 1, "serve")


def test_edits_never_touch_a_gpu(art, demo_data, monkeypatch, capsys):
    """With faiss-gpu seeing GPUs, index add/remove load, edit and save the CPU index; only the
    recognizer's held gallery asks for a GPU copy (counted here, as this host has none)."""
    import faiss
    from conftest import run_cli
    from hier.recognizer import Recognizer
    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or index, raising=False)
    photos = demo_data.train_dir / "Aurora_Nova_2015_2018"
    assert run_cli("index", "build", art, photos, capsys=capsys)[0] == 0
    first = sorted(photos.glob("*.jpg"))[0].stem
    assert run_cli("index", "remove", art, first, capsys=capsys)[0] == 0 and moved == []
    Recognizer(art).similar(sorted(photos.glob("*.jpg"))[1], k=2)
    assert len(moved) == 1


def test_decoding_workers_start_only_where_they_pay():
    from hier.runtime import decode_workers
    assert [decode_workers(1, 2), decode_workers(63, 2), decode_workers(64, 2)] == [0, 0, 1]
    assert [decode_workers(10_000, 1), decode_workers(10_000, None), decode_workers(10_000, 16)] == [0, 0, 4]
