"""The library is a good guest: ``blip2cli.load()`` and its calls leave the host's
logging (every logger's level, handlers, ``propagate``, ``disabled``), warnings
filters and environment as they were; quieting is the CLI's choice, or an opt-in
(``blip2cli.quiet()``). And ``ImageError`` is one of our errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import blip2cli

ROOT = Path(__file__).resolve().parents[1]

# A host program: its own logging set up, the libraries imported (so their loggers
# exist and a change to them shows), its own warnings filters. Then blip2 is used.
HOST = r'''
import json, logging, os, sys, warnings

logging.basicConfig(level=logging.INFO, format="host: %(message)s")
import numpy, PIL.Image, torch, transformers, huggingface_hub  # the host uses them too
# Importing transformers' BLIP-2 imports torch._dynamo, torchao, sympy, ..., which add
# warnings filters and TORCHINDUCTOR_CACHE_DIR themselves: imported here, before the
# snapshot, so that what changes after it is what blip2 did.
from transformers import AutoProcessor, Blip2ForConditionalGeneration
for name in ("accelerate", "bitsandbytes", "transformers", "huggingface_hub", "PIL", "host.app"):
    logging.getLogger(name)
warnings.simplefilter("default")

def snapshot():
    loggers = {"<root>": logging.getLogger()}
    loggers.update((n, l) for n, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger))
    state = {name: [l.level, [repr(h) + str(id(h)) for h in l.handlers], l.propagate, l.disabled]
             for name, l in loggers.items()}
    return {"loggers": state, "warnings": [repr(f) for f in warnings.filters], "environ": dict(os.environ)}

before = snapshot()
import blip2cli

model = blip2cli.load(sys.argv[1], device="cpu")
model.caption(sys.argv[2], num_beams=1, max_new_tokens=3)
records = list(model.caption_records([sys.argv[2], b""], num_beams=1, max_new_tokens=3))
assert [bool(r["error"]) for r in records] == [False, True]
after = snapshot()
changed = {name: [before["loggers"][name], after["loggers"].get(name)]
           for name in before["loggers"] if before["loggers"][name] != after["loggers"].get(name)}
blip2cli.quiet()  # the opt-in: now transformers is quiet
quieted = logging.getLogger("transformers").level
print(json.dumps({"changed": changed, "warnings": before["warnings"] == after["warnings"],
                  "environ": before["environ"] == after["environ"],
                  "environ_diff": sorted(set(before["environ"].items()) ^ set(after["environ"].items())),
                  "warnings_diff": [f for f in after["warnings"] if f not in before["warnings"]],
                  "quieted": quieted}))
'''


def test_load_and_calls_leave_the_hosts_logging_warnings_and_environment(tiny_opt, example_images):
    proc = subprocess.run([sys.executable, "-c", HOST, str(tiny_opt), str(example_images[0])], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["changed"] == {}, got["changed"]
    assert got["warnings"], got["warnings_diff"]
    assert got["environ"], got["environ_diff"]
    assert got["quieted"] == 40  # blip2cli.quiet(): logging.ERROR on transformers


def test_image_error_is_one_of_our_errors(model_opt, example_images):
    assert issubclass(blip2cli.ImageError, blip2cli.Blip2Error)
    with pytest.raises(blip2cli.Blip2Error) as info:
        model_opt.caption(b"not an image", num_beams=1)
    assert isinstance(info.value, blip2cli.ImageError) and info.value.exit_code == 1


@pytest.fixture(scope="module")
def model_opt(tiny_opt):
    return blip2cli.load(tiny_opt, device="cpu")


def test_images_is_no_facade():
    import blip2cli.images as images

    for name in ("ImageSpec", "read_image_file", "MAX_DECODE_BYTES", "to_pixel_values", "_pil", "_lut"):
        assert name not in images.__all__
    assert not hasattr(images, "read_image_file") and not hasattr(images, "MAX_DECODE_BYTES")
