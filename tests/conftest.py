"""Shared fixtures: a small synthetic pool over real bundled images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def _images(dst: Path) -> list[str]:
    import skimage.data
    from pydicom.data import get_testdata_file

    dst.mkdir(parents=True, exist_ok=True)
    sk = Path(skimage.data.__file__).parent
    names = []
    for src in (sk / "retina.jpg", sk / "ihc.png", sk / "cell.png"):
        shutil.copy(src, dst / src.name)
        names.append(src.name)
    shutil.copy(get_testdata_file("CT_small.dcm"), dst / "ct.dcm")
    names.append("ct.dcm")
    return names


GOOD = (
    "The lesion shows {f} consistent with the caption's finding in the {o}, measuring about 2 cm."
)
BAD = "I cannot tell."


def write_pool(root: Path, n_per_image: int = 6) -> dict[str, Path]:
    """A pool of candidates whose rating follows answer quality, plus clinician pairs."""
    images = _images(root / "images")
    figures, cands, ratings, prefs = [], [], [], []
    for k, img in enumerate(images):
        pid = f"fig{k}"
        figures.append(
            {
                "pair_id": pid,
                "fig_caption": f"Figure {k}: image of organ {k} with finding {k}.",
                "fig_label": f"Figure {k}",
                "in_text_mention": [{"tokens": f"As shown in Figure {k}, finding {k}."}],
                "domain": {"ct_scan": img.endswith(".dcm")},
            }
        )
        for j in range(n_per_image):
            good = j % 2 == 0
            answer = GOOD.format(f=f"finding {k}", o=f"organ {k}") if good else BAD
            cid = f"{pid}-c{j}"
            cands.append(
                {
                    "id": cid,
                    "image": img,
                    "pair_id": pid,
                    "conversations": [
                        {"from": "human", "value": f"<image>\nWhat is seen? ({j})"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
            ratings.append(
                {"candidate_id": cid, "score": 8 + j % 3 if good else j % 3, "judge": "t"}
            )
        for j in range(3):
            prefs.append(
                {
                    "id": f"{pid}-p{j}",
                    "image": img,
                    "question": f"What is seen? (p{j})",
                    "preferred": GOOD.format(f=f"finding {k}", o=f"organ {k}"),
                    "rejected": BAD + f" ({j})",
                    "pair_id": pid,
                }
            )
    paths = {}
    for name, rows in (
        ("figures", figures),
        ("candidates", cands),
        ("ratings", ratings),
        ("preferences", prefs),
    ):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["image_root"] = root / "images"
    return paths


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Path]:
    return write_pool(tmp_path / "pool")
