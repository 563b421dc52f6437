#!/usr/bin/env bash
# Every run behind the README's model tables and docs/results.md, in the order they were
# made. Each step resumes (finished workdirs are read back), so the script can be stopped
# and started again. On a 2-core CPU the whole of it takes many hours: run the parts you
# need, e.g. `experiments/reproduce.sh headline`.
#
#   experiments/reproduce.sh [split|headline|pretrained|checker|graph|sweeps|cod|all]
#
# Outputs go to $CRYKNN_EXPERIMENTS (default /tmp/cryknn_experiments); figures to
# docs/figures/. The embedded dataset is built in the default TFDS data dir on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${CRYKNN_EXPERIMENTS:-/tmp/cryknn_experiments}
COD=${COD:-../shared/data/cod}
SEEDS="0 1 2"
what=${1:-all}

split() {
  # The near-copy split (issue 17): test structures with a same-composition, same-density
  # structure in train or validation, under the family rule and under the build's groups.
  python experiments/split_audit.py --json=docs/runs/split_audit.json
}

headline() {
  # Model choices at a reduced budget, 3 seeds each, chosen on validation.
  python experiments/ablation.py --max_per_element=10000 --epochs=4 \
    --variants=mlp_k5,mlp_k10,mlp_k20,mlp_k30,graph_h1,graph_h2,graph_h2_w32,graph_h2_w128,graph_h2_cap5k,graph_h2_cap20k,graph_h2_weight_none,graph_h2_weight_inverse
  python experiments/ablation.py --max_per_element=10000 --epochs=4 --variants=graph_h3 --seeds=0
  # The default (graph) and its baselines at the default budget, 3 seeds each.
  for s in $SEEDS; do
    python -m cryknn.main --seed="$s" --workdir="$ROOT/default/graph_s$s"
    python -m cryknn.main --seed="$s" --model=two_stage --workdir="$ROOT/default/two_stage_s$s"
    python -m cryknn.main --seed="$s" --model=mlp --workdir="$ROOT/default/mlp_s$s"
    python -m cryknn.main --seed="$s" --neighbour_elements --workdir="$ROOT/default/masked_s$s"
  done
  python experiments/headline.py --json="$ROOT/headline.json"
  # The mlp at its best k (ablation: 20) with the graph runs' training time.
  python experiments/equal_time.py --mlp_k=20 \
    --graph_workdirs="$ROOT/default/graph_s0,$ROOT/default/graph_s1,$ROOT/default/graph_s2"
  # The probe above ran on a busier CPU than the graph runs, so its 56 epochs used half
  # their time; twice the epochs match it.
  for s in $SEEDS; do
    python -m cryknn.main --model=mlp --k=20 --epochs=112 --seed="$s" \
      --workdir="$ROOT/equal_time/core_mof/mlp_k20_e112_s$s"
  done
  python experiments/headline.py --workroot="$ROOT/equal_time/core_mof" \
    --models=mlp_k20_e56,mlp_k20_e112
  # A held-out evaluation never tuned on: each model of seed 0 on the COD structures.
  python experiments/heldout.py --workdir="$ROOT/default/graph_s0" --json="$ROOT/heldout_cod.json"
  for m in mlp two_stage masked; do
    python experiments/heldout.py --workdir="$ROOT/default/${m}_s0" --json="$ROOT/heldout_cod_$m.json"
  done
}

