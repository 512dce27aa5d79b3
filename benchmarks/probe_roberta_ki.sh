#!/usr/bin/env bash
# RoBERTa KI at CPU scale, the follow-up to bench_ki_convergence.py's RoBERTa arm (issue 11): why does the KI
# student stay on the MLM plateau while the scratch run leaves it?
#
#   bash benchmarks/probe_roberta_ki.sh DATA_DIR OUT_DIR [ARM ...]
#
# DATA_DIR is bench_ki_convergence.py's workdir/data (corpus_text_document, tokenizer.model: the books corpus,
# sentencepiece 4,000); the scratch reference is that benchmark's roberta/scratch_seed1 run (same data order,
# seed 1). First a teacher trained 3,200 steps (4x the benchmark's; kept in OUT_DIR/teacher_ckpt), then the
# students named by ARM (default: the fifth session's three), 400 steps each, a_t linear over 200:
#   ki_seed1      a_0 1, tau 1           ki_a05     a_0 0.5, tau 1        ki_t2   a_0 1, tau 2
#   ki_t05        a_0 1, tau 0.5 (a sharper teacher)
#   preln_scratch / preln_ki   the student with pre-LN blocks (model.pre_norm true), scratch / a_0 1, tau 1
#   preln_ki_t400 / ki_a05_t400   KD over the whole run (a_t linear over 400 steps): pre-LN a_0 1 / post-LN a_0 0.5
#   scratch_w10 / ki_w10       post-LN with the paper's 10% warm-up (40 steps, not 20): scratch / a_0 1, tau 1
#   ki_w10_t400 / ki_w10_t300  the same with a_t linear over 400 / 300 steps
# Everything else as in the benchmark.
set -euo pipefail
data="${1:?DATA_DIR}"
out="${2:?OUT_DIR}"
shift 2
arms=("$@")
[[ ${#arms[@]} -gt 0 ]] || arms=(ki_seed1 ki_a05 ki_t2)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out"
common=(
    --config "$here/launch/configs/models/tiny_roberta.yaml"
    --data.data_path "$data/corpus_text_document" --data.tokenizer_model "$data/tokenizer.model"
    --data.tokenizer_type SentencePieceTokenizer --model.vocab_size 4000 --model.pad_token_id 4
    --data.seq_length 128 --data.split 960,40,0 --model.max_position_embeddings 128
    --train.micro_batch_size 8 --train.global_batch_size 16 --train.eval_iters 8 --train.eval_samples fixed
    --train.seed 1 --optim.lr 0.001 --optim.lr_warmup_fraction 0.05
    --logging.tensorboard false --logging.progress_bar false
)
teacher=(--model.num_layers 3 --model.hidden_size 128 --model.num_attention_heads 4 --model.ffn_hidden_size 512)
student=(--model.num_layers 4 --model.hidden_size 256 --model.num_attention_heads 4 --model.ffn_hidden_size 1024
    --train.train_steps 400 --train.eval_interval 25)
run() { CPU_RANKS=2 bash "$here/launch/pretrain_ki.sh" "${common[@]}" "$@"; }
if [[ ! -f "$out/teacher_ckpt/latest" ]]; then
    run "${teacher[@]}" --train.train_steps 3200 --train.eval_interval 100 \
        --checkpoint.save "$out/teacher_ckpt" --logging.run_dir "$out/teacher" > "$out/teacher.log" 2>&1
fi
ki=(--ki.enabled true --ki.teacher_dtype float32 --ki.decay_steps 200 --ki.teacher_path "$out/teacher_ckpt")
for arm in "${arms[@]}"; do
    case "$arm" in
        ki_seed1) extra=("${ki[@]}" --ki.temperature 1.0) ;;
        ki_a05) extra=("${ki[@]}" --ki.temperature 1.0 --ki.alpha0 0.5) ;;
        ki_t2) extra=("${ki[@]}" --ki.temperature 2.0) ;;
        ki_t05) extra=("${ki[@]}" --ki.temperature 0.5) ;;
        preln_scratch) extra=(--model.pre_norm true) ;;
        preln_ki) extra=(--model.pre_norm true "${ki[@]}" --ki.temperature 1.0) ;;
        preln_ki_t400) extra=(--model.pre_norm true "${ki[@]}" --ki.temperature 1.0 --ki.decay_steps 400) ;;
        ki_a05_t400) extra=("${ki[@]}" --ki.temperature 1.0 --ki.alpha0 0.5 --ki.decay_steps 400) ;;
        scratch_w10) extra=(--optim.lr_warmup_fraction 0.1) ;;
        ki_w10) extra=(--optim.lr_warmup_fraction 0.1 "${ki[@]}" --ki.temperature 1.0) ;;
        ki_w10_t400) extra=(--optim.lr_warmup_fraction 0.1 "${ki[@]}" --ki.temperature 1.0 --ki.decay_steps 400) ;;
        ki_w10_t300) extra=(--optim.lr_warmup_fraction 0.1 "${ki[@]}" --ki.temperature 1.0 --ki.decay_steps 300) ;;
        *) echo "probe_roberta_ki.sh: unknown arm '$arm'" >&2; exit 2 ;;
    esac
    run "${student[@]}" "${extra[@]}" --logging.run_dir "$out/$arm" > "$out/$arm.log" 2>&1
done
