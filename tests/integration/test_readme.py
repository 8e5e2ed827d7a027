"""The docs stay true: every ```bash and ```python block of README.md and docs/*.md is run as written, in
a fresh directory, with the real `vitscope` on the PATH — after the stand-ins below, which swap what a
user has and a test machine does not (official checkpoints, an ImageNet folder, a GPU, hours) for the
smallest thing of the same kind. The commands, flags and their order are the documents' own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.runs import image_folder

ROOT = Path(__file__).parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = "img_size=32&patch_size=8&embed_dim=32&depth=2&num_heads=4"

# (pattern, replacement), applied in order to each block's text. Documented stand-ins, nothing else:
STAND_INS: list[tuple[str, str]] = [
    # official checkpoints and timm weights -> an untrained tiny ViT / ResNet of the same role, seeded apart
    # ({q}: a quote in shell blocks, where "&" would end the command; nothing in Python strings)
    (r"moco-v3:vit-b-300ep\.pth\.tar", f"{{q}}random:vit_small_patch16_224?{TINY}&seed=1{{q}}"),
    (r"simmim:simmim_pretrain__vit_base__img224__800ep\.pth", f"{{q}}random:vit_small_patch16_224?{TINY}&seed=2{{q}}"),
    (r"mae:mae_pretrain_vit_base\.pth", f"{{q}}random:vit_small_patch16_224?{TINY}&seed=2{{q}}"),
    (r"timm:resnet50\?weights=resnet50\.a1_in1k\.safetensors", "random:resnet18"),
    # an untrained architecture at 224 px -> the same architecture at 32 px with 2 narrow blocks
    (r"random:(vit_\w+)(?=[\s\"'])", rf"{{q}}random:\1?{TINY}{{q}}"),
    # image folders on a user's disk -> a folder of 4 classes of 12 small PNGs
    (r"/data/(imagenet/val|val|train)\b", "{images}"),
    # hours of compute -> seconds: few images, steps, epochs; small batches; one CPU, two processes
    (r"--num-images \d+", "--num-images 24"),
    (
        r"AnalysisConfig\(num_images=\d+\)",
        "AnalysisConfig(num_images=24, probe_train_images=24, probe_epochs=5, noise_images=8)",
    ),
    (r"--steps \d+", "--steps 4"),
    (r"--epochs (100|400)\b", "--epochs 1"),
    (r"--epochs 150\b", "--epochs 2"),  # the README's extension: more epochs than the run before
    (r"--warmup-epochs 10\b", "--warmup-epochs 1"),
    (r"--batch-size \d+", "--batch-size 8"),
    (r"(vitscope (pretrain|finetune))\b", r"\1 --batch-size 8"),  # the default batch is larger than the folder
    (r"--track-every \d+", "--track-every 2 --track-images 8"),
    (r"--data fashion-mnist --epochs 10", "--data fashion-mnist --num-images 64 --num-test-images 32 --epochs 1"),
    (r"--device cuda", "--device cpu"),
    (r"--nproc_per_node=8", "--nproc_per_node=2"),
    (r"vitscope analyze\b", "vitscope analyze --probe-images 24 --probe-epochs 5 --noise-images 8"),
]

# What a block needs that another block of the same document makes (run first, in the same directory).
SETUP: dict[str, list[str]] = {
    "vitscope curves runs/simmim runs/moco": [
        f"vitscope pretrain --method {m} --model 'random:vit_tiny_patch16_224?{TINY}' --data fashion-mnist "
        f"--num-images 48 --steps 4 --batch-size 8 --track-every 2 --track-images 8 --out runs/{m}"
        for m in ("simmim", "moco")
    ]
    + [
        f"vitscope pretrain --method moco --model 'random:vit_tiny_patch16_224?{TINY}' --data fashion-mnist "
        f"--num-images 48 --epochs 2 --batch-size 8 --keep-every 6 --moco-t {t} --out runs/sweep/{name}"
        for name, t in (("base", "0.2"), ("tau01", "0.1"))
    ],
}


def blocks() -> list[tuple[str, str, str]]:
    """(id, language, text) of every bash and python block of the documents."""
    found = []
    for doc in DOCUMENTS:
        for number, (language, text) in enumerate(re.findall(r"```(bash|python)\n(.*?)```", doc.read_text(), re.S)):
            found.append((f"{doc.name}:{number}:{language}", language, text))
    return found


def stand_in(text: str, images: Path, shell: bool) -> str:
    for pattern, replacement in STAND_INS:
        text = re.sub(pattern, replacement, text)
    return text.replace("{images}", str(images)).replace("{q}", "'" if shell else "")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_every_document_has_runnable_blocks_and_the_readme_every_command():
    names = {re.sub(r"\\\n", " ", text) for _, _, text in blocks()}
    joined = " ".join(names)
    for command in ("capture", "analyze", "claims", "report", "pretrain", "finetune", "curves"):
        assert f"vitscope {command} " in joined or f"-m vitscope {command} " in joined, command
    commands = [
        line.split("#", 1)[0] for _, language, text in blocks() if language == "bash" for line in text.splitlines()
    ]
    assert not [line for line in commands if "..." in line], "an elided command cannot be run"


@pytest.mark.slow
@pytest.mark.parametrize("name,language,text", blocks(), ids=[b[0] for b in blocks()])
def test_block_runs(name, language, text, tmp_path):
    images = image_folder(tmp_path / "images", classes=4, per_class=12, size=40)
    work = tmp_path / "work"
    work.mkdir()
    if text.lstrip().startswith("make "):  # the Makefile's targets set up a venv and run this suite: dry run
        argv = ["make", "-n", "-C", str(ROOT), *re.findall(r"^make (\w+)", text, re.M)]
    elif language == "bash":
        setup = [line for key, lines in SETUP.items() if key in text for line in lines]
        argv = ["bash", "-euo", "pipefail", "-c", "\n".join([*setup, stand_in(text, images, shell=True)])]
    else:
        argv = [sys.executable, "-c", stand_in(text, images, shell=False)]
    done = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"{name}\n--- ran:\n{argv[-1]}\n--- stdout:\n{done.stdout[-3000:]}\n--- stderr:\n{done.stderr[-3000:]}"
    )
