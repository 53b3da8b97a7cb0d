#!/usr/bin/env bash
# The CUDA paths end to end, for a user with a GPU (this project's machines have none; the device and
# backend decisions are pure functions tested on CPU in tests/runtime/test_devices.py, where a gallery
# lives in tests/gallery/test_gallery.py):
#   train 1 epoch (AMP on CUDA) -> export ONNX -> predict (auto and each backend) -> index build (flat,
#   ivf, hnsw) -> index add/remove -> similar -> index rebuild.
# With faiss-gpu (pip install -e ".[gpu]") galleries are edited on the CPU and searched on the GPUs;
# with onnxruntime-gpu, --backend auto runs the export on CUDA.
#
#   bash scripts/gpu_smoke.sh [WORK_DIR]          (default /tmp/hier_gpu_smoke; removed first)
#   HIER_SMOKE_ALLOW_CPU=1 bash scripts/gpu_smoke.sh   (the same steps on a CPU host: checks the script)
set -euo pipefail
WORK=${1:-/tmp/hier_gpu_smoke}
rm -rf "$WORK" && mkdir -p "$WORK"

python - <<'EOF'
import torch, sys
import os
if torch.cuda.is_available():
    print("cuda:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
elif os.environ.get("HIER_SMOKE_ALLOW_CPU") != "1":
    sys.exit("gpu_smoke: torch sees no CUDA device; run this on a GPU host (HIER_SMOKE_ALLOW_CPU=1 to try it on CPU)")
try:
    import faiss
    print("faiss GPUs:", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
except ImportError:
    pass
try:
    import onnxruntime as ort
    print("onnxruntime providers:", ort.get_available_providers())
except ImportError:
    print("onnxruntime: not installed (the export runs in PyTorch)")
EOF

python -c "from pathlib import Path; from hier.data.synthetic import make_demo_dataset; make_demo_dataset(Path('$WORK/data'), 12, 2)"
ART="$WORK/art"
set -x
hier train "$WORK/data/train" --out "$ART" --taxonomy "$WORK/data/taxonomy.csv" --epochs 1 --pretrained none --img-size 128 --amp
hier export "$ART"
for backend in auto torch onnx; do
  hier predict "$ART" "$WORK/data/test" --topk 2 --backend "$backend" --format csv > "$WORK/predict_$backend.csv"
done
hier evaluate "$ART" "$WORK/data/train" --json > "$WORK/evaluate.json"
ONE=$(ls "$WORK/data/test" | head -1)
for kind in flat ivf hnsw; do
  hier index build "$ART" "$WORK/data/train" --index "$kind"
  hier similar "$ART" "$WORK/data/test/$ONE" --k 3 --same-brand
done
hier index build "$ART" "$WORK/data/train"
mkdir -p "$WORK/more" && cp "$WORK/data/test/$ONE" "$WORK/more/NEW1.jpg"
hier index add "$ART" "$WORK/more"
hier index remove "$ART" NEW1
hier similar "$ART" "$WORK/data/test/$ONE" --k 3
hier index rebuild "$ART"
set +x
echo "gpu_smoke: every step passed ($WORK)"
