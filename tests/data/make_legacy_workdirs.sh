#!/usr/bin/env bash
# Writes tests/data/legacy-<commit>/: a pre-training workdir (4 steps, checkpoints at 2 and 4,
# a 500-piece SentencePiece model trained on the head of the shared English corpus) and a
# fine-tuning workdir (SST-2, 4 of its steps, from that checkpoint) as the flaxbert of
# <commit> writes them. tests/legacy_checkpoint_test.py resumes and fine-tunes from them, so
# that checkpoints written before a refactor keep restoring. Run from the repository root,
# at the commit named; ../shared must be beside the repository.
set -euo pipefail
commit=$(git rev-parse --short HEAD)
out=tests/data/legacy-$commit
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$out" && mkdir -p "$out"
head -n 3000 ../shared/data/corpus/en_gutenberg.txt | awk 'NR % 150 == 0 {print ""} {print}' > "$tmp/en.txt"  # 20 documents
model=(--config.model.hidden_size=16 --config.model.num_layers=2 --config.model.num_heads=2
       --config.model.intermediate_size=32 --config.model.max_position_embeddings=32)
flaxbert pretrain --config configs/pretrain.py:tiny --workdir "$out/pretrain" "${model[@]}" \
  --config.data.corpus="$tmp/en.txt" --config.data.cache_dir="$tmp/cache" \
  --config.data.vocab_size=500 --config.model.vocab_size=500 --config.data.max_seq_length=32 \
  --config.data.max_predictions_per_seq=5 --config.train.batch_size=8 \
  --config.train.num_steps=4 --config.train.warmup_steps=1 --config.train.log_every=1 \
  --config.eval.every_steps=4 --config.eval.num_batches=1 --config.eval.batch_size=8 \
  --config.checkpoint.every_steps=2 --config.checkpoint.async_save=false
flaxbert finetune --config configs/finetune.py:sst2,tiny --workdir "$out/finetune" "${model[@]}" \
  --config.init_from="$out/pretrain" --config.data.train_limit=32 --config.data.eval_limit=16 \
  --config.data.max_seq_length=32 --config.train.batch_size=8 --config.train.num_steps=4 \
  --config.eval.every_steps=2 --config.eval.batch_size=8 --config.checkpoint.async_save=false
rm -rf "$out"/*/tensorboard
# Absolute paths of this machine in the saved configs are left as they are: the test only
# restores parameters, optimizer state and meta.
du -sh "$out"
