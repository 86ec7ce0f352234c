#!/usr/bin/env bash
# The GPU path end to end, in a few minutes on one GPU: run it first on a new machine.
#
#     bash bench/gpu_smoke.sh                 # CUDA (one GPU; with 2+ GPUs also an FSDP step under torchrun)
#     DEVICE=cpu bash bench/gpu_smoke.sh      # the same steps on the CPU, to check the script itself
#
# A small random Llama with grouped-query attention (the tiny model's shapes: 4 heads, 2 key/value
# heads) in a temporary Hugging Face directory, then: SFT steps (full and LoRA) and DPO steps in
# bfloat16 (the first DPO loss must be ln 2), a short exploration, logits on the device against the
# CPU in float32, whether the training attention runs FlashAttention, and decode tokens/s.
# Every check prints one line: "ok ...", or "FAIL ..." and the script stops.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
step() { echo "== $1 ($((SECONDS - START)) s)"; }
run() { "$@" > "$TMP/log" 2>&1 || { echo "FAIL $*"; tail -n 20 "$TMP/log"; exit 1; }; }
last_loss() { python -c "import json, sys; print([r for r in map(json.loads, open(sys.argv[1])) if 'loss' in r][-1])" "$1"; }
GPUS=$(python -c "import torch; print(torch.cuda.device_count() if '$DEVICE' == 'cuda' else 0)")
python -c "import torch, sys; sys.exit(0 if '$DEVICE' != 'cuda' or torch.cuda.is_available() else 1)" \
    || { echo "FAIL no CUDA device (run with DEVICE=cpu to check the script on the CPU)"; exit 1; }

step "a random GQA Llama and the science data"
run python -m eto_ref.tiny --out "$TMP/model"
run python -m envs.write_expert_data --env science --split train --limit 32 --out "$TMP/sft.json"
COMMON=(--no-progress --device "$DEVICE" --dtype "$DTYPE" --max-len 1024)

step "SFT, full fine-tuning, 3 steps"
run python train.py --stage sft --model "$TMP/model" --data "$TMP/sft.json" --out "$TMP/sft" --max-steps 3 \
    --batch-size 4 --micro-batch-size 2 --max-examples 16 --preset tiny "${COMMON[@]}"
echo "ok SFT full: $(last_loss "$TMP/sft/metrics.jsonl")"

step "SFT, LoRA r8, 3 steps"
run python train.py --stage sft --model "$TMP/model" --data "$TMP/sft.json" --out "$TMP/sft-lora" --max-steps 3 \
    --batch-size 4 --micro-batch-size 2 --max-examples 16 --lora-rank 8 --preset tiny "${COMMON[@]}"
echo "ok SFT LoRA: $(last_loss "$TMP/sft-lora/metrics.jsonl")"

step "exploration of 8 training tasks, pairs"
run python explore.py --model "$TMP/sft/final" --env science --split train --limit 8 --max-steps 3 \
    --batch-size 8 --max-new-tokens 32 --device "$DEVICE" --dtype "$DTYPE" --out "$TMP/explore" --no-progress
echo "ok exploration: $(python -c "import json; print(len(json.load(open('$TMP/explore/pairs.json'))), 'pairs')")"

step "DPO, 2 steps: the first loss is ln 2"
run python train.py --stage eto --model "$TMP/sft/final" --pairs "$TMP/explore/pairs.json" --out "$TMP/dpo" \
    --max-steps 2 --batch-size 2 --micro-batch-size 1 --preset tiny "${COMMON[@]}"
python - "$TMP/dpo/metrics.jsonl" <<'EOF'
import json, math, sys
first = next(r for r in map(json.loads, open(sys.argv[1])) if "loss" in r)
ok = abs(first["dpo_loss"] - math.log(2)) < 1e-2  # the policy is its own reference at step 1
print(("ok" if ok else "FAIL"), f"DPO first loss {first['dpo_loss']:.5f} (ln 2 = {math.log(2):.5f})")
sys.exit(0 if ok else 1)
EOF

step "logits on the device against the CPU in float32; the training attention kernel; decode speed"
python - "$TMP/sft/final" "$DEVICE" <<'EOF'
import sys, time
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from eto_ref.checkpoint import load_model
from eto_ref.sampler import SamplingConfig, generate
from eto_ref.trainer import scored_logprobs

