#!/usr/bin/env bash
# `mpirun -np P ringattn attend` against the f64 oracle for every mask and layout, and its
# bad-input contract: one-line error, non-zero exit on every rank, no hang, no output file.
# usage: attend_test.sh RINGATTN ATTEND_CHECK MPIEXEC P
set -uo pipefail
ringattn=$1 check=$2 mpiexec=$3 P=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RINGATTN_NUM_THREADS=1
fails=0 passes=0
run() { timeout 120 "$mpiexec" -n "$P" --oversubscribe "$ringattn" attend "$@"; }

expect_ok() {  # name, gen args..., -- attend flags...
  local name=$1; shift
  local gen=() flags=()
  while [[ $1 != -- ]]; do gen+=("$1"); shift; done; shift
  flags=("$@")
  local d="$work/$name"; mkdir -p "$d"
  "$check" gen "$d" "${gen[@]}" || { echo "FAIL $name: gen"; ((fails++)); return; }
  local zflag=()
  [[ -f $d/z.npy ]] && zflag=(--sink-logits "$d/z.npy")
  if ! run --q "$d/q.npy" --k "$d/k.npy" --v "$d/v.npy" --out "$d/o.npy" --lse "$d/lse.npy" \
        "${zflag[@]}" "${flags[@]}" 2>"$d/err"; then
    echo "FAIL $name: attend exited non-zero"; cat "$d/err"; ((fails++)); return
  fi
  local tol=1e-5
  [[ " ${flags[*]} " == *" bf16 "* || " ${flags[*]} " == *" f16 "* ]] && tol=1e-2
  if "$check" compare "$d/o.npy" "$d/o_ref.npy" "$tol" && \
     "$check" compare "$d/lse.npy" "$d/lse_ref.npy" "$tol"; then
    echo "PASS $name"; ((passes++))
  else
    echo "FAIL $name: output differs from the oracle"; ((fails++))
  fi
}

expect_grad() {  # name, gen args..., -- attend flags...: the backward's files against the oracle
  local name=$1; shift
  local gen=() flags=()
  while [[ $1 != -- ]]; do gen+=("$1"); shift; done; shift
  flags=("$@")
  local d="$work/$name"; mkdir -p "$d"
  "$check" gen "$d" "${gen[@]}" || { echo "FAIL $name: gen"; ((fails++)); return; }
  local zflag=()
  [[ -f $d/z.npy ]] && zflag=(--sink-logits "$d/z.npy")
  if ! run --q "$d/q.npy" --k "$d/k.npy" --v "$d/v.npy" --out "$d/o.npy" --dout "$d/dout.npy" \
        --dq "$d/dq.npy" --dk "$d/dk.npy" --dv "$d/dv.npy" --dsink "$d/dsink.npy" \
        "${zflag[@]}" "${flags[@]}" 2>"$d/err"; then
    echo "FAIL $name: attend exited non-zero"; cat "$d/err"; ((fails++)); return
  fi
  local tol=1e-5 t ok=1
  [[ " ${flags[*]} " == *" bf16 "* || " ${flags[*]} " == *" f16 "* ]] && tol=1e-2
  for t in o dq dk dv dsink; do
    "$check" compare "$d/$t.npy" "$d/${t}_ref.npy" "$tol" || ok=0
  done
  if ((ok)); then
    echo "PASS $name"; ((passes++))
  else
    echo "FAIL $name: gradients differ from the oracle"; ((fails++))
  fi
}

expect_error() {  # name, expected substring, attend flags...
  local name=$1 want=$2; shift 2
  local d="$work/$name"; mkdir -p "$d"
  local start=$SECONDS
  run "$@" >"$d/out" 2>"$d/err"
  local rc=$?
  local lines; lines=$(grep -c "ringattn attend:" "$d/err")
  if ((rc == 0)); then echo "FAIL $name: exit 0"; ((fails++)); return; fi
  if ((rc == 124)); then echo "FAIL $name: hung (timeout)"; ((fails++)); return; fi
  if ! grep -q -- "$want" "$d/err"; then
    echo "FAIL $name: stderr lacks '$want':"; cat "$d/err"; ((fails++)); return
  fi
  if ((lines != P)); then
    echo "FAIL $name: expected one error line per rank ($P), got $lines:"; cat "$d/err"; ((fails++)); return
  fi
  if compgen -G "$work/bad/o.npy*" >/dev/null || compgen -G "$work/bad/d[qkv].npy*" >/dev/null; then
    echo "FAIL $name: left an output file behind"; ((fails++)); return
  fi
  echo "PASS $name ($((SECONDS - start))s)"; ((passes++))
}

