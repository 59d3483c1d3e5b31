#!/usr/bin/env bash
# The three Hopper-v5 datasets of the offline benchmark (results/offline), rebuilt from scratch:
#   hopper-medium:        50k steps of a partly trained SAC policy (its mean action + Gaussian noise 0.1)
#   hopper-replay:        that SAC run's replay buffer up to the same point (as D4RL's medium-replay)
#   hopper-medium-random: hopper-medium plus 50k steps of uniform random actions
# Step 1 trains SAC (xql_sac.py --value-loss sac, seed 1) for 50k steps of a 100k-step run and keeps the
# checkpoint (policy + replay buffer): about 15 minutes on one CPU core. Scores use D4RL's hopper
# reference returns, so normalised scores read as D4RL's.
#   bash tools/make_hopper_datasets.sh [OUT_FOLDER]          (default: data/)
set -euo pipefail
OUT=${1:-data}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
python xql_sac.py --env-id Hopper-v5 --value-loss sac --seed 1 --total-timesteps 100000 --stop-at 50000 \
    --exp-name hopper-data --no-cuda
CK=$(ls -t runs/Hopper-v5__hopper-data__1__*/checkpoint.pt | head -1)
REF="--ref-min-score -20.272305 --ref-max-score 3234.3"
python tools/make_offline_dataset.py --from-replay "$CK" --out "$OUT/hopper-replay.hdf5" $REF
python tools/make_offline_dataset.py --env-id Hopper-v5 --policy "checkpoint:$CK" --noise 0.1 --steps 50000 --seed 1 \
    --out "$OUT/hopper-medium.hdf5" $REF
python tools/make_offline_dataset.py --env-id Hopper-v5 --policy random --steps 50000 --seed 2 \
    --out "$OUT/hopper-random.hdf5" $REF
python tools/make_offline_dataset.py --merge "$OUT/hopper-medium.hdf5" "$OUT/hopper-random.hdf5" \
    --out "$OUT/hopper-medium-random.hdf5" $REF
