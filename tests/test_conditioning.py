"""The fine-tuned model looks at the image: the failure the seed recipe has on transformers >= 4.47."""

import pytest
import torch
from datasets import load_from_disk

from vlmtune.demo import compare
from vlmtune.infer import Captioner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_split(football):
    return load_from_disk(football)["test"]


def test_captions_of_different_images_differ(demo_run, test_split):
    captions = Captioner.from_run(demo_run).caption([r["image"] for r in test_split])
    assert len(set(captions)) >= len(captions) // 2, captions


def test_loss_with_real_image_is_lower_than_with_blank(demo_run, test_split):
    from PIL import Image

    captioner = Captioner.from_run(demo_run)
    family, processor, model = captioner.family, captioner.processor, captioner.model
    images = [r["image"].convert("RGB") for r in test_split]
    blank = [Image.new("RGB", im.size, (128, 128, 128)) for im in images]
    texts = list(test_split["text"])

    def loss(imgs):
        batch = family.encode(processor, imgs, [""] * len(imgs), texts, max_length=48, padding_side="right")
        with torch.no_grad():
            return model(**batch).loss.item()

    real, without = loss(images), loss(blank)
    assert real < 0.5 * without, (real, without)


def test_fine_tuned_beats_base_on_test_split(demo_run, test_split):
    mean = compare(demo_run, test_split)["mean"]
    assert mean["tuned_token_acc"] > mean["base_token_acc"] + 0.3, mean
    assert mean["tuned_exact"] > mean["base_exact"], mean