pretrained() {
  # The shipped models (docs/results.md A0.7), trained on a fresh build of the embedded
  # default: graph models of seed 0, 5 epochs (geometry only; masked-atom), and the
  # checker's ensemble of the headline's masked-atom tree runs (seeds 0-2; their old name
  # `graph`, now `tree`) with the masked graph runs of seeds 0-2.
  local g="$ROOT/pretrained"
  python experiments/train_pretrained.py --name=default --model=graph --epochs=5 \
    --workdir="$g/g5_s0"
  python experiments/train_pretrained.py --name=masked --model=graph --epochs=5 \
    --neighbour_elements --workdir="$g/mg5_s0"
  for s in 1 2; do
    python -m cryknn.main --model=graph --neighbour_elements --epochs=5 --seed="$s" \
      --workdir="$g/mg5_s$s"
  done
  local t="$ROOT/default/masked_s0,$ROOT/default/masked_s1,$ROOT/default/masked_s2"
  # The checker's ensemble: the three masked tree runs and the three masked graph runs
  # (A0.10; before it, the three trees alone).
  python experiments/train_pretrained.py --name=masked_ensemble \
    --members="$t,$g/mg5_s0,$g/mg5_s1,$g/mg5_s2"
  python experiments/paired_models.py --a="$t" \
    --b="$g/mg5_s0,$g/mg5_s1,$g/mg5_s2" --json=docs/runs/masked_graph_vs_tree.json
  python experiments/checker_scores.py --masked_workdirs="$t,$g/mg5_s0,$g/mg5_s1,$g/mg5_s2" \
    --groups=tree:0+1+2,graph:3+4+5
  # More members for the checker (docs/results.md A0.10): three more masked graph seeds,
  # the candidates compared out of fold on validation, the mixed ones' start-up.
  for s in 3 4 5; do
    python -m cryknn.main --model=graph --neighbour_elements --epochs=5 --seed="$s" \
      --workdir="$g/mg5_s$s"
  done
  local m="$g/mg5_s0,$g/mg5_s1,$g/mg5_s2,$g/mg5_s3,$g/mg5_s4,$g/mg5_s5"
  python experiments/checker_scores.py --masked_workdirs="$t,$m" --out_of_fold=20 \
    --groups=C1:0+1+2,C2:0+1+2+3+4+5,C3:3+4+5+6+7+8,C4:0+1+2+3+4+5+6+7+8
  local c2="$t,$g/mg5_s0,$g/mg5_s1,$g/mg5_s2" c4="$t,$m"
  for c in c2 c4; do
    rm -rf "$g/startup_$c"
    python -c 'import sys; from cryknn import saved_model
saved_model.save_ensemble(sys.argv[1], [w + "/model" for w in sys.argv[2].split(",")])' \
      "$g/startup_$c/model" "${!c}"
    python experiments/calibrate.py "$g/startup_$c/model"
    python experiments/bench_startup.py --rounds=5 --workdir="$g/startup_$c" \
      --json="docs/bench/startup_candidate_$c.json"
  done
  python experiments/bench_startup.py --rounds=5 --json=docs/bench/startup_checking_run7.json
}

checker() {
  # The checker (issue 20): calibration, domain and threshold of the shipped models from
  # validation, then the benchmark on test and COD, then mofchecker side by side (needs a
  # venv with mofchecker: $MOFCHECKER_PYTHON, default /work/venv_mofchecker/bin/python).
  python experiments/calibrate.py cryknn/pretrained/default cryknn/pretrained/masked \
    cryknn/pretrained/masked_ensemble
  python experiments/checker.py --validation --json=docs/runs/checker.json
  # The same on fresh CoRE MOF 2014 frameworks (no family in the 2019 build).
  rm -rf "$ROOT/core_mof_2014_unseen" "$ROOT/core_mof_fsr_unseen"
  python experiments/core_mof_unseen.py --out="$ROOT/core_mof_2014_unseen"
  python experiments/checker.py --cifs="$ROOT/core_mof_2014_unseen" --cifs_name=core_mof_2014 \
    --json=docs/runs/checker_core_mof_2014.json --figures=docs/figures/core_mof_2014
  # Frameworks only in CoRE MOF 2019-FSR (neither in the 2019-ASR build nor in 2014).
  python experiments/core_mof_unseen.py --archive=2019-FSR --exclude_archives=2014 \
    --out="$ROOT/core_mof_fsr_unseen"
  python experiments/checker.py --cifs="$ROOT/core_mof_fsr_unseen" \
    --cifs_name=core_mof_2019_fsr_only --json=docs/runs/checker_core_mof_2019_fsr_only.json \
    --figures=docs/figures/core_mof_2019_fsr_only
  # Real crystals of another kind: pyxtal's 100 CSD molecular crystals.
  rm -rf "$ROOT/pyxtal_cifs"
  python experiments/corpus_cifs.py --source=pyxtal --out="$ROOT/pyxtal_cifs"
  python experiments/checker.py --cifs="$ROOT/pyxtal_cifs" --cifs_name=pyxtal_csd \
    --json=docs/runs/checker_pyxtal_csd.json --figures=docs/figures/pyxtal_csd
  python experiments/mofchecker_compare.py --structures=50 --max_atoms=200 \
    --mofchecker_python="${MOFCHECKER_PYTHON:-/work/venv_mofchecker/bin/python}" \
    --json=docs/runs/mofchecker_compare.json
}

