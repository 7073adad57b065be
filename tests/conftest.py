"""Shared fixtures: tiny BLIP-2 checkpoints (built once per session) and example photos."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLE_IMAGES_DIR = Path(__file__).parents[1] / "examples" / "images"
EXAMPLE_IMAGE_NAMES = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")


def _build(tmp_path_factory, kind: str) -> Path:
    from blip2cli.testing import build_tiny_checkpoint

    # build_tiny_checkpoint verifies the saved folder: two different images give
    # different tokens (embeddings for "itm"), so no test runs on a blind model.
    return build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{kind}"), kind, seed=0)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> Path:
    """Folder of a tiny random Blip2ForConditionalGeneration with an OPT decoder."""
    return _build(tmp_path_factory, "opt")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """Folder of a tiny random Blip2ForConditionalGeneration with a T5 text model."""
    return _build(tmp_path_factory, "t5")


@pytest.fixture(scope="session")
def tiny_itm(tmp_path_factory) -> Path:
    """Folder of a tiny random Blip2ForImageTextRetrieval."""
    return _build(tmp_path_factory, "itm")


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    """The four example photos (cat, coffee, astronaut, rocket): different sizes, RGB, PNG and JPEG."""
    paths = [EXAMPLE_IMAGES_DIR / name for name in EXAMPLE_IMAGE_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.fail(f"example images missing: {missing}")
    return paths
