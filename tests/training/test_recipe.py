"""The training recipe's levers: losses, soft targets through the hierarchy, layer-wise LR, progressive
resizing, SWA, augmentation policies, TensorBoard, and their refusals."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_cli

from hier import artifact
from hier.data import AUG_POLICIES, train_transform
from hier.errors import HierError
from hier.models import HierNet, HierTask, ModelConfig
from hier.models.losses import classification_loss, coarser
from hier.taxonomy import Taxonomy
from hier.training.config import TrainConfig
from hier.training.run import train
from hier.training.trainer import param_groups


def test_losses_match_their_formulas():
    logits = torch.tensor([[3.0, 0.0, -1.0], [0.5, 0.4, 0.3]])
    y = torch.tensor([0, 2])
    p = logits.softmax(1)
    pt = p[torch.arange(2), y]
    ce = -pt.log()
    assert torch.isclose(classification_loss(logits, y, "ce"), ce.mean())
    assert torch.isclose(classification_loss(logits, y, "ce", 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))
    # soft targets from indices give the same label-smoothed CE as PyTorch's own
    soft = F.one_hot(y, 3).float() * 0.9 + 0.1 / 3
    assert torch.isclose(classification_loss(logits, soft, "ce"), F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.isclose(classification_loss(logits, y, "poly1"), (ce + 1 - pt).mean())
    assert torch.isclose(classification_loss(logits, y, "focal"), (-(1 - pt) ** 2 * pt.log()).mean())
    entropy = -(p * p.log()).sum(1)
    assert torch.isclose(classification_loss(logits, y, "penalty"), (ce - 0.1 * entropy).mean())
    # focal forgives the confident right answer most: 0.0025 of its CE, against 0.46 for the unsure one
    per = [classification_loss(logits[i:i + 1], y[i:i + 1], "focal") / ce[i] for i in range(2)]
    assert per[0] < 0.01 < 0.3 < per[1]
    with pytest.raises(HierError, match="--loss"):
        classification_loss(logits, y, "hinge")


def test_mixed_targets_are_summed_into_parents():
    fine_to_model = torch.tensor([0, 0, 1, 2])
    t = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 0.5, 0.0, 0.5]])
    assert torch.allclose(coarser(t, fine_to_model, 3), torch.tensor([[0.7, 0.3, 0.0], [0.5, 0.0, 0.5]]))
    assert coarser(torch.tensor([3, 1]), fine_to_model, 3).tolist() == [2, 0]


def test_soft_and_hard_targets_give_one_loss_through_the_hierarchy(demo_data):
    """A one-hot soft target (what Mixup gives with lambda 1) trains exactly as its class index does."""
    tax = Taxonomy.from_csv(demo_data.taxonomy)
    torch.manual_seed(0)
    net = HierNet(ModelConfig(**vars(TINY)), tax).eval()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 3, 5, 11])
    soft = F.one_hot(y, len(tax)).float() * 0.9 + 0.1 / len(tax)
    hard_loss = HierTask(net, smoothing=0.1, aux=0.5)(x, y)["loss"]
    # the soft target's smoothing is spread over fine classes, so its model/brand parts differ a little
    soft_loss = HierTask(net, smoothing=0.1, aux=0.5)(x, soft)["loss"]
    assert abs(hard_loss.item() - soft_loss.item()) < 0.05 * hard_loss.item()
    assert torch.isclose(HierTask(net, 0.1, aux=0)(x, y)["loss"], HierTask(net, 0.1, aux=0)(x, soft)["loss"])


def test_layer_decay_scales_the_trunk_by_depth(demo_data):
    tax = Taxonomy.from_csv(demo_data.taxonomy)
    net = HierNet(ModelConfig(**vars(TINY)), tax)
    groups = param_groups(net, TrainConfig(layer_decay=0.5, lr=1e-3, head_lr=3e-3))
    trunk = [g for g in groups if "lr_scale" in g]
    scales = sorted({g["lr_scale"] for g in trunk})
    # one scale per depth, each half the next; the stem lowest; the heads untouched at head_lr
    assert len(scales) > 3 and all(abs(a / b - 0.5) < 1e-9 for a, b in zip(scales, scales[1:]))
    stem = next(g for g in trunk if any(p is net.trunk.conv_stem.weight for p in g["params"]))
    assert stem["lr_scale"] == scales[0] and groups[0]["lr_scale"] == 1.0
    heads = [g for g in groups if "lr_scale" not in g]
    assert {g["lr"] for g in heads} == {3e-3} and any(p is net.fine.weight for g in heads for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in net.parameters())


def test_progressive_resizing_mixup_and_swa_in_one_run(demo_data, tmp_path, monkeypatch):
    """The first epochs see small photos, then full size; MixUp/CutMix give soft targets; the averaged
    weights of the last epochs are what the artifact holds when there is no validation to refuse them."""
    seen = []
    forward = HierTask.forward

    def spy(self, features, y):
        seen.append((features.shape[-1], y.dtype.is_floating_point))
        return forward(self, features, y)
    monkeypatch.setattr(HierTask, "forward", spy)
    out = tmp_path / "a"
    train(demo_data.train_dir, out, Taxonomy.from_csv(demo_data.taxonomy), ModelConfig(**vars(TINY)),
          TrainConfig(epochs=4, batch_size=16, pretrained="none", val_frac=0, low_res=32, low_res_epochs=2,
                      mixup=0.2, cutmix=1.0, swa_epochs=2, export=False))
    per_epoch = len(seen) // 4
    assert [s for s, _ in seen] == [32] * 2 * per_epoch + [64] * 2 * per_epoch
    assert all(soft for _, soft in seen)
    assert artifact.read_config(out)["metrics"]["best_epoch"] == "swa 3-4"
    net, _ = artifact.load(out)
    assert net.statistics is not None           # the averaged weights got their statistics in finish


def test_swa_is_not_kept_when_it_validates_worse(demo_data, tmp_path, monkeypatch):
    from hier.training import trainer as trainer_mod
    calls = []
    real = trainer_mod.Trainer.validate

    def worse_for_swa(self, paths, feats, transform, net=None):
        logits = real(self, paths, feats, transform, net)
        calls.append(net is not None)
        if net is not None:                    # the averaged weights made to answer class 0, sure of it
            logits = {k: np.where(np.arange(v.shape[1]) == 0, 50.0, 0.0) + 0 * v for k, v in logits.items()}
        return logits
    monkeypatch.setattr(trainer_mod.Trainer, "validate", worse_for_swa)
    out = tmp_path / "a"
    train(demo_data.train_dir, out, Taxonomy.from_csv(demo_data.taxonomy), ModelConfig(**vars(TINY)),
          TrainConfig(epochs=3, batch_size=16, pretrained="none", swa_epochs=2, export=False))
    assert calls == [False, False, False, True]
    best = artifact.read_config(out)["metrics"]["best_epoch"]
    assert isinstance(best, int) and 1 <= best <= 3


@pytest.mark.parametrize("policy", AUG_POLICIES)
def test_augmentation_policies_repeat_with_the_seed(policy):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)
    runs = [[tf(image=img)["image"] for _ in range(6)] for tf in (train_transform(48, seed=3, policy=policy)
                                                                  for _ in range(2))]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert runs[0][0].shape == (3, 48, 48)
    varied = sum(not torch.equal(runs[0][0], r) for r in runs[0][1:])
    assert varied == 0 if policy == "none" else varied >= 3


def test_tensorboard_scalars(demo_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "a"
    train(demo_data.train_dir, out, Taxonomy.from_csv(demo_data.taxonomy), ModelConfig(**vars(TINY)),
          TrainConfig(epochs=2, batch_size=16, pretrained="none", tensorboard=True, export=False))
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    log = pd.read_csv(out / "log.csv")
    assert [e.value for e in events.Scalars("val_log_loss")] == pytest.approx(log["val_log_loss"].tolist(), rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--low-res", "32"], "go together"),
    (["--low-res", "32", "--low-res-epochs", "1", "--freeze-stages", "2", "--cache-views", "2"], "--cache-views 0"),
    (["--aug", "heavy"], "--aug must be"),
    (["--aug", "[light]"], "not '[light]'"),        # brackets in a message are text, not console markup
    (["--loss", "hinge"], "--loss must be"),
    (["--mixup", "-1"], "--mixup"),
    (["--swa-epochs", "9"], "--swa-epochs"),
    (["--layer-decay", "0"], "--layer-decay"),
    (["--cutmix", "1", "--batch-size", "15"], "even number"),
    (["--low-res", "64", "--low-res-epochs", "1"], "must be below --img-size 64"),
])
def test_recipe_flags_refused_in_one_line(flags, message, demo_data, tmp_path, capsys):
    code, _, err = run_cli("train", demo_data.train_dir, "--out", tmp_path / "a", "--model", "test_efficientnet",
                           "--pretrained", "none", "--img-size", "64", "--epochs", "3", *flags, capsys=capsys)
    assert code != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"class_a,class_b\nA,\n", "empty 'class_b' cell"),
    (b"first,second\nA,B\n", "must have columns class_a,class_b"),
    ("class_a,class_b\nCitro\u00ebn_C4,B\n".encode("latin-1"), "is not UTF-8"),
    (b"", "empty (0 bytes)"),
])
def test_class_pairs_file_refused_in_one_line(content, message, demo_data, tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    if content is not None:
        pairs.write_bytes(content)
    code, _, err = run_cli("train", demo_data.train_dir, "--out", tmp_path / "a", "--model", "test_efficientnet",
                           "--pretrained", "none", "--img-size", "64", "--epochs", "1", "--merge-classes", pairs,
                           capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a" / "model.safetensors").exists()


def test_the_cpu_preset_keeps_its_share_of_low_resolution_epochs():
    """`--preset cpu` is 12 of 18 epochs at 160 px: a run made shorter or longer keeps two thirds at low
    resolution (not refused for low-res epochs past its end); given flags still win."""
    from hier.training.config import configs
    shares = {e: (t.low_res, t.low_res_epochs) for e in (18, 6, 30, 2, 1) for t in [configs("cpu", epochs=e)[1]]}
    assert shares == {18: (160, 12), 6: (160, 4), 30: (160, 20), 2: (160, 1), 1: (0, 0)}
    assert configs("cpu", epochs=6, low_res_epochs=2)[1].low_res_epochs == 2
    assert configs("cpu")[0].trunk == "efficientnet_lite1" and configs("cpu-cached")[1].cache_views == 6


def test_class_pairs_named_like_missing_values_stay_names(tmp_path):
    from hier.data.split import load_equivalent_pairs
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("class_a,class_b\nNA,None\nnull,N/A\n", encoding="utf-8")
    assert load_equivalent_pairs(pairs) == [("NA", "None"), ("null", "N/A")]


def test_equivalent_classes_learned_as_one_and_split_in_submissions(demo_data, tmp_path, capsys):
    """Two classes the organiser scores as one: trained as the first, written as half each (their sum is
    what the merged class got), every other column as the artifact answers it."""
    pairs = tmp_path / "equivalent.csv"
    pairs.write_text("class_a,class_b\nAurora_Nova_2015_2018,Aurora_Nova_2019_2023\nAbsent_Class,Other_Absent\n",
                     encoding="utf-8")
    out = tmp_path / "a"
    code, _, err = run_cli("train", demo_data.train_dir, "--out", out, "--model", "test_efficientnet", "--pretrained",
                           "none", "--img-size", "64", "--epochs", "2", "--batch-size", "16",
                           "--merge-classes", pairs, "--no-export", capsys=capsys)
    assert code == 0, err
    err = " ".join(err.split())                       # the console wraps warnings at its width
    assert "1 class(es) learned as their equivalent" in err and "1 pair(s)" in err and "not merged" in err
    classes = Taxonomy.from_csv(out / "taxonomy.csv").classes
    assert len(classes) == 11 and "Aurora_Nova_2019_2023" not in classes and "Aurora_Nova_2015_2018" in classes
    assert artifact.read_config(out)["merged_classes"] == {"Aurora_Nova_2019_2023": "Aurora_Nova_2015_2018"}
    sub = tmp_path / "sub.csv"
    code, _, err = run_cli("predict", out, "--test-csv", demo_data.test_csv, "--sample-submission",
                           demo_data.sample_submission, "--out", sub, capsys=capsys)
    assert code == 0, err
    got = pd.read_csv(sub, encoding="utf-8-sig").set_index("ID")
    from hier.data import read_test_csv
    from hier.recognizer import Recognizer
    test = read_test_csv(demo_data.test_csv)
    probs = pd.DataFrame(Recognizer(out).predict_proba(test.paths), index=test.ids, columns=classes).loc[got.index]
    np.testing.assert_allclose(got["Aurora_Nova_2015_2018"], got["Aurora_Nova_2019_2023"])
    np.testing.assert_allclose(got["Aurora_Nova_2015_2018"] * 2, probs["Aurora_Nova_2015_2018"], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(got["Borealis_Lynx_2016_2018"], probs["Borealis_Lynx_2016_2018"], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-9)
    # int8 calibrates on the run's own split, merged classes included: its copy of the split once skipped
    # the merge and refused every --merge-classes artifact ("is in the data but not in the taxonomy")
    code, out_text, err = run_cli("export", out, "--int8", capsys=capsys)
    assert code == 0 and (out / "model.int8.onnx").is_file(), err
    from hier.export.int8 import split_photos
    _, _, labels = split_photos(out, None, Taxonomy.from_csv(out / "taxonomy.csv"))
    assert "Aurora_Nova_2019_2023" not in labels and "Aurora_Nova_2015_2018" in labels
