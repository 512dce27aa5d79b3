#!/usr/bin/env bash
# Growth at CPU scale, the follow-up to bench_ki_convergence.py's grown arms (issue 26): what the literature says
# matters after growth, one setting at a time, GPT, seed 1.
#
#   bash benchmarks/probe_growth.sh BENCH_WORKDIR OUT_DIR [ARM ...]
#
# BENCH_WORKDIR is a bench_ki_convergence.py --families gpt workdir: its data/ (corpus, tokenizer) and
# gpt/teacher_ckpt are reused, and its gpt/scratch_seed1, grown_seed1 and grown_ki_seed1 runs are the references
# (same data order, seed 1, 400 steps; grown: noise 0.01, 5% warm-up; grown + KI: a_0 0.5, T_ki 100). ARM:
#   grown_w0 / grown_w20     grown, no LR warm-up after growth / a 20% one (80 steps)
#   grown_noise0 / grown_noise10   grown with exact copies (noise 0) / noise 0.1 of each tensor's std
#   grown_stack / grown_interleave  depth by G_stack's stacking / bert2BERT's interleaving of trained layers
#                            instead of zeroed identity layers (not function-preserving)
#   grown_ki_a1 / grown_ki_a02     grown + KI with a_0 1 / 0.2 (T_ki 100)
#   grown_ki_t50 / grown_ki_t200   grown + KI with T_ki 50 / 200 (a_0 0.5)
#   ki_t100 / ki_t100_s2     KI alone (a_0 1) with T_ki 100 instead of the benchmark's 200, seed 1 / seed 2
# Everything else as in the benchmark. Compare with tools/ki_report.py --scratch BENCH/gpt/scratch_seed1 --arm ...
set -euo pipefail
bench="${1:?BENCH_WORKDIR}"
out="${2:?OUT_DIR}"
shift 2
arms=("$@")
[[ ${#arms[@]} -gt 0 ]] || arms=(grown_w0 grown_noise0 grown_stack grown_ki_a1 grown_ki_t50)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
export PATH="$(dirname "$python"):$PATH"  # the virtualenv's deepspeed launcher
mkdir -p "$out"
data="$bench/data"
common=(
    --config "$here/launch/configs/models/tiny_gpt2.yaml"
    --data.data_path "$data/corpus_text_document" --data.tokenizer_model "$data/tokenizer.model"
    --data.tokenizer_type SentencePieceTokenizer --model.vocab_size 4000
    --data.seq_length 128 --data.split 960,40,0 --model.max_position_embeddings 128
    --model.num_layers 4 --model.hidden_size 256 --model.num_attention_heads 4 --model.ffn_hidden_size 1024
)
train=(
    --train.micro_batch_size 8 --train.global_batch_size 16 --train.eval_interval 25 --train.eval_iters 8
    --train.eval_samples fixed --train.eval_at_start true --train.seed 1 --train.train_steps 400
    --optim.lr 0.002 --optim.lr_warmup_fraction 0.05 --logging.tensorboard false --logging.progress_bar false
)
grown() {  # grown NOISE [DEPTH] -> the grown checkpoint (made once per setting)
    local depth="${2:-identity}"
    local dir="$out/grown_ckpt_noise$1_$depth"
    if [[ ! -f "$dir/latest" ]]; then
        "$python" "$here/tools/grow_checkpoint.py" --load "$bench/gpt/teacher_ckpt" --save "$dir" --noise "$1" \
            --depth "$depth" --seed 1 "${common[@]}" > "$out/grow_noise$1_$depth.log" 2>&1
    fi
    echo "$dir"
}
ki=(--ki.enabled true --ki.temperature 1.0 --ki.teacher_dtype float32 --ki.teacher_path "$bench/gpt/teacher_ckpt")
run() { CPU_RANKS=2 PYTHON="$python" bash "$here/launch/pretrain_ki.sh" "${common[@]}" "${train[@]}" "$@"; }
for arm in "${arms[@]}"; do
    case "$arm" in
        grown_w0) extra=(--checkpoint.init_from "$(grown 0.01)" --optim.lr_warmup_fraction 0) ;;
        grown_w20) extra=(--checkpoint.init_from "$(grown 0.01)" --optim.lr_warmup_fraction 0.2) ;;
        grown_noise0) extra=(--checkpoint.init_from "$(grown 0)") ;;
        grown_noise10) extra=(--checkpoint.init_from "$(grown 0.1)") ;;
        grown_stack) extra=(--checkpoint.init_from "$(grown 0.01 stack)") ;;
        grown_interleave) extra=(--checkpoint.init_from "$(grown 0.01 interleave)") ;;
        grown_ki_a1) extra=(--checkpoint.init_from "$(grown 0.01)" "${ki[@]}" --ki.alpha0 1.0 --ki.decay_steps 100) ;;
        grown_ki_a02) extra=(--checkpoint.init_from "$(grown 0.01)" "${ki[@]}" --ki.alpha0 0.2 --ki.decay_steps 100) ;;
        grown_ki_t50) extra=(--checkpoint.init_from "$(grown 0.01)" "${ki[@]}" --ki.alpha0 0.5 --ki.decay_steps 50) ;;
        grown_ki_t200) extra=(--checkpoint.init_from "$(grown 0.01)" "${ki[@]}" --ki.alpha0 0.5 --ki.decay_steps 200) ;;
        ki_t100) extra=("${ki[@]}" --ki.decay_steps 100) ;;
        ki_t100_s2) extra=("${ki[@]}" --ki.decay_steps 100 --train.seed 2) ;;
        *) echo "probe_growth.sh: unknown arm '$arm'" >&2; exit 2 ;;
    esac
    if ! run "${extra[@]}" --logging.run_dir "$out/$arm" > "$out/$arm.log" 2>&1; then
        echo "probe_growth.sh: $arm failed: see $out/$arm.log" >&2
        exit 1
    fi
    echo "$arm: $(grep '"split": "valid"' "$out/$arm/metrics.jsonl" | tail -1)"
done