path, device = sys.argv[1], torch.device(sys.argv[2])
cpu = load_model(path, torch.float32, torch.device("cpu")).eval()
model = load_model(path, torch.float32, device).eval()
ids = torch.randint(0, cpu.config.vocab_size, (2, 64))
with torch.no_grad():
    ref = cpu(ids)  # (B, T, V)
    got = model(ids.to(device)).cpu()
err = (got - ref).abs().max().item()
print(("ok" if err < 1e-3 else "FAIL"), f"float32 logits, {device} vs cpu: max abs difference {err:.2e}")
if err >= 1e-3:
    sys.exit(1)
batch = {"input_ids": ids.to(device), "attention_mask": torch.ones(2, 64, dtype=torch.bool, device=device),
         "loss_mask": torch.ones(2, 64, dtype=torch.bool, device=device), "shared_prefix": 0}
if device.type == "cuda":
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            scored_logprobs(model.train(), batch).sum().backward()
        print("ok the training forward and backward run with FlashAttention alone")
    except RuntimeError as e:
        print(f"FAIL FlashAttention refused the training attention: {str(e).splitlines()[0]}")
        sys.exit(1)
model = load_model(path, torch.bfloat16 if device.type == "cuda" else torch.float32, device).eval()
prompts = [torch.randint(0, cpu.config.vocab_size, (32,)).tolist() for _ in range(16)]
generate(model, prompts, SamplingConfig(max_new_tokens=8))  # warm-up
if device.type == "cuda":
    torch.cuda.synchronize()
t = time.perf_counter()
outs = generate(model, prompts, SamplingConfig(max_new_tokens=128))
if device.type == "cuda":
    torch.cuda.synchronize()
seconds, tokens = time.perf_counter() - t, sum(len(o.tokens) for o in outs)
print(f"ok decode: {tokens} tokens over 16 rows in {seconds:.2f} s ({tokens / seconds:.0f} tokens/s)")
if device.type == "cuda":  # a decode step's forward must not wait for the GPU (the sampler's token read is the one sync)
    from eto_ref.kv_cache import KVCache
    cache = KVCache(model.config, 16, 256, device=device, dtype=torch.bfloat16)
    host = lambda T: torch.ones(16, T, dtype=torch.bool)  # the sampler's masks: built on the host
    with torch.no_grad():
        model.next_token_logits(torch.zeros(16, 32, dtype=torch.long, device=device), host(32), cache,
                                torch.full((16,), 31, device=device))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                model.next_token_logits(torch.zeros(16, 1, dtype=torch.long, device=device), host(1), cache,
                                        torch.zeros(16, dtype=torch.long, device=device))
            print("ok a decode step's forward runs without a device-to-host synchronisation")
        except RuntimeError as e:
            print(f"FAIL a decode step synchronised with the GPU: {str(e).splitlines()[0]}")
            sys.exit(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
EOF

if [ "$GPUS" -ge 2 ]; then
    step "torchrun on 2 GPUs: an FSDP SFT step, and the ETO loop's device placement"
    run torchrun --nproc_per_node=2 train.py --stage sft --model "$TMP/model" --data "$TMP/sft.json" \
        --out "$TMP/sft-fsdp" --max-steps 2 --batch-size 4 --micro-batch-size 1 --max-examples 8 --fsdp \
        --preset tiny "${COMMON[@]}"
    echo "ok FSDP SFT: $(last_loss "$TMP/sft-fsdp/metrics.jsonl")"
    cat > "$TMP/placement.py" <<'EOF'
import os, torch
from eto_ref.exploration import load_policy
policy, _ = load_policy(os.environ["MODEL"], "auto", "bfloat16")  # as train.py --stage eto loads it, before
where = next(policy.parameters()).device                         # the process group exists
expected = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
print(("ok" if where == expected else "FAIL"), f"rank {os.environ['RANK']}: the policy is on {where}")
raise SystemExit(0 if where == expected else 1)
EOF
    MODEL="$TMP/sft/final" torchrun --nproc_per_node=2 "$TMP/placement.py"
fi
step "done"