# Masks x layouts, odd N not divisible by P, GQA, batch 2.
N=$((13 * P + 4))
expect_ok full_contig   2 "$N" 4 2 16 1 -- --layout contiguous
expect_ok full_zigzag   1 "$N" 4 1 16 2 -- --layout zigzag
expect_ok causal_auto   2 "$N" 4 2 16 3 --causal -- --causal
expect_ok causal_contig 1 "$N" 2 2 32 4 --causal -- --causal --layout contiguous
expect_ok window_sinks  1 "$N" 4 2 16 5 --causal --window 5 --sinks 2 --sink-logits -- --causal --window 5 --sinks 2
expect_ok window_zigzag 1 "$N" 4 4 16 6 --causal --window 9 --sinks 1 -- --causal --window 9 --sinks 1 --layout zigzag
expect_ok bidir_window  2 "$N" 4 1 16 7 --window 6 --sinks 3 -- --window 6 --sinks 3
expect_ok scale_bf16    1 "$N" 4 2 64 8 --causal -- --causal --dtype bf16
expect_ok learned_sink  1 "$N" 2 1 16 9 --sink-logits -- --layout zigzag

# The backward (--dout): dq, dk, dv and dsink against the oracle's gradients.
expect_grad grad_full_contig   2 "$N" 4 2 16 31 -- --layout contiguous
expect_grad grad_causal_zigzag 1 "$N" 4 1 16 32 --causal --sink-logits -- --causal --layout zigzag
expect_grad grad_window_sinks  1 "$N" 4 2 16 33 --causal --window 5 --sinks 2 --sink-logits -- --causal --window 5 --sinks 2
expect_grad grad_bidir_window  2 "$N" 2 2 16 34 --window 6 --sinks 3 --sink-logits -- --window 6 --sinks 3 --layout contiguous
expect_grad grad_bf16          1 "$N" 4 2 32 35 --causal --window 9 --sinks 1 -- --causal --window 9 --sinks 1 --dtype bf16

# --decode-from N0: prefill 0..N0-1 through the ring, decode the rest one token at a time
# through the distributed KV cache; the files must be the oracle's, as without the flag.
expect_ok decode_causal  2 "$N" 4 2 16 21 --causal -- --causal --decode-from "$P"
expect_ok decode_window  1 "$N" 4 1 16 22 --causal --window 5 --sinks 2 --sink-logits -- --causal --window 5 --sinks 2 --decode-from $((N / 2))
expect_ok decode_zigzag  2 "$N" 2 2 16 23 --causal --sink-logits -- --causal --layout zigzag --decode-from $((N - 3))
expect_ok decode_bf16    1 "$N" 4 2 32 24 --causal --window 9 --sinks 1 -- --causal --window 9 --sinks 1 --dtype bf16 --decode-from $((P + 2))
expect_ok decode_none    1 "$N" 2 1 16 25 --causal -- --causal --decode-from "$N"

# Bad input: every rank fails with one line, nothing is written.
mkdir -p "$work/bad"
"$check" gen "$work/bad" 1 "$N" 4 2 16 10
"$check" gen "$work/bad3" 1 "$N" 3 3 16 11 2>/dev/null || mkdir -p "$work/bad3" && "$check" gen "$work/bad3" 1 "$N" 3 3 16 11
b=$work/bad
expect_error missing_file "no_such.npy" --q "$b/no_such.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy"
expect_error bad_window "window must be >= 0" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --window -3
expect_error bad_layout "unknown layout" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --layout diagonal
expect_error bad_dtype "unknown dtype" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --dtype f64
expect_error kv_heads "H % H_kv" --q "$b/q.npy" --k "$work/bad3/k.npy" --v "$work/bad3/v.npy" --out "$b/o.npy"
expect_error shape "expected the shape of k" --q "$b/q.npy" --k "$b/k.npy" --v "$b/q.npy" --out "$b/o.npy"
expect_error not_npy "not a .npy file" --q "$ringattn" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy"
expect_error sinks "sinks" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --sinks 100000
expect_error grad_without_dout "needs --dout" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --dq "$b/dq.npy"
expect_error dout_without_outputs "needs the outputs --dq, --dk and --dv" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --dout "$b/dout.npy" --dq "$b/dq.npy"
expect_error dout_shape "expected the shape of q" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --dout "$b/k.npy" --dq "$b/dq.npy" --dk "$b/dk.npy" --dv "$b/dv.npy"
expect_error dout_missing "no_such_dout.npy" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --dout "$b/no_such_dout.npy" --dq "$b/dq.npy" --dk "$b/dk.npy" --dv "$b/dv.npy"
expect_error unknown_flag "unrecognised option" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --frobnicate
expect_error no_out "--out is required" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy"
expect_error decode_zero "must be in 1..N" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --causal --decode-from 0
expect_error decode_past_end "must be in 1..N" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --causal --decode-from $((N + 1))
expect_error decode_not_causal "needs --causal" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --decode-from $((P + 1))
((P > 1)) && expect_error decode_below_ranks "number of ranks" --q "$b/q.npy" --k "$b/k.npy" --v "$b/v.npy" --out "$b/o.npy" --causal --decode-from $((P - 1))

echo "attend P=$P: $passes passed, $fails failed"
((fails == 0))
