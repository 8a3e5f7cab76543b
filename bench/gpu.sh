#!/usr/bin/env bash
# The prepared GPU run (one script, about 6 minutes on an H100/H200): every bench command at the anchor config
# (dim 512, depth 12, heads 8x64, text 64, image 16x16 of 512, batch 64) and dalle-pytorch 1.6.6 beside it, into one JSON.
#   on this machine first: bench/fetch_wheels.sh                     (the GPU machine has no package index)
#   then, through the device tool:  carry [".whl"],  command "bash bench/gpu.sh"   (writes $OUT/gpu.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" || true
DP_OFFLINE=1 bash bench/install_dalle_pytorch.sh "$out/dp-venv" > "$out/install.log" 2>&1
b="python -m dalle_course.cli bench"
run() { name=$1; shift; echo "== $name"; timeout 150 $b "$@" --device cuda --json "$out/$name.json" || echo "$name failed ($?)"; }
run train_causal train --config anchor --mask causal --steps 20
run train_dalle_sdpa train --config anchor --mask dalle --steps 20
run train_dalle_flex train --config anchor --mask dalle --attention flex --steps 20
run train_causal_compile train --config anchor --mask causal --steps 20 --compile
run generate_b64 generate --config anchor --batch-size 64 --repeats 2 --compile
run tokenizer_dvae tokenizer --kind dvae-dalle --preset gpu-mdmnist --image-size 128 --batch-size 64
timeout 240 python bench/side_by_side.py --dalle-pytorch-python "$out/dp-venv/bin/python" --config anchor --device cuda \
  --threads 16 --steps 20 --warmup 5 --repeats 1 --generate-batches 64 --compile --out "$out/side_by_side.json" || echo "side by side failed"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob('*.json')) if p.name != 'gpu.json'}
res['gpu'] = (out / 'gpu.txt').read_text().strip() if (out / 'gpu.txt').exists() else None
(out / 'gpu.json').write_text(json.dumps(res, indent=1)); print('wrote', out / 'gpu.json', 'with', ', '.join(res))
PY
