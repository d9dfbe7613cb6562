#!/usr/bin/env bash
# Checks that the kernel records are defined in one place: copies the working tree, reverses
# the field order of every record in src/kernels/records.rs (descriptors, results, the
# shared-memory layouts), and runs on the copy every test that runs the kernels (the crate's
# unit tests and the test files that drive the simulated device). The
# build script substitutes the new offsets into the PTX templates, so every test must still
# pass. Rust code reads the records by field name, which no order changes; only the PTX reads
# them by offset, and only tests that run it can see a wrong one.
#
#   bash scripts/permute-records.sh        # CI runs it; a few minutes on 2 cores (a full build)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
copy="$root/target/permuted-records"
rm -rf "$copy"
mkdir -p "$copy"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$copy" 2>/dev/null || true
python3 - "$copy/src/kernels/records.rs" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
out, pos, reversed_records = [], 0, []
for match in re.finditer(r"record! \{.*?pub struct (\w+) \{\n(.*?)\n    \}\n\}", text, re.S):
    name, body = match.group(1), match.group(2)
    fields, current = [], []
    for line in body.split("\n"):
        current.append(line)
        if line.strip().startswith("pub ") and line.rstrip().endswith(","):
            fields.append(current)
            current = []
    assert not current and len(fields) > 1, (name, current)
    permuted = "\n".join(line for field in reversed(fields) for line in field)
    start, end = match.span(2)
    out.append(text[pos:start])
    out.append(permuted)
    pos = end
    names = [re.search(r"pub (\w+):", f[-1]).group(1) for f in reversed(fields)]
    reversed_records.append(f"{name}: {', '.join(names)}")
out.append(text[pos:])
assert len(reversed_records) == 6, reversed_records
open(path, "w").write("".join(out))
print("records with their fields reversed:")
print("\n".join("  " + r for r in reversed_records))
PY
cd "$copy"
# The kernel records do not reach the candle adapter, whose tests run in the main suite: the
# copy leaves candle out (its feature, its dev-dependencies, and with them the targets that
# require it), which saves building candle a second time.
python3 - Cargo.toml <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
for old, new in [
    ('features = ["sim", "candle"]', 'features = ["sim"]'),
    ('candle-core = "0.11.1"\n', ''),
    ('candle-nn = "0.11.1"\n', ''),
]:
    assert old in text, old
    text = text.replace(old, new)
open(path, "w").write(text)
PY
# A target directory of its own: cargo does not tell the copy's crates from the tree's by
# their path, so sharing one would mix the two builds.
kernel_tests=(--lib --test kernel_conformance --test hostile --test master_weights --test orthogonal_device
    --test build_template)
CARGO_TARGET_DIR="$copy/target" cargo test -p spectral-step --no-fail-fast "${kernel_tests[@]}" 2>&1 \
    | tee "$root/target/permuted-records.log" \
    | grep -E "^test result|FAILED|panicked" || true
if grep -qE "FAILED|panicked|error(\[|:)" "$root/target/permuted-records.log"; then
    echo "records permuted: a test failed (see target/permuted-records.log)"
    exit 1
fi
awk '/^test result:/ { passed += $4; failed += $6 }
     END { printf "records permuted: %d passed, %d failed\n", passed, failed }' "$root/target/permuted-records.log"
