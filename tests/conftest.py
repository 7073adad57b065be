"""Shared fixtures: tiny BLIP-2 checkpoints (built once per session) and example photos,
and the test tiers: every test that needs no tiny checkpoint (no ``tiny_opt``,
``tiny_t5`` or ``tiny_itm`` among its fixtures, directly or through another fixture)
and is not ``slow`` is marked ``unit``: ``pytest -m unit`` is the fast tier,
``pytest -m "not slow"`` adds the model tests, ``pytest`` runs everything (CI)."""

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


@pytest.fixture
def photos(tmp_path, example_images):
    """photos/{chelsea.png, coffee.png, sub/astronaut.png, sub/rocket.jpg} (a file may
    define its own ``photos``: that one wins there)."""
    import shutil

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    shutil.copy(example_images[0], root / "chelsea.png")
    shutil.copy(example_images[1], root / "coffee.png")
    shutil.copy(example_images[2], root / "sub" / "astronaut.png")
    shutil.copy(example_images[3], root / "sub" / "rocket.jpg")
    return root


@pytest.fixture(scope="module")
def loaded_opt(tiny_opt):
    """The tiny OPT checkpoint loaded on the CPU (once per test file)."""
    from blip2cli.loader import LoadOptions, load

    return load(LoadOptions(model=str(tiny_opt), device="cpu"))


@pytest.fixture(scope="module")
def loaded_t5(tiny_t5):
    """The tiny Flan-T5 checkpoint loaded on the CPU (once per test file)."""
    from blip2cli.loader import LoadOptions, load

    return load(LoadOptions(model=str(tiny_t5), device="cpu"))


CHECKPOINT_FIXTURES = frozenset({"tiny_opt", "tiny_t5", "tiny_itm"})


def _asks_for_a_checkpoint(function) -> bool:
    """A test that looks a fixture up by name (``request.getfixturevalue(f"tiny_{kind}")``:
    counted as a checkpoint, to be safe) or builds its own checkpoint
    (``build_tiny_checkpoint``): its fixture list does not show it."""
    import inspect

    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return "getfixturevalue(" in source or "build_tiny_checkpoint" in source


def pytest_collection_modifyitems(config, items):
    """Mark ``unit`` every test that needs no tiny checkpoint and is not ``slow``."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            continue
        if CHECKPOINT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            continue
        if _asks_for_a_checkpoint(getattr(item, "function", None)):
            continue
        item.add_marker(pytest.mark.unit)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the weights are loaded (test_guard, test_output_plan)."""

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("blip2cli.loader.load", no_load)


def pytest_sessionfinish(session, exitstatus):
    """Give worker threads the tests left behind (an interrupted pipeline's decode, a
    server's batcher) a moment to end: on Python 3.11-3.13 a daemon thread still inside
    torch's C++ code when the interpreter shuts down aborts the process (SIGABRT), which
    would turn a green run red after the last test. Threads stuck for good (a FIFO read)
    are left to the process's end; they never wake."""
    from blip2cli.workers import wait_for_threads

    wait_for_threads(3.0)
