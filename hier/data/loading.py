"""Photos into batches: the evaluation transform (resize, centre, normalise: albumentations' pixels,
without importing it), the dataset and the loader every forward pass uses."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from hier.data.images import IMAGENET_MEAN, IMAGENET_STD, to_rgb


class EvalTransform:
    """The evaluation photos' transform: square resize (OpenCV bilinear), ImageNet normalisation, CHW
    tensor. The same pixels as albumentations' ``Compose([Resize, Normalize, ToTensorV2])`` (a test
    checks it) and the same call (``transform(image=array)["image"]``), written here so that predicting
    does not import albumentations and the scipy it pulls in (about a second of every command's start)."""

    def __init__(self, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.img_size = img_size
        self.mean = np.asarray(mean, np.float32) * 255
        self.inv_std = 1 / (np.asarray(std, np.float32) * 255)

    def __call__(self, *, image: np.ndarray) -> dict:
        if image.shape[:2] != (self.img_size, self.img_size):
            image = cv2.resize(image, (self.img_size, self.img_size), interpolation=cv2.INTER_LINEAR)
        x = (image.astype(np.float32) - self.mean) * self.inv_std
        return {"image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))}


def eval_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> EvalTransform:
    return EvalTransform(img_size, mean, std)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label index) pairs; label -1 where there is none (test images). Images are paths,
    PIL images or arrays (``to_rgb``)."""

    def __init__(self, images: list, targets: list[int] | None, transform, decode_size: int | None = None):
        self.images, self.transform, self.decode_size = images, transform, decode_size
        self.targets = targets if targets is not None else [-1] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(image=to_rgb(self.images[i], self.decode_size))["image"], self.targets[i]


def _reseed_worker(_: int) -> None:
    """Each worker holds a copy of a seeded transform; give each its own (still reproducible) seed."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if getattr(transform, "seed", None) is not None:
        transform.set_random_seed(info.seed % 2**32)


def loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool = False,
           workers: int = 0, drop_last: bool = False, sampler=None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       sampler=sampler,
                                       drop_last=drop_last, persistent_workers=workers > 0,
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=_reseed_worker)
