#!/usr/bin/env bash
# The GPU run of the throughput issue: one script, one device call, bounded, figures to $OUT.
#
# What it measures (benchmarks/gpu_run.py, one process per group, each under `timeout`):
#   opt     opt-2.7b shape, fp16, random weights, 640x480 JPEGs, greedy, exactly 20 new tokens,
#           files -> records on disk: batch 256 and 512, Q-Former in fp16, GPU JPEG decode, against
#           plain batched generate (batch 512, Q-Former as loaded, dynamic cache) and the documented
#           per-image loop; Q-Former fp16 vs fp32 token agreement on the full-size shape; 12 MP JPEGs
#           with GPU decode and with Pillow draft mode on 16 workers; beam 5 against plain beam 5;
#           Q-Former fp32 at batch 512; --compile (static cache) with its first-call cost.
#   decode  GPU JPEG decode vs Pillow (draft and full decode): max / mean abs pixel difference on
#           640x480, 12 MP and EXIF-rotated files; decode+resize throughput of each.
#   t5      flan-t5-xl shape in bf16 against plain batched generate.
#   q8, q4  opt-2.7b saved once in fp16 and loaded back 8-bit / 4-bit (bitsandbytes): img/s and
#           peak GPU memory, against the fp16 row of the opt group.
#   int8    opt-2.7b fp16 with --quantize int8 (torchao's int8 weight-only language-model layers,
#           quantized in memory as the loader's TorchAoConfig does): img/s and peak GPU memory.
#   serve   `blip2 serve -m DIR` (DIR: opt-2.7b fp16 random weights saved once, as q8/q4 load it) as a
#           subprocess on a free loopback port, --max-batch-size 64: 64 chat completions at once (a
#           640x480 JPEG data: URL each, temperature 0, exactly 20 tokens), then the same 64 one by one:
#           img/s both ways, the server's batch sizes (/metrics), every concurrent answer equal to its
#           one-by-one answer, the exit code after SIGTERM. The server ends with the group in every case.
# Output: $OUT/gpu.json (everything), $OUT/gpu.md (the table: card, versions, date, command),
# $OUT/gpu.log (the whole log). Copy them to benchmarks/results/ (gpu.json, gpu.md).
#
# Here, before the device call (the device's python3 is 3.12, x86-64; it has torch 2.11+cu130,
# transformers, accelerate, torchvision, typer, rich; no bitsandbytes), once:
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl bitsandbytes==0.50.2 torchao==0.18.0 uvicorn==0.55.0 starlette==1.10.0 h11==0.16.0 \
#       anyio==4.16.0 sniffio==1.3.1 idna==3.21
# (torchao for the int8 group; uvicorn, starlette and their pure-Python dependencies for the serve
# group; bitsandbytes 43 MB; its libbitsandbytes_cuda130.so matches the device's CUDA 13; torch, numpy, packaging,
# click, typing_extensions, which they need, are there). Then one device call:
#   run  command: "bash benchmarks/gpu.sh"   carry: [".whl"]   timeout_s: 590
# The script stops starting work after BLIP2_GPU_TOTAL_S seconds (default 540) and always writes
# the report (about 10 s after the last group). Time per group (`timeout`, LIMIT below): opt 270,
# decode 60, t5 90, int8 75, serve 110 (saving the 7.7 GB checkpoint ~25 s, server start, load and
# warm-up ~30 s, 64 at once ~3 s, 64 one by one ~20 s; the one-by-one round stops early, and says
# so, when the group's time runs short), q8 75, q4 75. The caps add up to more than 540: the
# expected run (opt uses its 270 s, the others end well before their caps) reaches serve with about
# 100 s left; q8 and q4 (bitsandbytes, supporting figures) come last and run only when the earlier
# groups leave time (BLIP2_GPU_TOTAL_S was 500 and serve was not there: 540 makes room for it). To redo only some groups (e.g. a second, shorter call while the machine is warm):
#   BLIP2_GPU_GROUPS="t5 q8" BLIP2_GPU_TOTAL_S=200 bash benchmarks/gpu.sh
#
# Tested on the CPU with tiny shapes (tiny random checkpoints, a few small images, Pillow
# standing in for nvJPEG, no bitsandbytes: the 8/4-bit groups take the save -> load route
# unquantized; serve: the tiny checkpoint, 8 requests, float32 on the CPU):
#   BLIP2_GPU_SMOKE=1 OUT=/tmp/gpu-smoke bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
SMOKE=${BLIP2_GPU_SMOKE:-0}
TOTAL=${BLIP2_GPU_TOTAL_S:-540}
GROUPS_TO_RUN=${BLIP2_GPU_GROUPS:-opt decode t5 int8 serve q8 q4}
WORK=${BLIP2_GPU_WORK:-/tmp/blip2-gpu}
START=$SECONDS
exec > >(tee "$OUT/gpu.log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 BLIP2_GPU_SMOKE=$SMOKE TOKENIZERS_PARALLELISM=false
PY=python3
if [ "$SMOKE" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ "$SMOKE" = 1 ]; then TOTAL=${BLIP2_GPU_TOTAL_S:-420}; fi

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK.gpu.txt" 2>&1 || true
else
  echo "no GPU (nvidia-smi not found)" > "$WORK.gpu.txt"
fi
cat "$WORK.gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), '| transformers', transformers.__version__)"
$PY -c "import torchvision; print('torchvision', torchvision.__version__)" 2>&1 | tail -1
$PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
$PY -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
rm -rf "$WORK" && mkdir -p "$WORK"

# Seconds each group may take at most (its `timeout`); the total cap cuts the later ones.
declare -A LIMIT=([opt]=270 [decode]=60 [t5]=90 [q8]=75 [q4]=75 [int8]=75 [serve]=110)
for g in $GROUPS_TO_RUN; do
  left=$(( TOTAL - (SECONDS - START) - 10 ))
  t=${LIMIT[$g]:-60}
  [ "$t" -gt "$left" ] && t=$left
  if [ "$t" -lt 25 ]; then
    echo "== $g: not run, ${left}s left of ${TOTAL}s"
    continue
  fi
  echo "== $g (at most ${t}s, $(( SECONDS - START ))s elapsed)"
  timeout -k 5 "$t" $PY benchmarks/gpu_run.py "$g" --work "$WORK" --deadline-s $(( t - 8 ))
  rc=$?
  [ $rc -ne 0 ] && echo "== $g exited $rc$( [ $rc -eq 124 ] && echo ' (timeout)')"
done

$PY benchmarks/gpu_report.py "$WORK" "$OUT" --gpu-txt "$WORK.gpu.txt" \
  --command "BLIP2_GPU_GROUPS=\"$GROUPS_TO_RUN\" BLIP2_GPU_TOTAL_S=$TOTAL bash benchmarks/gpu.sh"
echo "== done in $(( SECONDS - START ))s; files:"
ls -la "$OUT"
