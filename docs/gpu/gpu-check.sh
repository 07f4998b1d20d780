#!/bin/bash
# The GPU check recorded in docs/gpu/README.md: NVML through the agent, then the candle backend
# with --cuda against the same backend on the CPU, loaded by the pacer. Run as root next to the
# three release binaries (tokenflow-backend built with `--features cuda`); results go to $OUT.
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
set -x
uname -r; nproc
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
CUBLAS=$(find / -xdev -name 'libcublas.so.13' 2>/dev/null | head -1)
export LD_LIBRARY_PATH=$(dirname "$CUBLAS"):$LD_LIBRARY_PATH
ls "$(dirname "$CUBLAS")" | head -30
./tokenflow-agent --gpu-check | tee "$OUT/gpu-check.json"
ldd ./tokenflow-backend | grep -i "cu\|nvrtc\|not found"
./tokenflow-backend init-model --size small --out /tmp/small
./tokenflow-backend init-model --size tiny --out /tmp/tiny
RUST_LOG=info ./tokenflow-backend serve --model /tmp/small --listen 127.0.0.1:8000 --cuda --max-running 64 --max-waiting 256 > "$OUT/backend-cuda.log" 2>&1 &
RUST_LOG=warn ./tokenflow-backend serve --model /tmp/small --listen 127.0.0.1:8001 --max-running 64 --max-waiting 256 > "$OUT/backend-cpu.log" 2>&1 &
for p in 8000 8001; do for i in $(seq 100); do curl -sf 127.0.0.1:$p/health >/dev/null && break; sleep 0.3; done; done
curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' -d '{"model":"small","prompt":"hello GPU","max_tokens":8,"seed":1}'; echo
curl -s 127.0.0.1:8001/v1/completions -H 'content-type: application/json' -d '{"model":"small","prompt":"hello GPU","max_tokens":8,"seed":1}'; echo
# the agent's full loop with NVML while the GPU backend is loaded
./tokenflow-agent --node-id h100 --port 8000 --duration 40s --metrics-addr off --sink stdout > "$OUT/windows.jsonl" 2> "$OUT/agent.err" &
AG=$!
for u in 1 16 64; do
  ./tokenflow-pacer run --target http://127.0.0.1:8000 --model small --users $u --duration 10s --max-tokens 32 --json > "$OUT/cuda-$u.json" 2>/dev/null
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('cuda users', sys.argv[2], 'tok/s', round(s['tokens_per_s']), 'ttft p50', s['ttft']['p50_ms'], 'p99', s['ttft']['p99_ms'])" "$OUT/cuda-$u.json" $u
done
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
wait $AG; echo agent exit $?
tail -5 "$OUT/agent.err"
for u in 1 16 64; do
  ./tokenflow-pacer run --target http://127.0.0.1:8001 --model small --users $u --duration 10s --max-tokens 32 --json > "$OUT/cpu-$u.json" 2>/dev/null
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('cpu users', sys.argv[2], 'tok/s', round(s['tokens_per_s']), 'ttft p50', s['ttft']['p50_ms'], 'p99', s['ttft']['p99_ms'])" "$OUT/cpu-$u.json" $u
done
python3 - "$OUT/windows.jsonl" <<'PY'
import json,sys
ws=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(len(ws),'windows')
for w in ws[::8]:
    g=w.get('gpu',{}); d=(g.get('devices') or [{}])[0]
    print({k:d.get(k) for k in ('name','utilization_percent','memory_used_bytes','power_watts','sm_clock_mhz','temperature_celsius','processes')}, 'flows', len(w.get('flows',[])), 'active', w['node'].get('active_flows'), 'rtt', w['node'].get('rtt'))
PY
tail -3 "$OUT/backend-cuda.log"
