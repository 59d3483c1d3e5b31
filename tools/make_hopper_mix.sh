#!/usr/bin/env bash
# A Hopper-v5 mix of good, noisy and random play (120k transitions), the dataset of docs/xql_offline.md's
# "good + noisy + random" study: one policy rolled out with Gaussian action noise 0.1 and 0.5, plus
# uniform random actions, 40k steps each, merged with D4RL's Hopper reference scores.
#   bash tools/make_hopper_mix.sh POLICY_FILE [OUT_FOLDER]        (default: data/)
# POLICY_FILE: a checkpoint or --save-model file of iq_continuous.py, miq_continuous.py, xql_sac.py or
# xql_td3.py with a deterministic return near 1000, e.g. from
#   python iq_continuous.py --env-id Hopper-v5 --total-timesteps 50000 --seed 1 --save-model
set -euo pipefail
POLICY=${1:?usage: bash tools/make_hopper_mix.sh POLICY_FILE [OUT_FOLDER]}
OUT=${2:-data}
mkdir -p "$OUT"
REF="--ref-min-score -20.272305 --ref-max-score 3234.3"
ROLL="python tools/make_offline_dataset.py --env-id Hopper-v5 --steps 40000"
$ROLL --policy "checkpoint:$POLICY" --noise 0.1 --seed 1 --out "$OUT/hopper-good.hdf5" $REF
$ROLL --policy "checkpoint:$POLICY" --noise 0.5 --seed 2 --out "$OUT/hopper-noisy.hdf5" $REF
$ROLL --policy random --seed 3 --out "$OUT/hopper-random40k.hdf5" $REF
python tools/make_offline_dataset.py --merge "$OUT/hopper-good.hdf5" "$OUT/hopper-noisy.hdf5" \
    "$OUT/hopper-random40k.hdf5" --out "$OUT/hopper-good-noisy-random.hdf5" $REF
