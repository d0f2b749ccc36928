#!/usr/bin/env bash
# The PPO family compared (issue 19): REINFORCE (no baseline / mean / value), A2C one-step and
# n-step, PPO-Clip, PPO-Penalty, TRPO, GRPO, Dr. GRPO and RLOO on CartPole (100k steps) and
# Acrobot (200k steps), seeds 0-4, each variant with its presets at the same step budget per env.
# Two runs at a time; a run that completed is kept, one that did not is started again. Then
# ppo-compare draws each env's curves and writes its tables (one env per figure: the presets'
# algo.gae_lambda differs by env, so a cross-env aggregate would split clip, penalty and trpo).
# About 1.5 hours on 2 cores.
#
#   bash benchmarks/family.sh [OUT_DIR]      # default runs/family
set -euo pipefail
out=${1:-runs/family}
configs=(
  "reinforce|algo=pg algo.returns=episode algo.baseline=none"
  "reinforce_mean|algo=pg algo.returns=episode algo.baseline=mean"
  "reinforce_value|algo=pg algo.returns=episode algo.baseline=value"
  "a2c_one_step|algo=a2c algo.gae_lambda=0"
  "a2c_n_step|algo=a2c"
  "clip|algo=clip"
  "penalty|algo=penalty"
  "trpo|algo=trpo"
  "grpo|algo=grpo"
  "dr_grpo|algo=grpo algo.adv_std=none algo.loss_agg=constant"
  "rloo|algo=grpo algo.baseline=leave_one_out algo.adv_std=none"
)
declare -A budget=([CartPole]=100000 [Acrobot]=200000)
declare -A solved=([CartPole]=475 [Acrobot]=-100)  # gymnasium's reward thresholds

train() {  # env name overrides seed
  local dir="$out/$1/$2/seed_$4"
  grep -qs '"status": "completed"' "$dir/summary.json" && return 0
  rm -rf "$dir"
  # shellcheck disable=SC2086  # the overrides are words
  ppo-train "env=$1" $3 "seed=$4" "total_timesteps=${budget[$1]}" progress=false "hydra.run.dir=$dir" \
    > /dev/null
}

queue=()
for env in CartPole Acrobot; do
  for entry in "${configs[@]}"; do
    for seed in 0 1 2 3 4; do
      queue+=("$env|${entry%%|*}|${entry#*|}|$seed")
    done
  done
done
for job in "${queue[@]}"; do
  IFS='|' read -r env name overrides seed <<< "$job"
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done
  train "$env" "$name" "$overrides" "$seed" &
done
wait

keys=(algo algo.returns algo.baseline algo.gae_lambda algo.adv_std algo.loss_agg)
for env in CartPole Acrobot; do
  ppo-compare "$out/$env" --group-by "${keys[@]}" --smooth 0.6 --threshold "${solved[$env]}" --out "$out/$env"
done
