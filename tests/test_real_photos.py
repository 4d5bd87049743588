"""The tiny base takes LoRA fine-tuning on real photos with their own captions and learns to tell them apart.

The photos are the ones scikit-image ships inside its wheel (read as files; nothing is downloaded). They look
nothing like the drawn shapes the base was pretrained on: this checks that its frozen vision side still
separates real images well enough for a LoRA on the language model to give each its own caption.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from vlmtune.config import TrainConfig
from vlmtune.data.images import open_image
from vlmtune.infer import Captioner
from vlmtune.training.run import train

pytestmark = pytest.mark.slow

PHOTOS = {
    "astronaut.png": "an astronaut in a white suit in front of a flag",
    "chelsea.png": "a ginger cat looking to the side",
    "coffee.png": "a cup of coffee on a saucer",
    "rocket.jpg": "a rocket on the launch pad",
    "motorcycle_left.png": "a red motorcycle in a garage",
    "hubble_deep_field.jpg": "many galaxies in deep space",
    "retina.jpg": "a photograph of a retina",
    "brick.png": "a grey brick wall",
}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """An imagefolder (metadata.jsonl + images), the layout users bring."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image (a dev dependency) is not installed")
    source = Path(spec.origin).parent / "data"
    folder = tmp_path_factory.mktemp("photos")
    with open(folder / "metadata.jsonl", "w") as meta:
        for name, caption in PHOTOS.items():
            open_image(source / name).save(folder / (Path(name).stem + ".png"))
            meta.write(json.dumps({"file_name": Path(name).stem + ".png", "text": caption}) + "\n")
    return folder


def test_lora_learns_a_caption_per_photo(photo_folder, tmp_path):
    run = train(
        TrainConfig(
            model="tiny",
            data=str(photo_folder),
            output=str(tmp_path / "run"),
            epochs=60,
            batch_size=8,
            lr=3e-3,
            lora_dropout=0.0,
            sample_every=0,
            num_samples=0,
            seed=0,
        )
    )
    captioner = Captioner.from_run(str(run))
    names = sorted(photo_folder.glob("*.png"))
    got = dict(zip([p.name for p in names], captioner.caption([open_image(p) for p in names]), strict=True))
    expected = {Path(n).stem + ".png": c for n, c in PHOTOS.items()}
    right = [n for n in got if got[n] == expected[n]]
    assert len(right) >= 7, got  # one slip allowed: 0.85M parameters, 64-pixel inputs
    assert len(set(got.values())) >= 7  # told apart, not one memorised caption for all
