#!/usr/bin/env bash
# The README's core-install promise, checked for real: a fresh venv with only the core
# wheel (`pip install .`), then the commands a core user reaches. Each exits 0, or exits
# non-zero with one line naming the extra it needs; none prints a traceback.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${CORE_VENV:-.ci-core-venv}
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet .
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/nacl.cif" <<'CIF'
data_nacl
_cell_length_a 5.64
_cell_length_b 5.64
_cell_length_c 5.64
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_space_group_name_H-M_alt 'F m -3 m'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Na1 Na 0 0 0
Cl1 Cl 0.5 0.5 0.5
CIF
failed=0
check() {  # check EXPECTED_STATUS EXTRA_OR_EMPTY COMMAND...
  local want=$1 extra=$2; shift 2
  out=$(cd "$work" && "$@" 2>&1); got=$?
  lines=$(printf '%s\n' "$out" | grep -c '^error: ' || true)
  if [ "$got" != "$want" ] || printf '%s' "$out" | grep -q 'Traceback'; then
    echo "core check FAILED: '$*' exited $got (expected $want)"; printf '%s\n' "$out" | tail -5
    failed=1
  elif [ -n "$extra" ] && ! printf '%s' "$out" | grep -q "cryknn\[$extra\]"; then
    echo "core check FAILED: '$*' does not name cryknn[$extra]"; printf '%s\n' "$out" | tail -5
    failed=1
  else
    echo "core check ok: $* (exit $got${extra:+, names cryknn[$extra] in $lines line})"
  fi
}
bin="$PWD/$venv/bin"
check 0 "" "$bin/cryknn" --version
check 0 "" "$bin/cryknn" predict nacl.cif
check 0 "" "$bin/cryknn" check --out=sites.csv nacl.cif
check 0 "" "$bin/cryknn" check --html=report.html nacl.cif
# The report's viewer (package data) came with the wheel: the page carries 3Dmol.js.
if grep -q 'createViewer' "$work/report.html" 2>/dev/null; then
  echo "core check ok: report.html carries its 3D viewer"
else
  echo "core check FAILED: report.html is missing or lacks the 3D viewer (package data?)"
  failed=1
fi
check 0 "" "$bin/cryknn" featurize --k=5 --out=nacl.npz nacl.cif
check 2 train "$bin/cryknn" train --k=5
check 2 train "$bin/cryknn" data stats
check 2 train "$bin/python" -m cryknn.main --k=5
exit $failed
