"""Ray Data with blip2cli.ray.Captioner against `blip2 caption`, on the same JPEGs, this machine.

    python benchmarks/ray_throughput.py [--model DIR] [--n 512] [--tokens 20] [--repeats 2]

Both start from a folder of JPEG files and end with one Parquet row per image on disk, in a
process that has to import torch and load the model:

* `blip2 caption DIR -o out.parquet` as a fresh process (`python -m blip2cli`);
* Ray Data on a local Ray that is already up (`ray.init` is not timed: a Ray user has a
  cluster): `read_binary_files` -> `map_batches(Captioner, concurrency=1, num_cpus=2)` ->
  `write_parquet`; the actor is a fresh worker process that imports torch and loads the model.

Same options for both: greedy, exactly --tokens new tokens (min = max), float32 on the CPU,
the library's default batch size and decode workers. Ray is started with 4 logical CPUs on
this 2-core machine so that the actor (2 CPUs: Ray gives it OMP_NUM_THREADS=2, the CLI's
torch threads) and the read tasks both get scheduled. Best of --repeats runs each,
alternating. Without --model a tiny random checkpoint is built (blip2cli.testing): its
model is cheap, so this measures what Ray adds around blip2, the target being Ray at 0.8x
of `blip2 caption`'s images/s or better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_cli(model: str, folder: Path, out: Path, tokens: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "blip2cli", "caption", str(folder), "--model", model,
                           "-o", str(out), "--num-beams", "1", "--max-new-tokens", str(tokens),
                           "--min-new-tokens", str(tokens), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"blip2 caption failed:\n{proc.stderr[-3000:]}")
    return seconds


def run_ray(model: str, folder: Path, out: Path, tokens: int, batch: int) -> float:
    import shutil

    import ray

    import blip2cli.ray

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ds = ray.data.read_binary_files(str(folder), include_paths=True)
    ds = ds.map_batches(blip2cli.ray.Captioner,
                        fn_constructor_kwargs={"model": model, "device": "cpu", "drop_image": True, "num_beams": 1,
                                               "max_new_tokens": tokens, "min_new_tokens": tokens},
                        concurrency=1, num_cpus=2, batch_size=batch)
    ds.write_parquet(str(out))
    return time.perf_counter() - t0


def captions_of(path: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    rows = [r for f in files for r in pq.read_table(f, columns=["path", "caption"]).to_pylist()]
    return {r["path"]: r["caption"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="rows per map_batches call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/ray")
    args = ap.parse_args()

    import ray
    import torch
    import transformers
    from input_pipeline import make_jpegs

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from blip2cli.testing import build_tiny_checkpoint

            model_dir = str(build_tiny_checkpoint(tmp / "tiny", "opt"))
        folder = tmp / "photos"
        folder.mkdir()
        make_jpegs(folder, (640, 480), args.n)

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        cli_times, ray_times = [], []
        for _ in range(args.repeats):
            cli_times.append(run_cli(model_dir, folder, tmp / "cli.parquet", args.tokens))
            ray_times.append(run_ray(model_dir, folder, tmp / "ray", args.tokens, args.batch))
        ray.shutdown()
        cli_caps, ray_caps = captions_of(tmp / "cli.parquet"), captions_of(tmp / "ray")
    load_after = os.getloadavg()
    same = sum(cli_caps.get(p) == c for p, c in ray_caps.items())
    t_cli, t_ray = min(cli_times), min(ray_times)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (no GPU), {platform.system()}",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "model": args.model or "tiny random OPT checkpoint (blip2cli.testing, seed 0)",
        "command": "python benchmarks/ray_throughput.py " + " ".join(sys.argv[1:]),
        "settings": f"{args.n} JPEGs 640x480, greedy, exactly {args.tokens} new tokens, float32, CPU; Ray: "
                    f"1 actor (num_cpus=2), map_batches batch_size={args.batch}; best of {args.repeats}",
    }
    result = {
        "blip2_caption_s": cli_times,
        "ray_data_s": ray_times,
        "blip2_images_per_s": args.n / t_cli,
        "ray_images_per_s": args.n / t_ray,
        "ray_vs_blip2": t_cli / t_ray,
        "captions_equal": f"{same}/{args.n}",
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "result": result}, indent=1) + "\n")
    lines = [
        "# Ray Data (blip2cli.ray.Captioner) vs `blip2 caption`, same JPEGs, this machine",
        "",
        *[f"- {k}: {v}" for k, v in meta.items()],
        "",
        "| path | seconds (each run) | images/s (best) |",
        "|---|---|---|",
        (f"| `blip2 caption DIR -o out.parquet` (fresh process) | {', '.join(f'{t:.1f}' for t in cli_times)} "
        f"| {args.n / t_cli:.1f} |"),
        (f"| Ray Data: read_binary_files -> map_batches(Captioner) -> write_parquet | "
        f"{', '.join(f'{t:.1f}' for t in ray_times)} | {args.n / t_ray:.1f} |"),
        "",
        (f"Ray at **{t_cli / t_ray:.2f}x** of `blip2 caption`'s throughput (target: 0.8x or better); captions "
        f"equal: {same}/{args.n}. Both include starting a process that imports torch and loads the model; "
        "the Ray cluster itself was up before the clock started."),
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