sweeps() {
  # Accuracy against k: the two-stage model at the default budget, the graph model at the
  # ablation's budget and k <= 6 (an atom's tree has 1 + k + k**2 nodes); confusions per
  # k; warm start of the graph model (2 seeds: what fitted the session).
  python experiments/k_sweep.py --name=core_mof_two_stage --model=two_stage
  python experiments/confusions.py --name=core_mof_two_stage
  python experiments/k_sweep.py --name=core_mof_graph --ks=1,2,3,4,5,6 \
    --max_per_element=10000 --epochs=4
  python experiments/confusions.py --name=core_mof_graph --max_k=6
  python experiments/warm_start_sweep.py --name=core_mof_graph --k_new=6 --warm_lr_scales=1 \
    --seeds=0,1 --max_per_element=10000 --epochs=4
}

cod() {
  python -m cryknn.data build --dataset=crystal_structures/cif_dir --manual_dir="$COD" \
    --data_dir="$ROOT/data"
  local flags=(--dataset=crystal_structures/cif_dir --data_dir="$ROOT/data" --num_elements=10
               --epochs=20)
  python experiments/k_sweep.py --name=cod_two_stage --model=two_stage "${flags[@]}"
  python experiments/confusions.py --name=cod_two_stage
  python experiments/k_sweep.py --name=cod_graph --ks=1,2,3,4,5 "${flags[@]}"
  python experiments/confusions.py --name=cod_graph --max_k=5
}

graph() {
  # The on-device graph model against the tree model (docs/results.md A0.6): throughput,
  # then the graph model with and without directions at its default budget, compared with
  # the tree runs of headline() (the default model, in default/graph_s*: their old name).
  python experiments/bench_model.py --num_structures=300 --steps=10 --rounds=3 \
    --json=docs/runs/bench_model.json
  python experiments/bench_power_spectra.py
  for s in $SEEDS; do
    python -m cryknn.main --model=graph --seed="$s" --workdir="$ROOT/graph_device/graphdir_s$s"
  done
  for s in 0 1; do
    python -m cryknn.main --model=graph --nodirections --seed="$s" \
      --workdir="$ROOT/graph_device/graph_s$s"
  done
  for s in $SEEDS; do ln -sfn "$ROOT/default/graph_s$s" "$ROOT/graph_device/tree_s$s"; done
  python experiments/headline.py --workroot="$ROOT/graph_device" --models=tree,graphdir,graph \
    --json=docs/runs/graph_device_headline.json
  # 5 epochs at width 64 (seed 0: the shipped default's run, from pretrained()) and at
  # width 128 (A0.8).
  local p="$ROOT/pretrained"
  for s in 1 2; do
    python -m cryknn.main --model=graph --epochs=5 --seed="$s" --workdir="$p/g5_s$s"
  done
  for s in $SEEDS; do
    python -m cryknn.main --model=graph --width=128 --epochs=5 --seed="$s" \
      --workdir="$p/gw128_s$s"
  done
  python experiments/headline.py --workroot="$p" --models=g5,gw128 \
    --json=docs/runs/graph_width128.json
}

case "$what" in
  split) split ;;
  headline) headline ;;
  pretrained) pretrained ;;
  checker) checker ;;
  graph) graph ;;
  sweeps) sweeps ;;
  cod) cod ;;
  all) split; headline; pretrained; checker; graph; sweeps; cod ;;
  *) echo "error: unknown part $what (split, headline, pretrained, checker, graph, sweeps, cod or all)" >&2; exit 2 ;;
esac
