"""examples/detection: a fast smoke run of the real script under the launcher, plus its data and argument handling.

The smoke run is the `make demo` job cut down (8 steps, 64-pixel images, 4 validation images) on 2 gloo ranks with
SyncBatchNorm through the NormConversion callback. It checks that the loss falls and that every output is written;
whether the model reaches a good mAP is the demo's job (minutes), not CI's.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "detection"
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield {name: importlib.import_module(name) for name in ("data", "model", "train")}
    finally:
        sys.path.remove(str(EXAMPLE))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("detection") / "sync"
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("PET_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "syncnorm.launch", "--nproc-per-node", "2", str(EXAMPLE / "train.py"),
           "--steps", "8", "--image-size", "64", "--val-images", "4", "--log-every", "1", "--val-every", "3", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    return proc, out


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_succeeds_with_synchronised_batchnorm(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8 and summary["norm"] == "sync"
    # every BatchNorm2d of the ResNet-18 trunk was converted by the NormConversion callback, nothing else is a norm
    assert summary["norm_layers"] == {"SyncBatchNorm": 20}


def test_smoke_run_loss_decreases(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0
    losses = [float(r["train/loss"]) for r in _rows(out / "metrics.csv") if r.get("train/loss")]
    assert len(losses) == 8
    half = len(losses) // 2
    assert losses[0] > 1.5  # ~log(4) + log(2): an untrained classifier and objectness head
    assert sum(losses[half:]) / half < 0.75 * sum(losses[:half]) / half, losses


def test_smoke_run_writes_and_reports_its_outputs(smoke_run):
    from PIL import Image

    proc, out = smoke_run
    assert proc.returncode == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = _rows(out / "metrics.csv")
    maps = [r for r in rows if r.get("val/map")]
    assert [int(e["step"]) for e in summary["evaluations"]] == [3, 6, 8]  # the last one after fit (8 % 3 != 0)
    assert len(maps) == 3 and all(0.0 <= float(r["val/map"]) <= 1.0 for r in maps)
    assert set(summary["untrained"]) == {"map", "map_50"} and summary["final"]["step"] == 8
    for name in ("predictions.png", "predictions_untrained.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.width >= 2 * 64 and image.height >= 64  # rank 0 draws its 2 of the 4 validation images
    assert f"outputs in {out}" in proc.stdout and "predictions.png" in proc.stdout
    assert "mAP: untrained" in proc.stdout


# ------------------------------------------------------------------------------------------- in process, no launch

def test_dataset_is_deterministic_and_boxes_fit(example):
    data = example["data"]
    ds = data.SyntheticShapes(16, image_size=96, seed=3)
    for i in range(len(ds)):
        image, target = ds[i]
        again, target2 = data.SyntheticShapes(16, image_size=96, seed=3)[i]
        assert torch.equal(image, again) and torch.equal(target["boxes"], target2["boxes"])
        assert image.shape == (3, 96, 96) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        boxes, labels = target["boxes"], target["labels"]
        assert 1 <= len(boxes) == len(labels) <= 3
        assert ((labels >= 1) & (labels < len(data.CLASSES))).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes.min() >= 0 and boxes.max() <= 96
        # the box is the drawn shape: pixels inside it differ from the background more than outside
        x1, y1, x2, y2 = boxes[0].round().int().tolist()
        inside = image[:, y1 + 2:y2 - 2, x1 + 2:x2 - 2]
        assert (inside.max(dim=0).values > 0.5).any()
    assert not torch.equal(ds[0][0], data.SyntheticShapes(16, image_size=96, seed=4)[0][0])
    with pytest.raises(IndexError):
        ds[16]


def test_detector_keeps_trainable_batchnorm_and_runs_both_modes(example):
    model = example["model"].build_detector(4, 64)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 20 and all(m.weight.requires_grad for m in bns)
    assert not any("Frozen" in type(m).__name__ for m in model.modules())
    ds = example["data"].SyntheticShapes(2, image_size=64)
    images, targets = example["data"].collate([ds[0], ds[1]])
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    model.eval()
    with torch.no_grad():
        predictions = model(images)
    assert len(predictions) == 2 and set(predictions[0]) == {"boxes", "labels", "scores"}


def test_world_size_mismatch_is_a_clear_error(example, monkeypatch):
    train = example["train"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.resolve_layout(train.parse_args([])) == (2, 1)
    with pytest.raises(ValueError, match=r"devices\*num_nodes = 1\*1 = 1 .* WORLD_SIZE=2"):
        train.resolve_layout(train.parse_args(["--devices", "1"]))


@pytest.mark.parametrize("argv", [["--norm", "layer"], ["--steps", "0"], ["--image-size", "16"]])
def test_bad_example_arguments_exit_2(example, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        example["train"].parse_args(argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_every_norm_choice_has_callbacks(example):
    train = example["train"]
    assert train.norm_callbacks("batch", 100) == []
    for norm in train.NORMS:
        if norm != "batch":
            callbacks = train.norm_callbacks(norm, 100)
            assert type(callbacks[0]).__name__ == "NormConversion"
