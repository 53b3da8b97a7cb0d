"""The training photos' augmentation (``hier train --aug``), albumentations pipelines. Its own module so
that only training imports albumentations; evaluation's transform is ``hier.data.loading.EvalTransform``."""
from __future__ import annotations

import albumentations as A
from albumentations.pytorch import ToTensorV2

from hier.data.images import IMAGENET_MEAN, IMAGENET_STD
from hier.errors import HierError

AUG_POLICIES = ("none", "light", "seed", "randaug")


def train_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int | None = None,
                    policy: str = "light") -> A.Compose:
    """The training photos' augmentation (``hier train --aug``), whole-car square resize first:
    ``light`` (default): mild crop/flip/colour (cars are wide, a tight crop cuts off the badge);
    ``seed``: the 2025 Hecto seed notebooks' mix, up to half the photo cut from its borders, brightness /
    contrast, flip; ``randaug``: ``light`` plus two of RandAugment's operations at random (albumentations'
    ``SomeOf``, so ``seed`` still makes runs repeat); ``none``: resize only.
    With ``seed`` the augmentations repeat run to run (``hier train --seed``)."""
    if policy not in AUG_POLICIES:
        raise HierError(f"--aug must be one of {', '.join(AUG_POLICIES)}, not {policy!r}")
    size = (img_size, img_size)
    light = [A.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25)), A.HorizontalFlip(),
             A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8)]
    steps = {
        "none": [],
        "light": light,
        "seed": [A.RandomCropFromBorders(crop_left=0.25, crop_right=0.25, crop_top=0.25, crop_bottom=0.25, p=0.5),
                 A.Resize(img_size, img_size), A.HorizontalFlip(),
                 A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)],
        "randaug": light + [A.SomeOf([
            A.Affine(rotate=(-15, 15), p=1), A.Affine(shear=(-10, 10), p=1),
            A.Affine(translate_percent=(-0.1, 0.1), p=1), A.Posterize(num_bits=(4, 6), p=1),
            A.Solarize(threshold_range=(0.7, 1.0), p=1), A.Equalize(p=1), A.Sharpen(p=1),
            A.AutoContrast(p=1), A.RandomBrightnessContrast(0.3, 0.3, p=1), A.ToGray(p=1)], n=2)],
    }[policy]
    return A.Compose([A.Resize(img_size, img_size), *steps, A.Normalize(mean, std), ToTensorV2()], seed=seed)
